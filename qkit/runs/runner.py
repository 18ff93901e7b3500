"""Scheduled worker runs (docs/architecture.md#scheduled-runs): papermill runs ``notebooks/worker.ipynb``.

``python scheduled/run_worker.py [--max-jobs N] [--max-seconds S] [--queue NAME]``
calls :func:`main`.  One run:

1. takes the queue's lock: ``fcntl.flock`` on ``QKIT_HOME/locks/worker-<queue>.lock``.
   The kernel drops a flock when its holder dies, however it dies, so a
   killed run never blocks the next one.  A second run on the same queue
   refuses with one line on stderr and exit status 75 (``EX_TEMPFAIL``:
   cron and systemd treat it as "try again later");
2. runs the notebook through papermill, as a child process of the current
   interpreter (kernel ``python3``, which jupyter_client runs on that same
   interpreter), writing ``scheduled/runs/YYYY/MM/DD/worker-<UTC timestamp>.ipynb``
   (a short random suffix is added when that name is taken) and papermill's
   own log beside it (``.ipynb.log``).  The notebook gets ``run_id`` as a
   parameter and passes it to ``q.work(trigger="papermill", params=...)``;
3. classifies the run itself, because papermill's output metadata does not
   record kernel deaths, timeouts or signals: ``ok``, ``failed`` (a cell
   raised), ``kernel_died``, ``timeout`` (the whole-run ``timeout``),
   ``interrupted`` (SIGTERM/SIGINT to the runner) or ``error`` (papermill
   could not run the notebook).

The record of a run is its ``worker_runs`` row (:mod:`qkit.runs.runrecord`): created
before papermill starts, continued by the notebook's burst, given the runner's
verdict at the end; the sidecar ``<output>.json`` and ``metadata.qkit`` of the
executed notebook are copies made from it.  A run whose notebook never reached
``q.work`` is in ``qkit runs`` all the same: its row was there from the start.

Stopping a run (timeout or a signal) is graceful first: the kernel gets
SIGINT, so the burst stops claiming and finishes the job in hand; papermill
gets SIGTERM after ``grace`` seconds (it then shuts its kernel down), SIGKILL
10 s later.  On Linux papermill also gets SIGTERM when the runner dies
(``PR_SET_PDEATHSIG``), and the kernel exits when papermill does.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from qkit.errors import BadInput, QkitError
from qkit.runs.runrecord import RunRecord, close_record, open_record, write_copies
from qkit.runs.runrecord import read_sidecars as _read_sidecars
from qkit.engine.signals import StopSignals

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL
EXIT_TIMEOUT = 124  # as timeout(1)
PAPERMILL_DEAD_KERNEL = 138  # papermill's exit status for DeadKernelError
STATUSES = ("ok", "failed", "kernel_died", "timeout", "interrupted", "error")
KILL_AFTER = 10.0  # seconds between SIGTERM and SIGKILL to papermill
class LockBusy(QkitError):
    """Another scheduled run holds the queue's lock."""

    exit_code = EXIT_LOCKED


# ---------------------------------------------------------------- paths
def repo_root() -> Path:
    """The project this qkit belongs to: the checkout holding ``notebooks/worker.ipynb``.

    The package's own parent when qkit runs from a checkout (so cron can call
    the runner from any directory), else the project root of the working
    directory.
    """
    here = Path(__file__).resolve().parents[2]  # qkit/runs/runner.py: the checkout
    if (here / "notebooks" / "worker.ipynb").is_file():
        return here
    from qkit.config import project_root

    return project_root()


def default_notebook() -> Path:
    return repo_root() / "notebooks" / "worker.ipynb"


def default_runs_dir() -> Path:
    return repo_root() / "scheduled" / "runs"


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """``home``, else ``QKIT_HOME``, else ``.qkit/`` in :func:`repo_root` (not the cwd: cron starts in ``~``)."""
    if home is not None:
        return Path(home).expanduser().resolve()
    env = os.environ.get("QKIT_HOME")
    return Path(env).expanduser().resolve() if env else repo_root() / ".qkit"


def child_env(home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of papermill and its kernel: same state, headless plots, qkit importable."""
    env = dict(os.environ if base is None else base)
    env["QKIT_HOME"] = str(home)
    env.setdefault("MPLBACKEND", "Agg")
    root = str(repo_root())
    if (Path(root) / "qkit" / "__init__.py").is_file():
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


# ---------------------------------------------------------------- the lock
class QueueLock:
    """An exclusive, non-blocking ``flock`` per queue under ``QKIT_HOME/locks``.

    The holder's pid, run id and start time are written into the file so a
    refusal can say who holds it.  The descriptor is not inherited by child
    processes (PEP 446), so only this process holds the lock.
    """

    def __init__(self, home: Path, queue: str) -> None:
        self.path = Path(home) / "locks" / f"worker-{queue}.lock"
        self.queue = queue
        self.fd: int | None = None

    def acquire(self, holder: dict[str, Any]) -> "QueueLock":
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # under QKIT_HOME: private
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(self._busy_message()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def _busy_message(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        who = ", ".join(f"{k} {info[k]}" for k in ("pid", "run_id", "started_at") if info.get(k))
        return (f"another scheduled run holds the lock of queue {self.queue!r}"
                f"{f' ({who})' if who else ''}; not starting ({self.path})")

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "QueueLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------- names
def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def reserve_output(runs_dir: Path, now: datetime, stem: str = "worker") -> Path:
    """Create (exclusively) ``runs_dir/YYYY/MM/DD/<stem>-<UTC timestamp>.ipynb``; add a suffix if taken."""
    folder = Path(runs_dir) / f"{now:%Y}" / f"{now:%m}" / f"{now:%d}"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{stem}-{now:%Y%m%dT%H%M%SZ}"
    for suffix in ["", *(f"-{secrets.token_hex(2)}" for _ in range(20))]:
        path = folder / f"{name}{suffix}.ipynb"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return path
        except FileExistsError:
            continue
    raise QkitError(f"cannot find a free output name in {folder}")


# ---------------------------------------------------------------- running
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when the runner dies (so a killed runner leaves no worker behind)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - best effort
            pass


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    out = []
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry.name))
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """Interrupt the kernel (graceful), then SIGTERM papermill, then SIGKILL everything."""
    kernels = _children(proc.pid)
    for pid in kernels:
        _signal(pid, signal.SIGINT)
    for sig, wait in ((None, grace), (signal.SIGTERM, KILL_AFTER), (signal.SIGKILL, KILL_AFTER)):
        if sig is not None:
            _signal(proc.pid, sig)
            if sig == signal.SIGKILL:
                for pid in kernels:
                    _signal(pid, signal.SIGKILL)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def first_error(output: Path) -> str | None:
    """``ename: evalue`` of the first error output in the executed notebook."""
    try:
        import nbformat

        nb = nbformat.read(output, as_version=4)
    except Exception:  # noqa: BLE001 - an empty or partial output notebook
        return None
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{out.get('ename')}: {out.get('evalue')}".strip()
    return None


def log_error(log: Path) -> str | None:
    """The most telling line of papermill's log: the last exception line, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return ln[:500]
    return lines[-1][:500] if lines else None


def papermill_command(notebook: Path, output: Path, parameters: dict[str, Any], kernel: str = "python3"
                      ) -> list[str]:
    """``python -m papermill`` on this interpreter, run in the notebook's folder, parameters as YAML/JSON.

    ``-y`` takes YAML and JSON is YAML: values keep their types (``"007"`` stays a string).
    """
    return [sys.executable, "-m", "papermill", str(notebook), str(output), "-k", kernel, "--cwd",
            str(notebook.parent), "--no-progress-bar", "-y", json.dumps(parameters)]


def _classify(rc: int, *, timed_out: bool, stop_signal: int | None, output: Path, log: Path
              ) -> tuple[str, int, str | None]:
    """(status, runner exit code, error line) from how papermill ended."""
    if timed_out:
        return "timeout", EXIT_TIMEOUT, "the run exceeded its time limit and was stopped"
    if stop_signal is not None:
        name = signal.Signals(stop_signal).name
        return "interrupted", 128 + stop_signal, f"the runner received {name} and stopped the run"
    if rc == 0:
        return "ok", EXIT_OK, None
    log_line = log_error(log)
    if rc == PAPERMILL_DEAD_KERNEL or (log_line or "").startswith("DeadKernelError"):
        return "kernel_died", EXIT_FAILED, f"the kernel died ({log_line or 'DeadKernelError'})"
    if rc < 0:
        return "error", EXIT_FAILED, f"papermill was killed by {signal.Signals(-rc).name}"
    cell_error = first_error(output)
    if cell_error:
        return "failed", EXIT_FAILED, cell_error
    return "error", EXIT_FAILED, log_line or f"papermill exited with status {rc}"


def run_worker(*, queue: str = "default", max_jobs: int | None = None, max_seconds: float | None = None,
               notebook: str | os.PathLike[str] | None = None, runs_dir: str | os.PathLike[str] | None = None,
               timeout: float | None = None, home: str | os.PathLike[str] | None = None,
               kernel: str = "python3", grace: float = 30.0,
               parameters: dict[str, Any] | None = None) -> RunRecord:
    """Run the worker notebook once under the queue's lock, and record how it went.

    Raises :class:`LockBusy` if another run holds the lock (nothing is
    written then), :class:`qkit.BadInput` for bad arguments.  Otherwise
    returns the :class:`RunRecord`, whatever happened to the notebook.
    ``timeout`` bounds the whole run (default: ``max_seconds`` + 300 s, or
    one hour).
    """
    from qkit.model import check_name

    check_name(queue, "queue name")
    if max_jobs is not None and (isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1):
        raise BadInput("--max-jobs must be a positive integer")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise BadInput("--max-seconds must be a positive number")
    from qkit.analysis.notebook_helpers import secret_parameter_problems

    refused = secret_parameter_problems(parameters or {})
    if refused:  # before papermill writes them into scheduled/runs/
        raise BadInput("refused notebook parameters: " + "; ".join(refused))
    nb_path = Path(notebook).resolve() if notebook is not None else default_notebook()
    if not nb_path.is_file():
        raise BadInput(f"notebook {str(nb_path)!r} does not exist")
    if timeout is None:
        timeout = float(max_seconds) + 300.0 if max_seconds else 3600.0
    home_path = resolve_home(home)
    started = datetime.now(timezone.utc)
    run_id = new_run_id(started)
    lock = QueueLock(home_path, queue).acquire({"pid": os.getpid(), "run_id": run_id,
                                                "started_at": started.isoformat(timespec="seconds")})
    try:
        return _run_locked(queue=queue, max_jobs=max_jobs, max_seconds=max_seconds, nb_path=nb_path,
                           runs_dir=Path(runs_dir) if runs_dir is not None else default_runs_dir(),
                           timeout=timeout, home=home_path, kernel=kernel, grace=grace,
                           extra=parameters or {}, started=started, run_id=run_id)
    finally:
        lock.release()


def _run_locked(*, queue: str, max_jobs: int | None, max_seconds: float | None, nb_path: Path, runs_dir: Path,
                timeout: float, home: Path, kernel: str, grace: float, extra: dict[str, Any], started: datetime,
                run_id: str) -> RunRecord:
    output = reserve_output(runs_dir, started, stem=nb_path.stem)
    log = Path(str(output) + ".log")
    params: dict[str, Any] = {"queue": queue, "run_id": run_id, **extra}
    if max_jobs is not None:
        params["max_jobs"] = max_jobs
    if max_seconds is not None:
        params["max_seconds"] = float(max_seconds)
    rec = RunRecord(run_id=run_id, queue=queue, started_at=started.isoformat(), notebook=str(nb_path),
                    output=str(output), log=str(log), parameters=params)
    open_record(rec, home)
    cmd = papermill_command(nb_path, output, params, kernel)
    t0 = time.monotonic()
    stop_signal: list[int] = []
    timed_out = False
    signals = StopSignals(lambda signum: None if stop_signal else stop_signal.append(signum)).install()
    try:
        with open(log, "wb") as log_fh:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                                        env=child_env(home), preexec_fn=_die_with_parent)
            except OSError as exc:
                rec.status, rec.exit_code, rec.error = "error", EXIT_FAILED, f"cannot start papermill: {exc}"
                proc = None
            if proc is not None:
                deadline = t0 + timeout
                while True:
                    try:
                        proc.wait(timeout=0.2)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if stop_signal or time.monotonic() >= deadline:
                        timed_out = not stop_signal
                        _stop(proc, grace)
                        break
                rec.papermill_exit = proc.returncode
                rec.status, rec.exit_code, rec.error = _classify(
                    proc.returncode if proc.returncode is not None else -9, timed_out=timed_out,
                    stop_signal=stop_signal[0] if stop_signal else None, output=output, log=log)
    finally:
        signals.restore()
    rec.duration_s = round(time.monotonic() - t0, 3)
    rec.finished_at = datetime.now(timezone.utc).isoformat()
    close_record(rec, home)
    write_copies(rec)
    return rec


def read_sidecars(runs_dir: str | os.PathLike[str] | None = None) -> Any:
    """The sidecars under ``runs_dir`` (default ``scheduled/runs``) as a DataFrame: :func:`qkit.runs.runrecord.read_sidecars`."""
    return _read_sidecars(runs_dir if runs_dir is not None else default_runs_dir())


# ---------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_worker.py",
        description="Run notebooks/worker.ipynb through papermill under a per-queue lock; "
                    "the executed notebook is the run's log.")
    p.add_argument("--max-jobs", type=int, metavar="N", help="stop after N jobs")
    p.add_argument("--max-seconds", type=float, metavar="S", help="stop claiming after S seconds")
    p.add_argument("--queue", default="default", metavar="NAME", help="queue to work on (default: default)")
    p.add_argument("--notebook", metavar="PATH", help="notebook to run (default: notebooks/worker.ipynb)")
    p.add_argument("--runs-dir", metavar="DIR", help="where executed notebooks go (default: scheduled/runs)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="stop the whole run after S seconds (default: max-seconds + 300, or 3600)")
    p.add_argument("--kernel", default="python3", help="kernel name (default: python3)")
    p.add_argument("--json", action="store_true", help="print the run record as one JSON document")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line of ``scheduled/run_worker.py``; returns the exit status.

    0 ok; 1 the notebook failed (or its kernel died, or papermill could not
    run it); 2 bad usage; 75 another run holds the queue's lock; 124 the run
    timed out; 128+N stopped by signal N.  Problems are one line on stderr.
    """
    args = _parser().parse_args(argv)
    try:
        rec = run_worker(queue=args.queue, max_jobs=args.max_jobs, max_seconds=args.max_seconds,
                         notebook=args.notebook, runs_dir=args.runs_dir, timeout=args.timeout, kernel=args.kernel)
    except LockBusy as exc:
        print(f"run_worker: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except BadInput as exc:
        print(f"run_worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QkitError as exc:
        from qkit.config import redact

        print(f"run_worker: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(rec.to_dict(), default=str))
    elif rec.status == "ok":
        print(rec.line())
    if rec.status != "ok":
        print(f"run_worker: {rec.line()}", file=sys.stderr)
    return rec.exit_code
