#!/usr/bin/env bash
# Usage: bash bench/peers/profile_all.sh [REDIS_URL]  -> results/profile.jsonl (counts only, N=2000)
set -u
cd "$(dirname "$0")"
URL=${1:-redis://127.0.0.1:6399/0}; mkdir -p results
PY=${PY:?set PY to a venv python with rq huey arq saq dramatiq}; PY_CELERY=${PY_CELERY:-$PY}
for p in "rq_peer.py" "huey_peer.py" "arq_peer.py" "arq_peer.py --config poll10ms" "saq_peer.py" \
         "dramatiq_peer.py --config t1" "dramatiq_peer.py --config t8" "celery_peer.py"; do
  echo "== $p $(date +%T)" >&2
  py=$PY; [[ $p == celery* ]] && py=$PY_CELERY    # kombu 5.7 needs redis-py>=6.1, arq 0.28 needs <6
  timeout 300 "$py" cmd_profile.py --redis-url "$URL" -- $p --n 2000 >> results/profile.jsonl \
    2>> results/errors.log || echo "FAILED: $p" >&2
done
