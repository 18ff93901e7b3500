#!/usr/bin/env bash
# Configure the git filter that strips notebook outputs (nbstripout) in a repository (default: this one).
# .gitattributes names the filter for *.ipynb; this sets what it runs, in the repository's own git config:
# outputs, execution counts and papermill/widget metadata are stripped, cell ids kept (Lab keeps them).
set -euo pipefail
repo="${1:-$(dirname "$0")/..}"
cd "$repo"
git rev-parse --git-dir >/dev/null 2>&1 || { echo "nbstripout.sh: $PWD is not a git repository" >&2; exit 2; }
python="$(python3 -c 'import sys; print(sys.executable)')"
"$python" -m nbstripout --install
git config filter.nbstripout.clean "\"$python\" -m nbstripout --keep-id"
git config filter.nbstripout.extrakeys \
  "metadata.papermill cell.metadata.papermill metadata.widgets cell.metadata.execution cell.metadata.scrolled"
