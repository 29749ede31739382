#!/usr/bin/env bash
# Install the Debian packages the test-suite needs, only when they are missing.
#
# - Idempotent: every package is checked with `dpkg-query` first, so a second run makes no
#   network call and takes well under a second (tests/run.sh calls it on every run).
# - slurm-wlm (slurmctld + slurmd + client tools) and munge back tests/slurm.py, which brings up
#   a real single-node cluster. --no-install-recommends keeps out the mail/doc recommends that
#   Debian pulls in otherwise.
# - The packages' own systemd units are never started: tests/slurm.py runs its own daemons from
#   a private config, so a host-level slurm/munge install is left untouched.
set -euo pipefail

PACKAGES=(slurm-wlm munge)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "setup_system.sh: missing ${missing[*]} and not root; install them with apt-get" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Package lists may be absent in a fresh container; one update is enough.
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
echo "setup_system.sh: installed ${missing[*]}"
