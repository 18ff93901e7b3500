#!/usr/bin/env bash
# The whole test suite: the queue suites on every backend x ledger, the API, the
# notebooks (nbval), the scheduled runner, and the benchmark harness at small N.
set -euo pipefail
cd "$(dirname "$0")/.."
# one-way imports (the layers contract in pyproject.toml), before any test runs
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" lint-imports
python3 -m pytest -q -p no:cacheprovider tests/ "$@"
if ls notebooks/*.ipynb >/dev/null 2>&1; then
  python3 -m pytest -q -p no:cacheprovider --nbval-lax notebooks/
fi
