"""The engine: claiming, running and settling jobs (docs/architecture.md#the-engine).

The facade (:mod:`qkit.engine.queue`), the burst worker, the Redis dispatch index,
the job life-cycle rules and what a worker runs with (handlers, back-off, signals).
"""
