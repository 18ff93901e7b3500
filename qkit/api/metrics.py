"""``GET /metrics``: the ledger's figures in the Prometheus text format, read at scrape time.

A custom collector (:class:`LedgerCollector`) asks the ledger at each scrape
(a few GROUP BY queries, :mod:`qkit.ledger.overview`); no process-local
counter is kept, so every server and every restart reports the same numbers.
Taken by ``Bearer $QKIT_METRICS_TOKEN``, and by the admin and read tokens.

=============================================  =======  ==========================================
metric                                         type     labels
=============================================  =======  ==========================================
``qkit_jobs``                                  gauge    queue, type, status
``qkit_attempts_total``                        counter  queue, type, outcome (finished attempts)
``qkit_job_execution_seconds``                 histo.   queue, type (finished attempts' durations)
``qkit_queue_depth``                           gauge    queue (pending jobs due now)
``qkit_queue_delayed``                         gauge    queue (pending jobs not due yet)
``qkit_queue_oldest_due_age_seconds``          gauge    queue (0 when nothing is due)
``qkit_dlq_size``                              gauge    queue (failed jobs)
``qkit_queue_paused``                          gauge    queue (1 when paused)
=============================================  =======  ==========================================

Counts come from the rows the ledger holds now: ``qkit prune`` and a DLQ purge
delete rows, so ``qkit_attempts_total`` can go down (Prometheus reads that as a
counter reset).
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from qkit.api.bodies import check_query
from qkit.api.errors import guard
from qkit.api.holder import holder
from qkit.api.openapi import AUTH_ERRORS, error_response
from qkit.api.roles import authorize
from qkit.ops.queues import queue_rows

#: the execution-time histogram's upper bounds, seconds
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class LedgerCollector(Collector):
    """Reads the ledger each time it is collected (one scrape)."""

    def __init__(self, ledger: Any, served: str) -> None:
        self.ledger = ledger
        self.served = served

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("qkit_jobs", "Jobs in the ledger", labels=["queue", "type", "status"])
        for queue, type_, status, n in self.ledger.type_counts():
            jobs.add_metric([queue, type_, status], n)
        yield jobs
        yield from self._attempts()
        yield from self._queues()

    def _attempts(self) -> Iterator[Metric]:
        attempts = CounterMetricFamily("qkit_attempts", "Finished attempts", labels=["queue", "type", "outcome"])
        execution = HistogramMetricFamily("qkit_job_execution_seconds", "Execution time of finished attempts",
                                          labels=["queue", "type"])
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for row in self.ledger.attempt_figures([b * 1000.0 for b in BUCKETS_S]):
            if row["outcome"] is None:  # still running
                continue
            attempts.add_metric([row["queue"], row["type"], row["outcome"]], row["n"])
            into = merged.setdefault((row["queue"], row["type"]), {"timed": 0, "sum_ms": 0.0,
                                                                   "le": [0] * len(BUCKETS_S)})
            into["timed"] += row["timed"]
            into["sum_ms"] += row["sum_ms"]
            into["le"] = [a + b for a, b in zip(into["le"], row["le"])]
        for (queue, type_), h in sorted(merged.items()):
            buckets = [(_bound(b), n) for b, n in zip(BUCKETS_S, h["le"])] + [("+Inf", h["timed"])]
            execution.add_metric([queue, type_], buckets, h["sum_ms"] / 1000.0)
        yield attempts
        yield execution

    def _queues(self) -> Iterator[Metric]:
        families = {
            "depth": GaugeMetricFamily("qkit_queue_depth", "Pending jobs due now", labels=["queue"]),
            "delayed": GaugeMetricFamily("qkit_queue_delayed", "Pending jobs not due yet", labels=["queue"]),
            "oldest": GaugeMetricFamily("qkit_queue_oldest_due_age_seconds",
                                        "How long the job due the longest has waited (0 when none is due)",
                                        labels=["queue"]),
            "dlq": GaugeMetricFamily("qkit_dlq_size", "Failed jobs (the dead-letter queue)", labels=["queue"]),
            "paused": GaugeMetricFamily("qkit_queue_paused", "1 when the queue is paused", labels=["queue"]),
        }
        for row in queue_rows(self.ledger, self.served):
            label = [row["queue"]]
            families["depth"].add_metric(label, row["depth"])
            families["delayed"].add_metric(label, row["delayed"])
            families["oldest"].add_metric(label, row["oldest_due_age_s"] or 0.0)
            families["dlq"].add_metric(label, row["counts"]["failed"])
            families["paused"].add_metric(label, 1 if row["paused"] else 0)
        yield from families.values()


def _bound(seconds: float) -> str:
    return repr(float(seconds))


def scrape(ledger: Any, served: str) -> bytes:
    """One scrape of the ledger, in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(ledger, served))
    return generate_latest(registry)


@guard
async def metrics(request: Request) -> Response:
    """GET /metrics"""
    await authorize(request, operator=True, metrics=True)
    check_query(request.query_params, ())
    hold = holder(request)
    body = await run_in_threadpool(lambda: scrape(hold.get().ledger, hold.name))
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


ROUTES = [Route("/metrics", metrics, methods=["GET"])]

OPENAPI_PATHS: dict[str, Any] = {
    "/metrics": {"get": {
        "operationId": "metrics", "summary": "The ledger's figures in the Prometheus text format, read at scrape time",
        "security": [{"apiToken": []}, {"metricsToken": []}],
        "responses": {"200": {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "422": error_response("A query parameter was given (none is taken)"), **AUTH_ERRORS},
    }},
}
