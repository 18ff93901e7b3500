"""qkit.analysis.frames (DataFrames from the ledger, one query each) and qkit.analysis.plots (figures from them)."""
from __future__ import annotations

import io
import json
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from matplotlib.figure import Figure
from sqlalchemy import event

import qkit
from qkit.analysis import frames, plots, whatif
from qkit.backends.embedded import EmbeddedServer
from qkit.analysis.notebook_helpers import seeded_batch

TYPES = ("web_scraping", "ai_text_generation", "scheduled_publish")


def drain(q, seconds: float = 60, **work) -> int:
    """Bursts until nothing is pending or processing; returns how many bursts ran."""
    deadline = time.monotonic() + seconds
    bursts = 0
    while True:
        q.work(**work)
        bursts += 1
        counts = q.ledger.status_counts(q.name)
        if counts["pending"] + counts["processing"] == 0:
            return bursts
        assert time.monotonic() < deadline, counts
        time.sleep(0.02)


@pytest.fixture(scope="module")
def q(tmp_path_factory):
    """A drained queue: 3 types x 3 priorities, failing attempts, timeouts, one job of an unknown type."""
    home = tmp_path_factory.mktemp("frames") / "home"
    q = qkit.connect(queue="frames", home=home, backoff_base=0.0)
    q.start = datetime.now(timezone.utc)
    q.enqueue_many([{"type": TYPES[i % 3], "priority": i % 3, "max_attempts": 3,
                     "payload": {"simulate": {"fail_rate": 0.35, "timeout_rate": 0.05, "latency_ms": 1}}}
                    for i in range(60)])
    q.enqueue("no_such_type", {})
    q.bursts = drain(q, params={"run_id": "run-frames-1"})
    yield q
    q.close()
    EmbeddedServer(home).stop()


@pytest.fixture
def count_queries(q):
    """Collects the queries (SELECT statements) the read engine executes."""
    seen: list[str] = []

    def before(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):  # not the BEGIN of the connection
            seen.append(statement)

    event.listen(q.ledger.read_engine, "before_cursor_execute", before)
    yield seen
    event.remove(q.ledger.read_engine, "before_cursor_execute", before)


def test_jobs_attempts_events(q):
    jobs = frames.jobs(q)
    assert len(jobs) == 61 and jobs["id"].is_monotonic_increasing
    assert set(jobs["status"]) == {"completed", "failed"}
    assert (jobs["wait_s"] >= 0).all() and str(jobs["created_at"].dt.tz) == "UTC"
    att = frames.attempts(q)
    assert len(att) == jobs["attempts"].sum()
    assert set(att["outcome"]) <= {"completed", "failed", "timeout"}
    assert {"type", "priority", "job_status", "max_attempts", "fingerprint"} <= set(att.columns)
    assert "traceback" in frames.attempts(q, traceback=True).columns
    ev = frames.events(q)
    assert (ev["event"] == "enqueued").sum() == 61
    one = jobs.iloc[5]
    assert len(frames.events(q, job_id=int(one["id"]))) >= 3
    assert len(frames.attempts(q, job_id=int(one["id"]))) == one["attempts"]
    assert frames.jobs(q, status="failed", payload=True)["payload"].map(type).eq(dict).all()
    assert len(frames.jobs(q, ids=[1, 2, 3])) == 3


def test_since_filters_and_time_parsing(q):
    assert len(frames.jobs(q, since=q.start - timedelta(minutes=1))) == 61
    assert frames.jobs(q, since="2999-01-01").empty
    assert frames.attempts(q, since=datetime(2999, 1, 1)).empty
    assert frames.retry_distribution(q, since="2999-01-01T00:00:00Z").empty
    assert frames.as_utc("2025-01-31T12:00:00") == datetime(2025, 1, 31, 12, tzinfo=timezone.utc)
    assert frames.as_utc("2025-01-31T13:00:00+01:00") == datetime(2025, 1, 31, 12, tzinfo=timezone.utc)
    assert frames.as_utc("") is None and frames.as_utc(None) is None
    with pytest.raises(ValueError, match="ISO 8601"):
        frames.as_utc("last tuesday")


def test_retry_distribution(q):
    dist = frames.retry_distribution(q)
    jobs = frames.jobs(q)
    expected = jobs.groupby(["type", "status", "attempts"]).size()
    got = dist.assign(status=dist["outcome"].map({"completed": "completed", "dlq": "failed"})) \
        .set_index(["type", "status", "attempts"])["jobs"]
    assert got.sort_index().to_dict() == expected.sort_index().to_dict()
    assert dist.groupby("type")["share"].sum().round(9).eq(1).all()
    # the unknown type fails at once, without retries
    assert dist[dist["type"] == "no_such_type"][["outcome", "attempts", "jobs"]].values.tolist() == [["dlq", 1, 1]]


def test_type_summary_and_attempt_outcomes(q):
    s = frames.type_summary(q).set_index("type")
    jobs = frames.jobs(q)
    for t, g in jobs.groupby("type"):
        done = (g["status"] == "completed").sum()
        assert s.loc[t, "jobs"] == len(g) and s.loc[t, "completed"] == done
        assert s.loc[t, "success_rate"] == pytest.approx(done / len(g))
    ok = s.dropna(subset=["exec_p50_ms"])
    assert len(ok) == 3
    assert (ok["exec_p50_ms"] <= ok["exec_p90_ms"]).all() and (ok["exec_p90_ms"] <= ok["exec_p99_ms"]).all()
    outcomes = frames.attempt_outcomes(q)
    assert outcomes["attempts"].sum() == len(frames.attempts(q))
    first = outcomes[outcomes["attempt"] == 1].set_index("type")
    assert first["attempts"].to_dict() == jobs.groupby("type").size().to_dict()


def test_wait_times_and_waiting(q):
    w = frames.wait_times(q)
    assert w["priority"].tolist() == [2, 1, 0]
    assert w["jobs"].sum() == 61 and (w["waiting"] == 0).all()
    assert (w["wait_p50_s"] <= w["wait_p99_s"]).all()
    assert frames.waiting(q).empty


def test_queue_depth_ends_at_the_status_counts(q):
    depth = frames.queue_depth(q)
    counts = q.ledger.status_counts(q.name)
    last = depth.iloc[-1]
    assert last.to_dict() == {"pending": 0, "delayed": 0, "processing": 0, "completed": counts["completed"],
                              "failed": counts["failed"], "cancelled": 0}
    assert (depth >= 0).all().all()
    assert depth[["pending", "delayed", "processing", "completed", "failed"]].sum(axis=1).max() == 61
    binned = frames.queue_depth(q, freq="auto")
    assert binned.iloc[-1].to_dict() == last.to_dict()


@pytest.fixture
def bare_ledger(tmp_path):
    """A ledger without Redis: what frames read (a queue name and its ledger)."""
    from types import SimpleNamespace

    from qkit.ledger import Ledger

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.init_schema()
    yield ledger
    ledger.close()


def _insert(ledger, table, rows):
    with ledger.engine.begin() as conn:
        conn.execute(table.insert(), rows)


def test_queue_depth_marks_back_off_as_delayed(bare_ledger):
    """The depth series, counted in SQL from events, follows each job through back-off and the DLQ."""
    from types import SimpleNamespace

    from qkit.ledger import job_events, jobs as jobs_t

    t = datetime(2025, 1, 1, tzinfo=timezone.utc)
    _insert(bare_ledger, jobs_t, [dict(id=i, queue=qn, type="x", payload={}, status="pending", priority=0, attempts=0,
                                       max_attempts=3, run_at=t, created_at=t, updated_at=t, epoch=0)
                                  for i, qn in ((1, "d"), (2, "d"), (3, "other"))])
    ev = [(1, 0, "enqueued", None), (1, 1, "claimed", {"attempt": 1}),
          (1, 2, "retry_scheduled", {"attempt": 1, "outcome": "failed", "delay_s": 3.0}),
          (1, 6, "claimed", {"attempt": 2}), (1, 7, "completed", {"attempt": 2}),
          (2, 0, "enqueued", None), (2, 1, "claimed", {"attempt": 1}),
          (2, 2, "failed", {"attempt": 1, "outcome": "failed"}), (2, 2, "dead", None),
          (3, 0, "enqueued", None)]
    _insert(bare_ledger, job_events, [dict(job_id=j, at=t + timedelta(seconds=s), event=e, worker="w", detail=d)
                                      for j, s, e, d in ev])
    q = SimpleNamespace(name="d", ledger=bare_ledger)
    depth = frames.queue_depth(q, freq="1s", now=t + timedelta(seconds=60))
    assert depth.attrs["freq"] == "1s" and depth.index[0] == pd.Timestamp(t)
    at = lambda s: depth.loc[pd.Timestamp(t + timedelta(seconds=s))].to_dict()  # noqa: E731
    assert at(0) == {"pending": 2, "delayed": 0, "processing": 0, "completed": 0, "failed": 0, "cancelled": 0}
    assert at(2) == {"pending": 0, "delayed": 1, "processing": 0, "completed": 0, "failed": 1, "cancelled": 0}
    assert at(5) == {"pending": 1, "delayed": 0, "processing": 0, "completed": 0, "failed": 1, "cancelled": 0}  # due at 2 + 3 s
    assert at(7) == {"pending": 0, "delayed": 0, "processing": 0, "completed": 1, "failed": 1, "cancelled": 0}
    # a window opens with the state at its start; the other queue's job never counts
    late = frames.queue_depth(q, start=t + timedelta(seconds=3), end=t + timedelta(seconds=10), freq="1s",
                              now=t + timedelta(seconds=60))
    assert late.iloc[0].to_dict() == {"pending": 0, "delayed": 1, "processing": 0, "completed": 0, "failed": 1, "cancelled": 0}
    assert late.index[0] == pd.Timestamp(t + timedelta(seconds=3)) and late.iloc[-1]["completed"] == 1
    assert frames.queue_depth(q, type="x", freq="1s", now=t + timedelta(seconds=60)).equals(depth)
    assert frames.queue_depth(q, type="y").empty


def test_throughput_and_dlq_groups(q):
    tp = frames.throughput(q)
    assert tp.to_numpy().sum() == len(frames.attempts(q)) and tp.attrs["freq"]
    groups = frames.dlq_groups(q)
    assert groups["jobs"].sum() == q.ledger.status_counts(q.name)["failed"]
    assert sum(len(ids) for ids in groups["job_ids"]) == groups["jobs"].sum()
    assert groups["fingerprint"].str.contains("UnknownJobType").any()
    assert groups["jobs"].is_monotonic_decreasing


def test_runs_carry_their_run_id(q):
    r = frames.runs(q)
    assert len(r) == q.bursts and (r["run_id"] == "run-frames-1").all()
    # bursts outside a scheduled run carry no runner's record (tests/test_scheduled.py reads one)
    assert (r["status"] == "ok").all() and r["run_status"].isna().all() and r["exit_code"].isna().all()


def test_next_due(q, tmp_path):
    assert frames.next_due(q) is None
    home = tmp_path / "home"
    with qkit.connect(queue="later", home=home) as q2:
        try:
            q2.enqueue("web_scraping", {}, delay=120)
            due = frames.next_due(q2)
            assert timedelta(seconds=100) < due - datetime.now(timezone.utc) <= timedelta(seconds=120)
        finally:
            EmbeddedServer(home).stop()


@pytest.mark.parametrize("name,kwargs,most", [
    ("jobs", {}, 1), ("attempts", {}, 1), ("events", {}, 1), ("retry_distribution", {}, 1),
    ("attempt_outcomes", {}, 1), ("exec_times", {}, 1), ("type_summary", {}, 2), ("wait_times", {}, 1),
    ("waiting", {}, 1), ("queue_depth", {}, 3), ("throughput", {}, 3), ("dlq_groups", {}, 1),
    ("queue_depth", {"type": "web_scraping", "since": "2000-01-01"}, 3),
])
def test_a_few_queries_each(q, count_queries, name, kwargs, most):
    getattr(frames, name)(q, **kwargs)
    assert 1 <= len(count_queries) <= most, count_queries


def test_determinism_of_seeded_batches(tmp_path):
    """The same seeded batch in two fresh ledgers gives the same retry distribution."""
    dists = []
    for run in ("a", "b"):
        home = tmp_path / run
        with qkit.connect(home=home, backoff_base=0.0) as q:
            try:
                q.enqueue_many(seeded_batch("mixed", 80, fail_rate=0.4, latency_ms=0, seed=7))
                drain(q)
                dists.append(frames.retry_distribution(q))
            finally:
                EmbeddedServer(home).stop()
    pd.testing.assert_frame_equal(dists[0], dists[1])
    assert dists[0]["jobs"].sum() == 80 and (dists[0]["outcome"] == "dlq").any()


# ---------------------------------------------------------------- plots
def _check_figure(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    title = fig._suptitle.get_text() if fig._suptitle is not None else fig.axes[0].get_title()
    assert title
    visible = [ax for ax in fig.axes if ax.get_visible() and (ax.get_xticks().size or ax.get_yticks().size)]
    for ax in visible:
        assert ax.get_xlabel() or ax.get_ylabel(), ax
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def _figures(q):
    res = whatif.simulate_queue(q, ["current", "immediate x1", "exponential 1s..30s x5"])
    return [
        plots.retry_distribution(frames.retry_distribution(q)),
        plots.success_rate(frames.type_summary(q)),
        plots.exec_time(frames.exec_times(q)),
        plots.attempt_outcomes(frames.attempt_outcomes(q)),
        plots.queue_depth(frames.queue_depth(q)),
        plots.throughput(frames.throughput(q)),
        plots.wait_times(frames.wait_times(q)),
        plots.runs(frames.runs(q)),
        plots.dlq_groups(frames.dlq_groups(q)),
        plots.whatif(res.summary),
    ]


def test_plots_with_data(q):
    for fig in _figures(q):
        _check_figure(fig)
    # labelled with units
    assert "(ms)" in plots.exec_time(frames.exec_times(q)).axes[0].get_ylabel()
    assert "(s)" in plots.wait_times(frames.wait_times(q)).axes[0].get_ylabel()


def test_plots_of_an_empty_queue(tmp_path):
    home = tmp_path / "home"
    with qkit.connect(queue="empty", home=home) as q:
        try:
            for fig in _figures(q):
                _check_figure(fig)
        finally:
            EmbeddedServer(home).stop()


# ---------------------------------------------------------------- SQL aggregates = the rows, on both ledgers
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def synthetic(request, tmp_path_factory):
    """bench/analyst_scale.py's synthetic ledger at 3,000 jobs (retries, DLQ, pending, an early spike)."""
    from types import SimpleNamespace

    from bench.analyst_scale import build
    from qkit.ledger import Ledger

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('synthetic') / 'ledger.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_server").database("synthetic")
    built = build(url, 3000, seed=5)
    q = SimpleNamespace(name="default", ledger=Ledger(url))
    q.built = built
    yield q
    q.ledger.close()


def test_sql_aggregates_match_the_rows(synthetic):
    q = synthetic
    jobs, att, ev = frames.jobs(q), frames.attempts(q), frames.events(q)
    assert len(jobs) == 3000 and len(att) == q.built["job_attempts"] and len(ev) == q.built["job_events"]
    dist = frames.retry_distribution(q)
    got = dist.assign(status=dist["outcome"].map({"completed": "completed", "dlq": "failed"})) \
        .set_index(["type", "status", "attempts"])["jobs"].sort_index().to_dict()
    done = jobs[jobs["status"].isin(["completed", "failed"])]
    assert got == done.groupby(["type", "status", "attempts"]).size().sort_index().to_dict()
    out = frames.attempt_outcomes(q).set_index(["type", "attempt"])
    assert out["attempts"].to_dict() == att.groupby(["type", "attempt"]).size().to_dict()
    ok = att[att["outcome"] == "completed"]
    assert out["completed"].sum() == len(ok)
    ex = frames.exec_times(q).set_index(["type", "group"])
    for t, g in ok.groupby("type"):
        for p in (25, 50, 90):  # a ~5% histogram: within 6% of the exact percentile
            assert ex.loc[(t, "completed"), f"p{p}_ms"] == pytest.approx(g["duration_ms"].quantile(p / 100), rel=0.06)
        assert ex.loc[(t, "completed"), "mean_ms"] == pytest.approx(g["duration_ms"].mean())
    s = frames.type_summary(q).set_index("type")
    assert s["attempts"].to_dict() == att.groupby("type").size().to_dict()
    w = frames.wait_times(q).set_index("priority")
    wait = (jobs["started_at"] - jobs["created_at"]).dt.total_seconds()
    assert w["jobs"].to_dict() == jobs.groupby("priority").size().to_dict()
    assert w["claimed"].to_dict() == wait.notna().groupby(jobs["priority"]).sum().to_dict()
    assert w["waiting"].sum() == (jobs["status"] == "pending").sum() > 0
    for prio, g in wait.groupby(jobs["priority"]):
        assert w.loc[prio, "wait_p50_s"] == pytest.approx(g.median(), rel=0.06)
        assert w.loc[prio, "wait_max_s"] == pytest.approx(g.max(), abs=2e-3)
    tp = frames.throughput(q)
    assert tp.to_numpy().sum() == len(att) and len(tp) <= 61
    depth = frames.queue_depth(q)
    counts = jobs["status"].value_counts()
    assert depth.iloc[-1].to_dict() == {"pending": counts["pending"], "delayed": 0, "processing": 0,
                                        "completed": counts["completed"], "failed": counts["failed"],
                                        "cancelled": 0}
    freq = pd.Timedelta(depth.attrs["freq"])
    finished = ev[ev["event"] == "completed"]["at"]
    for at in depth.index[::7]:
        assert depth.loc[at, "completed"] == (finished < at + freq).sum()
    # filters: a type, a priority, a creation window, a seeded batch
    one = frames.retry_distribution(q, type="web_scraping", priority=5)
    assert one["jobs"].sum() == len(done[(done["type"] == "web_scraping") & (done["priority"] == 5)])
    mid = jobs["created_at"].sort_values().iloc[1500]
    assert frames.type_summary(q, since=mid)["jobs"].sum() == (jobs["created_at"] >= mid).sum()
    assert frames.type_summary(q, until=mid)["jobs"].sum() == (jobs["created_at"] < mid).sum()
    assert frames.type_summary(q, seed=2)["jobs"].sum() == 1500
    assert frames.queues(q) == ["default"] and frames.choices(q)["priority"] == [0, 5, 10]


def test_intervals():
    from qkit.analysis.stats import mean_interval, quantile_interval, wilson

    lo, hi = wilson([0, 5, 10], [10, 10, 10])
    assert lo[0] == 0 and hi[0] == pytest.approx(0.2775, abs=1e-4)  # Wilson 1927, z = 1.96
    assert [float(lo[1]), float(hi[1])] == pytest.approx([0.2366, 0.7634], abs=1e-4) and hi[2] == pytest.approx(1)
    mean, mlo, mhi = mean_interval(4, 1 + 2 + 3 + 4, 1 + 4 + 9 + 16)
    assert mean == 2.5 and mhi - mean == pytest.approx(1.96 * (5 / 3 / 4) ** 0.5, rel=1e-3)
    est, qlo, qhi = quantile_interval(list(range(1, 101)), [1] * 100, 0.5)
    assert (est, qlo, qhi) == (50, 41, 60)  # ranks 50 -+ 1.96 * sqrt(100 * 0.25), rounded up
