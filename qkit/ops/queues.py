"""Every queue of the ledger at a glance: counts per status, depth, the oldest due job's age, paused
(``qkit queues``, ``GET /api/queues`` and the ``/metrics`` gauges share it)."""
from __future__ import annotations

from typing import Any

from qkit.ledger import utcnow
from qkit.model import STATUSES


def queue_rows(ledger: Any, served: str) -> list[dict[str, Any]]:
    """Every queue of the ledger (and the served one) with its counts, depth, oldest due job's age, paused flag."""
    now = utcnow()
    rows = {r["queue"]: r for r in ledger.queue_overview(now)}
    out = []
    for name in sorted(set(rows) | {served}):
        r = rows.get(name) or {"counts": {s: 0 for s in STATUSES}, "due": 0, "delayed": 0, "oldest_due_at": None,
                               "paused": False}
        oldest = r["oldest_due_at"]
        out.append({"queue": name, "counts": r["counts"], "total": sum(r["counts"].values()),
                    "depth": r["due"], "delayed": r["delayed"],
                    "oldest_due_age_s": round(max(0.0, (now - oldest).total_seconds()), 3) if oldest else None,
                    "paused": r["paused"]})
    return out
