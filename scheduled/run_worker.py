#!/usr/bin/env python3
"""Run notebooks/worker.ipynb through papermill once, under the queue's lock (docs/architecture.md#scheduled-runs).

    python scheduled/run_worker.py [--max-jobs N] [--max-seconds S] [--queue NAME]

The executed notebook lands in scheduled/runs/YYYY/MM/DD/worker-<UTC timestamp>.ipynb,
with <output>.json (how the run went) and <output>.log (papermill's output) beside it.
Exit status: 0 ok, 1 the notebook failed, 2 bad usage, 75 another run holds the lock,
124 timed out.  All the logic is in qkit/runs/runner.py.
"""
import sys
from pathlib import Path

# run from a checkout without installing qkit: the project root is this file's parent's parent
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qkit.runs.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
