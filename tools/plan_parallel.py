#!/usr/bin/env python
"""Shim: the command lives in megatron_r1/tools/plan_parallel.py (also `megatron-r1 plan`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_r1.tools.plan_parallel import __doc__, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
