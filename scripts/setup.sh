#!/usr/bin/env bash
# Install what qkit and its tests need: redis-server, PostgreSQL and chromium
# (Debian packages, when missing and we are root), the Python package with its
# extras all (notebooks, api, postgres) and dev, and the git filter that strips
# notebook outputs (scripts/nbstripout.sh).
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  need_apt=()
  [ -x /usr/bin/redis-server ] || need_apt+=(redis-server)
  [ -x /usr/bin/strace ] || need_apt+=(strace)  # bench/syscalls.py
  [ -x /usr/bin/chromium ] || need_apt+=(chromium)  # tests/test_lab_browser.py (Playwright cannot download one)
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then need_apt+=(postgresql); fi
  id postgres >/dev/null 2>&1 || need_apt+=(postgresql)
  if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
  # Debian's packages start their own services; the tests use their own instances
  (systemctl stop redis-server postgresql 2>/dev/null || service redis-server stop 2>/dev/null || true) >/dev/null 2>&1 || true
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[all,dev]'
# notebooks are committed without outputs: the git filter .gitattributes names (nbstripout)
if git rev-parse --git-dir >/dev/null 2>&1; then bash scripts/nbstripout.sh .; fi
