#!/usr/bin/env bash
# Fetch, here (where pip reaches a registry), the pure-Python wheels the GPU machine lacks, for its
# Python 3.12: benchmarks/gpu_env.py CARRIED (diffusers and its needs), at the versions installed
# here, after checking their requirements against what the GPU image has.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default .whl (added to .git/info/exclude)
#
# Then carry DIR to the GPU machine and run: bash benchmarks/gpu_check.sh --wheels DIR --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$DEST/" "$EXCLUDE" 2>/dev/null || echo "/$DEST/" >>"$EXCLUDE"  # never committed, still carried
"$PY" benchmarks/gpu_env.py check
rm -rf "$DEST"
"$PY" benchmarks/gpu_env.py download "$DEST"
du -sh "$DEST"
