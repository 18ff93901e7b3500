"""Operations tools: what an operator runs on a queue (docs/architecture.md#operations-tools).

The audit, explaining one job, DLQ triage, retention (prune) and the reconciler.
"""
