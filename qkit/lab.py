"""``qkit lab``: JupyterLab on ``notebooks/`` with this project's settings.

The server and its kernels get the environment a notebook of this project
needs: ``QKIT_HOME`` resolved to the project's state (``.qkit/`` in the
project root unless set), every other ``QKIT_*`` setting of the caller, and
this checkout's ``qkit`` importable.  It listens on loopback with a fresh
random token and prints the URL to open once the server answers.  As root
(containers, CI) it passes ``--allow-root``, which Jupyter otherwise refuses.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from qkit.errors import BadInput


def lab_command(notebooks: Path, *, host: str, port: int, token: str, open_browser: bool = False) -> list[str]:
    """The ``jupyter lab`` command line (this interpreter), loopback and token auth."""
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={notebooks}", f"--ServerApp.ip={host}",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           "--ServerApp.log_level=WARN", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if not open_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd


def lab_env(home: Path | None = None) -> dict[str, str]:
    """The server's (and so its kernels') environment: the caller's, with QKIT_HOME resolved and qkit importable.

    Plots keep Jupyter's inline backend unless the caller chose one.
    """
    from qkit.runs.runner import child_env, resolve_home

    env = child_env(resolve_home(home))
    if "MPLBACKEND" not in os.environ:
        env.pop("MPLBACKEND", None)
    return env


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Return once ``host:port`` accepts connections; raise if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with status {proc.returncode} before it listened")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"JupyterLab did not listen on {host}:{port} within {timeout:.0f} s")


def run_lab(*, host: str = "127.0.0.1", port: int = 8888, open_browser: bool = False,
            notebooks: str | Path | None = None, say: Callable[[str], None] = print,
            extra: Sequence[str] = ()) -> int:
    """Start JupyterLab, print its URL, and wait for it; returns its exit status.

    Ctrl-C (or SIGTERM) stops the server, which shuts its kernels down.
    """
    from qkit.runs.runner import repo_root

    notebooks = Path(notebooks).resolve() if notebooks else repo_root() / "notebooks"
    if not notebooks.is_dir():
        raise BadInput(f"no notebooks folder at {notebooks}")
    if not port:
        from qkit.ports import free_port

        port = free_port()
    token = secrets.token_hex(24)
    env = lab_env()
    proc = subprocess.Popen([*lab_command(notebooks, host=host, port=port, token=token, open_browser=open_browser),
                             *extra], env=env, stdin=subprocess.DEVNULL)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        wait_listening(host, port, proc)
        shown = f"[{host}]" if ":" in host else host
        say(f"JupyterLab on {notebooks} (QKIT_HOME={env['QKIT_HOME']}): http://{shown}:{port}/lab?token={token}")
        sys.stdout.flush()
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()  # jupyter_server stops its kernels on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
