#!/usr/bin/env bash
# Idempotent setup for a fresh machine: a virtual environment in .venv with edgepack and its extras.
# Usage: bash .ci/setup.sh [EXTRAS]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The constraints file pins torch so pip never resolves a CUDA build.
PIP_CONSTRAINT="$PWD/.ci/constraints.txt" .venv/bin/python -m pip install -q -e ".[${extras}]"
