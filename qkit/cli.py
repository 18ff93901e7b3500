"""The ``qkit`` command line (docs/semantics.md#interfaces; exit statuses: docs/semantics.md#bad-input-and-caps).

Exit status: 0 done; 2 bad usage or bad input (one line on stderr); 1 a
runtime failure (one line on stderr).  ``--json`` prints one JSON document.
No traceback reaches the user unless ``QKIT_DEBUG=1``.
"""
from __future__ import annotations

import json
import os
import sys

import click

import qkit
from qkit import extras
from qkit.config import redact
from qkit.errors import QkitError
from qkit.ledger import LedgerFailure
from qkit.cli_common import JOB_ID, _open, emit, job_queue_option, json_option, open_job_queue, queue_option
from qkit.model import parse_json_object, read_json_file


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(qkit.__version__, prog_name="qkit")
def cli() -> None:
    """qkit: a Redis priority job queue with leases, retries, a DLQ and a SQL ledger."""


@cli.command()
@queue_option
def init(queue: str) -> None:
    """Create or upgrade the ledger tables and check both backends."""
    with _open(queue) as q:
        version = q.ledger.init_schema()
        q.backend.ping()
        click.echo(f"ledger: {q.ledger.describe()} (schema v{version})")
        click.echo(f"redis:  {q.backend.describe()} (reachable)")
        server = getattr(q.backend, "server", None)
        if server is not None:  # the embedded server: which process, where, how long it lives
            click.echo(f"server: {server.describe()}")


def _parse_payload(text: str | None) -> dict:
    """``--payload``: JSON object text, or ``@file`` read bounded (qkit.model checks both the same way)."""
    if text is None:
        return {}
    if text.startswith("@"):
        return read_json_file(text[1:], "--payload")
    return parse_json_object(text, "--payload")


@cli.command()
@click.argument("type")
@click.option("--payload", help="JSON object, or @file.json.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--max-attempts", type=int, default=3, show_default=True)
@click.option("--delay", type=float, default=0.0, show_default=True, help="Seconds before it is due.")
@click.option("--key", default=None, help="Idempotency key.")
@queue_option
@json_option
def enqueue(type: str, payload: str | None, priority: int, max_attempts: int, delay: float,
            key: str | None, queue: str, as_json: bool) -> None:
    """Enqueue one job; prints its id (warns on stderr when no worker knows its type)."""
    from qkit.ops.handled import unknown_type_warning

    body = _parse_payload(payload)
    with _open(queue) as q:
        job_id, created = q.enqueue_result(type, body, priority=priority, max_attempts=max_attempts, delay=delay,
                                           key=key)
        warning = unknown_type_warning(q, type)
        status = None if created else q.get(job_id).status
    if warning:
        click.echo(f"qkit: {warning}", err=True)
    if not created:  # the id on stdout as ever (scripts read it), what happened on stderr
        click.echo(f"qkit: duplicate: idempotency key {key!r} is held by job {job_id} ({status}); "
                   "nothing new was enqueued", err=True)
    emit({"id": job_id, "duplicate": not created}, as_json, lambda d: str(d["id"]))


@cli.command()
@click.option("--max-jobs", type=click.IntRange(min=1), default=None, help="Stop after N jobs.")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop claiming after S seconds.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Handler threads (for I/O-bound handlers).")
@click.option("--forever", is_flag=True, help="Keep running: sleep until work is due (SIGTERM drains and stops).")
@click.option("--idle-seconds", type=click.FloatRange(0.05, 3600), default=None,
              help="--forever: longest sleep without a claim [60 s subscribed; 5 s on Upstash, which polls].")
@click.option("--progress-seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="When stderr is not a terminal: a progress line this often (on a terminal: a bar).")
@queue_option
@json_option
def work(max_jobs: int | None, max_seconds: float | None, concurrency: int, forever: bool,
         idle_seconds: float | None, progress_seconds: float, queue: str, as_json: bool) -> None:
    """Run one worker burst (or, with --forever, a long-running worker); prints a summary."""
    if sys.stderr.isatty():
        from tqdm import tqdm  # a bar on a terminal only: tqdm's import is a worker's start-up time

        bar = tqdm(total=max_jobs, unit="job", desc=f"burst {queue}", file=sys.stderr)
    else:
        from qkit.cli_common import ProgressLines

        bar = ProgressLines(f"burst on queue {queue!r}", progress_seconds)
    with _open(queue) as q, bar:
        summary = q.work(max_jobs=max_jobs, max_seconds=max_seconds, concurrency=concurrency,
                         trigger="cli", progress=bar, forever=forever, idle_seconds=idle_seconds)
    emit(summary.to_dict(), as_json, _summary_human)


def _summary_human(d: dict) -> str:
    line = (f"worker {d['worker']}: processed {d['processed']} (completed {d['completed']}, retried {d['retried']}, "
            f"failed {d['failed']}, lost {d['lost']}" + (f", released unrun {d['released']}" if d["released"] else "")
            + f") in {d['seconds']:.2f} s; stopped: {d['stopped_by']}")
    if d.get("waiting_retry"):
        line += f"\n{d['waiting_retry']} waiting for retry, next due in {d['next_retry_s']:.1f} s"
    return line


def _job_human(d: dict) -> str:
    lines = [f"job {d['id']} [{d['queue']}] {d['type']}: {d['status']} "
             f"(attempts {d['attempts']}/{d['max_attempts']}, priority {d['priority']})"]
    if d.get("progress") is not None:
        lines.append(f"  progress: {d['progress']:.0%}" + (f" - {d['progress_note']}" if d.get("progress_note") else "")
                     + f" (at {d['progress_at']})")
    if d.get("error"):
        lines.append(f"  error: {d['error']}")
    if d.get("result") is not None:
        lines.append(f"  result: {json.dumps(d['result'], ensure_ascii=False)[:200]}")
    for a in d.get("attempts_detail", []):
        lines.append(f"  attempt {a['attempt']} (epoch {a['epoch']}) by {a['worker']}: {a['outcome'] or 'running'}"
                     + (f" in {a['duration_ms']:.1f} ms" if a.get("duration_ms") is not None else "")
                     + (f" - {a['error']}" if a.get("error") else "")
                     + (f" (retry asked after {a['retry_after_ms'] / 1000:g} s)" if a.get("retry_after_ms") is not None
                        else ""))
    return "\n".join(lines)


@cli.command()
@click.argument("job_id", type=JOB_ID)
@job_queue_option
@json_option
def job(job_id: int, queue: str | None, as_json: bool) -> None:
    """Show one job with its attempts (in whatever queue holds it)."""
    with open_job_queue(job_id, queue) as q:
        data = q.get(job_id).to_dict()
        data["attempts_detail"] = [{k: v for k, v in a.items() if k != "traceback"} for a in q.ledger.attempts(job_id)]
    emit(data, as_json, _job_human)


@cli.group()
def dev() -> None:
    """Developer tools."""


@dev.command("upstash")
@click.option("--redis-url", required=True, help="The Redis the endpoint forwards to.")
@click.option("--token", envvar="UPSTASH_REDIS_REST_TOKEN", required=True,
              help="Bearer token clients must send (default: $UPSTASH_REDIS_REST_TOKEN).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8079, show_default=True)
@click.option("--latency-ms", type=float, default=0.0, show_default=True, help="Injected delay per request.")
def dev_upstash(redis_url: str, token: str, host: str, port: int, latency_ms: float) -> None:
    """Serve a local Upstash-compatible REST endpoint in front of a real Redis."""
    from qkit.dev.upstash import serve

    serve(redis_url, token, host=host, port=port, latency_ms=latency_ms)


@dev.command("stop-embedded")
def dev_stop_embedded() -> None:
    """Stop the embedded Redis of QKIT_HOME (its data stays on disk)."""
    from qkit.backends.embedded import EmbeddedServer
    from qkit.config import default_home

    home = default_home()
    pid = EmbeddedServer(home).stop()
    click.echo(f"stopped embedded server pid {pid} (home {home})" if pid else
               f"no embedded server running for {home}")


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@queue_option
def serve_command(host: str, port: int, queue: str) -> None:
    """Serve the HTTP API (docs/http-api.md) until interrupted.

    Closed by default: /api/jobs* need QKIT_API_TOKEN and /api/workers needs
    WORKER_SECRET (or QStash signing keys); while unset they answer 503.
    """
    extras.require("qkit serve", "starlette", "uvicorn", "jwt")
    from qkit.api import serve as serve_api

    serve_api(host=host, port=port, queue=queue)


@cli.command("lab")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8888, show_default=True, help="0: a free port.")
@click.option("--browser/--no-browser", default=False, show_default=True, help="Open a web browser too.")
@click.option("--dir", "folder", type=click.Path(file_okay=False), default=None,
              help="Folder to open (default: the project's notebooks/).")
def lab_command(host: str, port: int, browser: bool, folder: str | None) -> None:
    """JupyterLab on notebooks/ with this project's QKIT_* settings; prints the URL (qkit/lab.py)."""
    extras.require("qkit lab", "jupyterlab", "ipykernel")
    from qkit.lab import run_lab

    sys.exit(run_lab(host=host, port=port, open_browser=browser, notebooks=folder, say=click.echo))


@cli.command()
@click.argument("job_id", type=JOB_ID)
@job_queue_option
@json_option
def explain(job_id: int, queue: str | None, as_json: bool) -> None:
    """Why is this job where it is: ledger row, attempts, events, Redis state, verdict."""
    from qkit.ops.explain import explain as explain_job

    with open_job_queue(job_id, queue) as q:
        exp = explain_job(q, job_id)
    emit(exp.to_dict(), as_json, lambda _d: str(exp))


@cli.command()
@click.option("--repair", is_flag=True, help="Fix what drifted (push, dead-letter, drop stale entries, rebuild).")
@queue_option
@json_option
def audit(repair: bool, queue: str, as_json: bool) -> None:
    """Check that Redis and the ledger agree and the ledger keeps its invariants (exit 1 if errors remain)."""
    from qkit.ops.audit import audit as run_audit

    with _open(queue) as q:
        report = run_audit(q, repair=repair)
    emit(report.to_dict(), as_json, lambda _d: report.summary())
    if not report.clean:
        raise QkitError(f"audit: {len(report.errors)} error(s) remain in queue {queue!r}"
                        + ("" if repair else " (qkit audit --repair fixes the Redis side)"))


@cli.command()
@click.option("--completed-older-than", "older_than", required=True, metavar="AGE",
              help="Prune completed jobs that finished before midnight UTC of the day AGE ago (30d, 12h, 2w).")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True)
@click.option("--dry-run", is_flag=True, help="Only count what would be pruned.")
@queue_option
@json_option
def prune(older_than: str, batch_size: int, dry_run: bool, queue: str, as_json: bool) -> None:
    """Delete old completed jobs (rows, attempts, events), keeping daily roll-ups; never the DLQ."""
    from qkit.ops.retention import prune as prune_queue

    with _open(queue) as q:
        report = prune_queue(q, older_than, batch_size=batch_size, dry_run=dry_run)
    emit(report.to_dict(), as_json, lambda d: (
        f"{'would prune' if d['dry_run'] else 'pruned'} {d['jobs']} completed job(s) finished before "
        f"{d['cutoff'][:10]} ({d['attempts']} attempts, {d['events']} events"
        + (f", {d['batches']} batch(es)" if not d["dry_run"] else "") + "); days: "
        + (", ".join(d["days"]) or "none")))


from qkit import cli_schedules  # noqa: E402,F401 - registers `qkit schedule` and `qkit tick` on the group
# cancel, pause, resume, promote (qkit/cli_controls.py)
from qkit.cli_controls import COMMANDS as _CONTROL_COMMANDS  # noqa: E402

for _command in _CONTROL_COMMANDS:
    cli.add_command(_command)
from qkit.cli_dlq import dlq  # noqa: E402 - command groups live in their own modules
from qkit.cli_jobs import COMMANDS as VIEWS  # noqa: E402

for command in [dlq, *VIEWS]:
    cli.add_command(command)

from qkit.cli_limits import limit  # noqa: E402 - limits per type (qkit/cli_limits.py)

cli.add_command(limit)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning every error into one line and an exit status."""
    try:
        cli.main(args=argv, prog_name="qkit", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.UsageError as exc:
        click.echo(f"qkit: {exc.format_message()}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"qkit: {exc.format_message()}", err=True)
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("qkit: interrupted", err=True)
        return 130
    except QkitError as exc:
        click.echo(f"qkit: {redact(str(exc))}", err=True)
        return exc.exit_code
    except LedgerFailure as exc:  # the ledger failed mid-write (disk full, I/O error, connection lost)
        click.echo(f"qkit: {_ledger_failure(exc)}", err=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: still one line unless debugging
        missing = extras.explain(exc, "this command") if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None:  # a part an extra installs (e.g. psycopg for a PostgreSQL ledger)
            click.echo(f"qkit: {missing}", err=True)
            return missing.exit_code
        if os.environ.get("QKIT_DEBUG"):
            raise
        click.echo(f"qkit: internal error ({type(exc).__name__}): {redact(str(exc))}", err=True)
        return 1


def _ledger_failure(exc: LedgerFailure) -> str:
    """One line naming the ledger (password masked) and the database's own first line of the error."""
    try:
        from qkit.config import settings

        where = f"the ledger at QKIT_DATABASE_URL={redact(settings().database_url)}"
    except QkitError:
        where = "the ledger"
    first = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()
    return f"{where} failed: {redact(first[0]) if first else type(exc).__name__}"


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    # `python -m qkit.cli`: run the module as imported, the group other modules registered their commands on
    from qkit.cli import entry_point as _entry_point

    _entry_point()
