#!/usr/bin/env python
"""Shim: the command lives in megatron_r1/tools/export_distill_dataset.py (also `megatron-r1 export-distill`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_r1.tools.export_distill_dataset import __doc__, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
