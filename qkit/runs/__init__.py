"""Scheduled runs (docs/architecture.md#scheduled-runs): the runner (papermill under a per-queue lock),
a run's record, and the report folders built from them."""
