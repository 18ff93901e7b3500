"""The notebooks: committed clean, parameters validated, and the pipeline run through papermill.

Each papermill run here starts a real kernel (``python3``, this interpreter)
on a fresh ``QKIT_HOME`` with the embedded backend.  ``pytest --nbval-lax
notebooks/`` separately runs every notebook with its defaults.
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import papermill as pm
import pytest

import qkit
from qkit.analysis import debug, frames
from qkit.backends.embedded import EmbeddedServer
from qkit.analysis.notebook_helpers import (INJECTED_MARKER, JOB_IDS, QUEUE, SINCE, Param, ParameterError,
                           check_params, injected_parameters, read_records, seeded_batch)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["enqueue_batch", "worker", "retry_analysis", "dlq_triage", "queue_monitor", "backoff_whatif", "debug_job",
         "compare_runs"]


# ---------------------------------------------------------------- committed notebooks
def test_all_notebooks_exist():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean(name):
    """No outputs, no execution counts, no papermill metadata; kernel python3; parameters then validation."""
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec == {"name": "python3", "display_name": "Python 3", "language": "python"}
    assert "papermill" not in nb.metadata
    for cell in nb.cells:
        assert "papermill" not in cell.metadata, f"{name}: papermill metadata in a cell"
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: committed with outputs: {cell.source[:60]!r}"
            assert cell.execution_count is None, f"{name}: committed with an execution count"
            assert "injected-parameters" not in cell.metadata.get("tags", [])
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [0], f"{name}: the first code cell, and only it, is tagged parameters"
    assert not code[0].source.lstrip().startswith(INJECTED_MARKER)
    # the first cell after the parameters validates them with one qkit helper
    assert "check_params(globals()" in code[1].source
    # papermill --help-notebook documents every parameter: a type and a comment each
    params = pm.inspect_notebook(str(path))
    lines = [ln for ln in code[0].source.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(params) == len(lines) > 0
    for pname, info in params.items():
        assert info["inferred_type_name"] not in ("None", ""), f"{name}.{pname}: no type annotation"
        assert info["help"], f"{name}.{pname}: no comment"
        assert f'"{pname}"' in code[1].source, f"{name}.{pname}: not validated"
        assert not any(w in pname for w in ("secret", "token", "password")), f"{name}.{pname}: a secret?"


def test_a_notebook_saved_with_outputs_is_committed_stripped(tmp_path):
    """The repository's git filter (.gitattributes + scripts/nbstripout.sh) strips what Lab and papermill add."""
    import json
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    shutil.copy(ROOT / ".gitattributes", repo / ".gitattributes")
    subprocess.run(["bash", str(ROOT / "scripts" / "nbstripout.sh"), str(repo)], check=True)
    nb = nbformat.read(NOTEBOOKS / "worker.ipynb", as_version=4)
    ids = [c.id for c in nb.cells]
    nb.metadata["papermill"] = {"parameters": {"max_jobs": 5}}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = n + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="processed 5\n"),
                        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})]
        cell.metadata["execution"] = {"iopub.status.busy": "2025-01-01T00:00:00Z"}
        cell.metadata["papermill"] = {"duration": 1.0}
    nbformat.write(nb, repo / "notebooks" / "worker.ipynb")
    subprocess.run(["git", "-C", str(repo), "add", "notebooks/worker.ipynb"], check=True)
    staged = json.loads(subprocess.run(["git", "-C", str(repo), "show", ":notebooks/worker.ipynb"], check=True,
                                       capture_output=True, text=True).stdout)
    assert "papermill" not in staged["metadata"] and "widgets" not in staged["metadata"]
    assert [c["id"] for c in staged["cells"]] == ids  # cell ids kept: no churn on each save
    for cell in staged["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            assert not {"execution", "papermill"} & set(cell["metadata"])
    # the working copy keeps its outputs: only what is committed is stripped
    assert nbformat.read(repo / "notebooks" / "worker.ipynb", as_version=4).cells[2].outputs


# ---------------------------------------------------------------- check_params
def namespace(injected: str | None = None, **values) -> dict:
    history = ["", "x: int = 1  # defaults"]
    if injected is not None:
        history.append(injected)
    history.append("check_params(globals(), ...)")
    return {"In": history, **values}


def test_injected_parameters_come_from_the_injected_cell():
    ns = namespace("# Parameters\nn_jobs = 5\nqueue = \"q1\"\n", n_jobs=5, queue="q1", other=3)
    assert injected_parameters(ns) == {"n_jobs": 5, "queue": "q1"}
    assert injected_parameters(namespace(None, n_jobs=5)) == {}
    assert injected_parameters({}) == {}


def test_check_params_accepts_and_converts():
    ns = namespace("# Parameters\nfail_rate = 0\nreplay_ids = \"[3, 4]\"\n", fail_rate=0, replay_ids="[3, 4]",
                   queue="default", since="", flag=False)
    got = check_params(ns, {"fail_rate": Param(float, 0, 1), "replay_ids": JOB_IDS, "queue": QUEUE, "since": SINCE,
                            "flag": bool})
    assert got == {"fail_rate": 0.0, "replay_ids": [3, 4], "queue": "default", "since": "", "flag": False}
    assert isinstance(ns["fail_rate"], float) and ns["replay_ids"] == [3, 4]  # written back


def test_check_params_reports_every_problem_at_once():
    ns = namespace("# Parameters\nn_jobs = 0\nbogus = 1\nqueue = 7\n", n_jobs=0, bogus=1, queue=7,
                   flag="true", when="yesterday-ish", ids="[1, -2]", kind="purple")
    with pytest.raises(ParameterError) as err:
        check_params(ns, {"n_jobs": Param(int, 1, 100), "queue": QUEUE, "flag": Param(bool), "when": SINCE,
                          "ids": JOB_IDS, "kind": Param(str, choices=["red", "blue"]), "missing": int})
    text = str(err.value)
    for expected in ("unknown parameter(s) bogus", "n_jobs value 0 is below the minimum 1",
                     "queue must be a string", "-r", "flag must be True or False", "when:", "ids:",
                     "kind must be one of", "missing is not defined"):
        assert expected in text, (expected, text)


def test_check_params_refuses_secrets(monkeypatch):
    monkeypatch.setenv("WORKER_SECRET", "s3cr3t-value")
    with pytest.raises(ParameterError, match="secrets must not be notebook parameters"):
        check_params(namespace("# Parameters\napi_token = \"x\"\n", api_token="x", queue="default"),
                     {"queue": QUEUE})
    with pytest.raises(ParameterError, match="secret environment variable"):
        check_params(namespace("# Parameters\nqueue = \"s3cr3t-value\"\n", queue="s3cr3t-value"),
                     {"queue": Param(str)})


def test_seeded_batch_is_reproducible_and_checked():
    a = seeded_batch("mixed", 30, seed=5)
    assert a == seeded_batch("mixed", 30, seed=5) and a != seeded_batch("mixed", 30, seed=6)
    assert {b["type"] for b in a} <= {"ai_text_generation", "ai_image_generation", "web_scraping",
                                      "scheduled_publish"}
    assert all(b["payload"]["simulate"]["fail_rate"] + b["payload"]["simulate"]["timeout_rate"] <= 0.95 for b in a)
    assert {b["type"] for b in seeded_batch("web_scraping", 5)} == {"web_scraping"}
    with pytest.raises(qkit.BadInput):
        seeded_batch("nope", 5)


# ---------------------------------------------------------------- papermill runs
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A fresh QKIT_HOME that kernels started from this process use; retries wait 50 ms."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("notebooks")
    home = base / "home"
    for name in ("QKIT_REDIS_URL", "UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN", "QKIT_DATABASE_URL",
                 "QKIT_HANDLERS"):
        mp.delenv(name, raising=False)
    mp.setenv("QKIT_HOME", str(home))
    mp.setenv("QKIT_BACKOFF_BASE", "0.05")
    mp.setenv("MPLBACKEND", "Agg")
    mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    yield base
    EmbeddedServer(home).stop()
    mp.undo()


def run_notebook(name: str, out_dir: Path, **parameters) -> nbformat.NotebookNode:
    out = out_dir / f"{name}-{len(list(out_dir.glob(name + '-*')))}.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=parameters, kernel_name="python3",
                        cwd=str(NOTEBOOKS), progress_bar=False)
    return nbformat.read(out, as_version=4)


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def pipeline(lab):
    """enqueue 60 jobs (40% failing) -> worker notebook until drained -> retry analysis."""
    started = datetime.now(timezone.utc)
    enq = run_notebook("enqueue_batch", lab, n_jobs=60, fail_rate=0.4, latency_ms=0, seed=3)
    ids = read_records(enq)["job_ids"]
    q = qkit.connect()
    workers = []
    deadline = time.monotonic() + 120
    while True:
        counts = q.ledger.status_counts(q.name)
        if counts["pending"] + counts["processing"] == 0:
            break
        assert time.monotonic() < deadline, counts
        if counts["due"] == 0:
            due = frames.next_due(q)
            time.sleep(0.05 if due is None else min(2.0, max(0.0, (due - datetime.now(timezone.utc))
                                                             .total_seconds()) + 0.02))
            continue
        workers.append(run_notebook("worker", lab, max_seconds=30.0))
    analysis = run_notebook("retry_analysis", lab, since=started.isoformat())
    yield {"q": q, "ids": ids, "workers": workers, "analysis": analysis, "out": lab}
    q.close()


def test_pipeline_ledger(pipeline):
    q, ids = pipeline["q"], pipeline["ids"]
    assert len(ids) == 60 and ids == sorted(ids)
    jobs = frames.jobs(q)
    assert sorted(jobs["id"]) == ids
    assert set(jobs["status"]) <= {"completed", "failed"} and (jobs["status"] == "failed").any()
    att = frames.attempts(q)
    assert len(att) == jobs["attempts"].sum() > 60  # some retries happened
    assert att["outcome"].notna().all()
    runs = frames.runs(q)
    assert len(runs) == len(pipeline["workers"]) >= 1
    assert (runs["trigger"] == "notebook").all() and (runs["status"] == "ok").all()
    assert sum(read_records(nb)["summary"]["processed"] for nb in pipeline["workers"]) == len(att)


def test_pipeline_analysis_has_its_figures(pipeline):
    nb = pipeline["analysis"]
    assert images(nb) >= 4
    assert nb.metadata.papermill.parameters["since"]
    q = pipeline["q"]
    recorded = read_records(nb)["retry_distribution"]
    expected = frames.retry_distribution(q).to_dict("records")
    assert [{k: v for k, v in r.items() if k != "share"} for r in recorded] == \
        [{k: v for k, v in r.items() if k != "share"} for r in expected]
    assert [r["share"] for r in recorded] == pytest.approx([r["share"] for r in expected])


def test_worker_progress_is_plain_stdout_not_an_error_box(pipeline):
    """papermill shows stderr as a red box: the burst's progress goes to stdout as text."""
    for nb in pipeline["workers"]:
        streams = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"]
        assert not [o for o in streams if o.name == "stderr"], [o.text[:200] for o in streams]
        assert any("job" in o.text and "queue default" in o.text for o in streams)


def test_filters_and_a_mistyped_queue(pipeline):
    lab = pipeline["out"]
    one = run_notebook("retry_analysis", lab, job_type="web_scraping", priority=0)
    dist = read_records(one)["retry_distribution"]
    assert dist and {r["type"] for r in dist} == {"web_scraping"}
    assert sum(r["jobs"] for r in dist) == frames.retry_distribution(pipeline["q"], type="web_scraping")["jobs"].sum()
    with pytest.raises(pm.PapermillExecutionError) as err:
        run_notebook("queue_monitor", lab, queue="defualt")
    assert err.value.ename == "ParameterError" and "its queues: default" in err.value.evalue


def test_compare_runs_of_two_batches(pipeline):
    """compare_runs by seed: the rates and their Wilson intervals are those of the two batches' rows."""
    q, lab = pipeline["q"], pipeline["out"]
    q.enqueue_many(seeded_batch("mixed", 40, fail_rate=0.0, latency_ms=0, seed=99))  # a batch that never fails
    deadline = time.monotonic() + 60
    while q.ledger.status_counts(q.name)["pending"]:
        q.work(max_seconds=10)
        assert time.monotonic() < deadline
    nb = run_notebook("compare_runs", lab, a_seed=3, b_seed=99)
    rows = {(r["type"], r["measure"]): r for r in read_records(nb)["compare"]}
    jobs = frames.jobs(q, payload=True)
    seed = jobs["payload"].map(lambda p: p.get("seed"))
    a = jobs[(seed == 3) & jobs["status"].isin(["completed", "failed"])]
    both = rows[("(all types)", "success rate")]
    assert both["a_n"] == len(a) and both["a"] == pytest.approx((a["status"] == "completed").mean())
    assert both["b_n"] == 40 and both["b"] == 1.0 and both["b_low"] < 1.0
    assert both["a_low"] < both["a"] < both["a_high"] and both["verdict"] == "clear increase"
    tries = rows[("(all types)", "attempts per finished job")]
    assert tries["a"] == pytest.approx(a["attempts"].mean()) and tries["b"] == 1.0
    assert images(nb) == 1


def test_reports_keep_their_history(pipeline, tmp_path):
    """Each scheduled report has its own folder; reports/index.html lists them newest first with links."""
    import re

    from qkit.runs import reports

    first = reports.publish(queue="default", reports=tmp_path / "reports", runs_dir=tmp_path / "runs")
    second = reports.publish(queue="default", since=datetime(2000, 1, 1, tzinfo=timezone.utc),
                             reports=tmp_path / "reports", runs_dir=tmp_path / "runs")
    assert first.parent != second.parent and first.is_file() and second.is_file()
    assert first.parent.parent.name == datetime.now(timezone.utc).strftime("%Y-%m-%d")
    index = (tmp_path / "reports" / "index.html").read_text()
    links = re.findall(r'href="([^"]+)"', index)
    assert links == [second.relative_to(tmp_path / "reports").as_posix(),
                     first.relative_to(tmp_path / "reports").as_posix()]  # newest first
    assert "window 2000-01-01" in index and "data:image/png;base64" in second.read_text()


def test_unknown_and_mistyped_parameters_fail_the_run(lab):
    with pytest.raises(pm.PapermillExecutionError) as err:
        run_notebook("enqueue_batch", lab, n_jobs="many", bogus=1)
    assert err.value.ename == "ParameterError"
    assert "unknown parameter(s) bogus" in err.value.evalue and "n_jobs must be an integer" in err.value.evalue


def test_whatif_monitor_debug_and_dlq_notebooks_on_the_pipeline(pipeline):
    q, lab = pipeline["q"], pipeline["out"]
    wi = run_notebook("backoff_whatif", lab, policies=["current", "fixed 1s x1", "exponential 1s..30s x5"])
    summary = {r["policy"]: r for r in read_records(wi)["whatif_summary"]}
    counts = q.ledger.status_counts(q.name)
    assert summary["current"]["dlq"] == counts["failed"] and summary["recorded"]["completed"] == counts["completed"]
    assert summary["exponential 1s..30s x5"]["dlq"] <= counts["failed"] and images(wi) == 1
    mon = run_notebook("queue_monitor", lab)
    assert images(mon) == 4
    for nb in (wi, mon, pipeline["analysis"]):  # papermill shows stderr as a red box: nothing may land there
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stderr"]
    dead = q.dead()
    target = dead[0].id
    dbg = run_notebook("debug_job", lab, job_id=target)
    assert f"{target}" in read_records(dbg)["verdict"]  # explain's verdict, as the README says
    rerun = read_records(dbg)["rerun"]
    assert rerun["job_id"] == target and rerun["ok"] is False and "Simulated" in rerun["error"]
    tri = run_notebook("dlq_triage", lab, replay_ids=f"[{target}]")  # -p style: a JSON string
    assert read_records(tri)["replayed"] == [target] and images(tri) == 1
    job = q.get(target)
    assert (job.status, job.epoch, job.attempts) == ("pending", 1, 0)
    group = frames.dlq_groups(q).iloc[0]
    tri = run_notebook("dlq_triage", lab, replay_group=group["fingerprint_id"])
    assert sorted(read_records(tri)["replayed"]) == sorted(group["job_ids"])


# ---------------------------------------------------------------- qkit.analysis.debug
@pytest.fixture
def dq(tmp_path):
    home = tmp_path / "home"
    q = qkit.connect(queue="debug", home=home, backoff_base=0.0)
    yield q
    q.close()
    EmbeddedServer(home).stop()


def snapshot(q) -> tuple:
    inv = q.dispatch.inventory()
    frames_now = [frames.jobs(q, payload=True), frames.attempts(q, traceback=True), frames.events(q),
                  frames.runs(q).drop(columns=["run_id"])]
    return (*(f.to_json(date_format="iso") for f in frames_now),
            (inv.ready, inv.delayed, inv.leased, inv.dead))


def test_rerun_changes_neither_ledger_nor_redis(dq):
    q = dq
    bad = q.enqueue("web_scraping", {"simulate": {"fail_rate": 1.0}}, max_attempts=2)
    good = q.enqueue("ai_text_generation", {"prompt": "hello world"})
    waiting = q.enqueue("scheduled_publish", {}, delay=300)
    q.work()
    assert q.get(bad).status == "failed" and q.get(good).status == "completed"
    before = snapshot(q)
    r = debug.rerun(q, bad)
    assert (r.ok, r.attempt) == (False, 2) and r.error.startswith("SimulatedFailure")
    assert "attempt 2" in r.error and "Traceback" in r.traceback
    ok = debug.rerun(q, good, attempt=1)
    assert ok.ok and ok.result["text"].startswith("Generated text for: hello world")
    assert debug.rerun(q, waiting).ok
    with pytest.raises(Exception, match="simulated upstream error"):
        debug.rerun(q, bad, raise_errors=True)
    assert snapshot(q) == before
    report = debug.report(q, bad)
    assert len(report["attempts"]) == 2 and report["attempts"]["traceback"].notna().all()
    assert report["events"]["event"].tolist()[0] == "enqueued"


def test_pick_job(dq):
    q = dq
    demo = debug.pick_job(q, 0)  # empty queue: a demo job, run once
    job = q.get(demo)
    assert job.status == "failed" and job.attempts == 1
    assert frames.attempts(q, traceback=True)["traceback"].notna().all()
    newer = q.enqueue("web_scraping", {})
    assert debug.pick_job(q, 0) == demo  # the newest failed job first
    assert debug.pick_job(q, newer) == newer
    with pytest.raises(qkit.NotFound):
        debug.pick_job(q, 99999)


# ---------------------------------------------------------------- the control bar, without a browser
def test_live_mode_refreshes_then_stops_by_itself(dq, monkeypatch):
    """Live mode redraws on the event loop's schedule, keeps the loop free, and ends after live_for."""
    import asyncio

    from qkit.analysis import frames, plots
    from qkit.analysis.notebook_controls import Controls

    monkeypatch.setenv("QKIT_WIDGETS", "1")  # the widgets, as in Lab
    q = dq
    q.enqueue_many(seeded_batch("mixed", 20, fail_rate=0.0, latency_ms=0, seed=1))
    q.work()

    async def scenario():
        controls = Controls(q, live=True, every=0.2, live_for=4.0)
        controls.render(lambda f: [plots.throughput(frames.throughput(f.q, **f.series))])
        area = controls.views[0][1]
        assert area.value.startswith("<img") and controls.redraws == 0
        controls.w_live.value = True  # the Live button
        ticks = 0
        while controls._task is not None:  # the loop stays free while live: this coroutine keeps running
            ticks += 1
            await asyncio.sleep(0.05)
        return controls, ticks

    controls, ticks = asyncio.run(scenario())
    assert controls.redraws >= 2 and ticks >= 10  # redrawn more than once, the loop free meanwhile
    assert controls.w_live.value is False and controls.w_live.description == "Live"  # stopped by itself
    assert "live" not in controls.status.value


def test_a_mistyped_queue_names_the_queues(dq):
    from qkit.analysis.notebook_helpers import ParameterError
    from qkit.analysis.notebook_controls import check_queue

    dq.enqueue("web_scraping", {})
    assert check_queue(dq) == ["debug"]
    with qkit.connect(queue="debgu", home=dq.settings.home) as other:
        with pytest.raises(ParameterError, match="queue 'debgu' has no jobs or worker runs in this ledger; "
                                                 "its queues: debug"):
            check_queue(other)
