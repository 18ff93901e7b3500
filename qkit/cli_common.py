"""What the CLI's command modules share (qkit/cli.py, qkit/cli_jobs.py, qkit/cli_dlq.py): output, options,
opening a queue, finding which queue holds a job, and tables formatted for people."""
from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import click

import qkit
from qkit.config import DEFAULT_QUEUE
from qkit.model import MAX_ID
from qkit.text import duration


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def emit(data: Any, as_json: bool, human: Callable[[Any], str] | None = None) -> None:
    """Print ``data`` as one JSON document, or as the human form."""
    if as_json:
        click.echo(json.dumps(data, default=_json_default, ensure_ascii=False))
    else:
        click.echo(human(data) if human else json.dumps(data, default=_json_default, indent=2))


def _open(queue: str | None) -> qkit.Queue:
    return qkit.connect(queue=DEFAULT_QUEUE if queue is None else queue)  # "" is a bad name, not the default


def open_job_queue(job_id: int, queue: str | None) -> qkit.Queue:
    """The queue that holds job ``job_id``: ``queue`` when given, else whichever queue the ledger says
    (NotFound, exit 2, when no queue has it).  The queues share one set of connections."""
    q = _open(queue)
    if queue is not None:
        return q
    try:
        home = q.ledger.get(job_id).queue
        if home == q.name:
            return q
        from qkit.engine.queue import Queue

        return Queue(home, q.settings, backend=q.backend, ledger=q.ledger)
    except BaseException:
        q.close()
        raise


#: a job id argument: what the ledger's BIGINT holds (a larger id is refused in one line, exit 2)
JOB_ID = click.IntRange(1, MAX_ID)
queue_option = click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help="Queue name.")
#: for commands given job ids: without --queue, each id is found in whatever queue holds it
job_queue_option = click.option("--queue", default=None, help="Queue name (default: whichever queue holds the job).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


# ---------------------------------------------------------------- for people
def when(value: Any) -> str:
    """A time as ``YYYY-MM-DD HH:MM:SS`` UTC ('-' for none)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return f"{value:%Y-%m-%d %H:%M:%S}"


def seconds(value: float | None) -> str:
    """A duration for people (:func:`qkit.text.duration`); '-' for none."""
    return "-" if value is None else duration(value)


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], *, right: Sequence[int] = (),
          width: int | None = None) -> str:
    """Rows under a header, columns aligned (those in ``right`` to the right); on a terminal (or with
    ``width``) lines are cut to its width."""
    cells = [[str(h) for h in header]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    limit = width or (shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else 1 << 30)
    lines = []
    for r in cells:
        parts = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(widths))]
        line = "  ".join(parts + [r[-1]])
        lines.append(line if len(line) <= max(limit, 40) else line[:max(limit, 40) - 1] + "…")
    return "\n".join(line.rstrip() for line in lines)


class ProgressLines:
    """A burst's progress for logs: one line on stderr every ``every`` seconds while jobs finish, and
    one every 12 intervals while none does (where tqdm's bar would be a single line rewritten in place).
    The worker calls :meth:`update` with the jobs it finished."""

    def __init__(self, label: str, every: float) -> None:
        import threading
        import time

        self.label, self.every, self.done = label, every, 0
        self._clock = time.monotonic
        self._t0 = self._clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="qkit-progress")

    def update(self, n: int = 1) -> None:
        self.done += n

    def _run(self) -> None:
        said, quiet = -1, 0
        while not self._stop.wait(self.every):
            quiet += 1
            if self.done == said and quiet < 12:  # idle (a long job, a --forever worker): a line a minute or so
                continue
            said, quiet = self.done, 0
            elapsed = self._clock() - self._t0
            click.echo(f"qkit: {self.label}: {self.done} job(s) finished in {elapsed:.0f} s "
                       f"({self.done / elapsed if elapsed else 0:.1f}/s)", err=True)

    def __enter__(self) -> "ProgressLines":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
