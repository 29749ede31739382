"""Our launcher under a real Slurm: sbatch --wait, srun, init_distributed, gloo all_reduce.

The cluster comes from tests/slurm.py (session-scoped, ~2 s to start); later Slurm tests
(tiny GRPO, 671B dry-run) reuse the same fixture.
"""

import sys
from pathlib import Path

from tests.slurm import slurm_cluster  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parents[2]

# Each task contributes rank+1; with 2 tasks the sum is 3 on every rank.
TASK = """
import torch, torch.distributed as dist
from megatron_r1.parallel.launch import init_distributed, destroy_distributed
env = init_distributed(timeout_s=60)
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t)
print(f"RESULT rank={env.rank} world={env.world_size} local={env.local_rank}/{env.local_world_size} "
      f"launcher={env.launcher} backend={env.backend} addr={env.master_addr} sum={t.item():g}", flush=True)
destroy_distributed()
"""


def test_two_task_allreduce_under_srun(slurm_cluster, tmp_path):
    script = tmp_path / "allreduce.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --ntasks=2\n"
        "#SBATCH --time=5\n"
        "set -euo pipefail\n"
        # srun's --kill-on-bad-exit: a rank that dies takes the other down instead of a hang
        f'srun --kill-on-bad-exit=1 "{sys.executable}" -c "$1"\n'
    )
    result = slurm_cluster.sbatch_wait(script, [TASK], env={"PYTHONPATH": str(REPO)}, timeout=180)
    assert result.returncode == 0, result.output

    lines = sorted(line for line in result.output.splitlines() if line.startswith("RESULT"))
    assert len(lines) == 2, result.output
    for rank, line in enumerate(lines):
        assert f"rank={rank} world=2 local={rank}/2 launcher=slurm backend=gloo" in line, line
        assert f"addr={slurm_cluster.hostname}" in line and line.endswith("sum=3"), line


def test_batch_step_without_srun_is_refused(slurm_cluster, tmp_path):
    """Running the trainer straight from a multi-task batch script must fail fast, not hang."""
    script = tmp_path / "nosrun.sbatch"
    script.write_text(f'#!/bin/bash\n#SBATCH --ntasks=2\n"{sys.executable}" -c "$1"\n')
    result = slurm_cluster.sbatch_wait(script, [TASK], env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode != 0
    assert "not an srun task" in result.output, result.output
