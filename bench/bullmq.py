"""Run BullMQ (bench/node/bullmq_peer.mjs) from Python benchmarks: installs the `bullmq` npm package into a
cache folder on first use (npm is on the machine; nothing is vendored) and returns the script's JSON line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "node" / "bullmq_peer.mjs"
VERSION = os.environ.get("BENCH_BULLMQ_VERSION", "5")


def node_folder() -> Path:
    """A folder with ``node_modules/bullmq``, installed with npm on first use (``BENCH_NODE_DIR`` or a cache)."""
    folder = Path(os.environ.get("BENCH_NODE_DIR", Path.home() / ".cache" / "qkit-bench-node"))
    if not (folder / "node_modules" / "bullmq").is_dir():
        if not shutil.which("npm"):
            raise SystemExit("bench: npm is not installed (apt-get install nodejs npm)")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(folder),
                        f"bullmq@{VERSION}"], check=True, stdout=subprocess.DEVNULL)
    return folder


def run(mode: str, redis_url: str, *args: object, timeout: float = 900) -> dict:
    """``node bullmq_peer.mjs <mode> <redis_url> <args...>`` with the installed bullmq; its JSON line."""
    folder = node_folder()
    script = folder / SCRIPT.name  # next to node_modules, so `import 'bullmq'` resolves
    shutil.copyfile(SCRIPT, script)
    out = subprocess.run(["node", str(script), mode, redis_url, *map(str, args)], check=True, text=True,
                         capture_output=True, timeout=timeout, cwd=folder)
    version = json.loads((folder / "node_modules" / "bullmq" / "package.json").read_text())["version"]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "version": version}
