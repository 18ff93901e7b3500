"""Analysis: DataFrames, figures and notebooks from the ledger (docs/architecture.md#analysis-needs-the-notebooks-extra).

Needs the ``notebooks`` extra (pandas, matplotlib...).  ``qkit.frames`` is the
public entry point to :mod:`qkit.analysis.frames`.
"""
