"""The public entry point to the analysis DataFrames: ``import qkit.frames`` / ``from qkit import frames``.

The DataFrames live in :mod:`qkit.analysis.frames` (docs/architecture.md#analysis-needs-the-notebooks-extra);
this module re-exports its public names so users' notebooks keep one stable name.
"""
from qkit.analysis.frames import *  # noqa: F401,F403 - the public names of qkit.analysis.frames
