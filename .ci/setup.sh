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
# PP-OCRv4's text detector for tests/integration/test_text_detector.py and benchmarks/convert_memory.py:
# the rapidocr-onnxruntime wheel ships its ONNX file. Without its dependencies (OpenCV, Shapely, ...):
# only the model file is read, the package is never imported.
case ",${extras}," in
    *,all,*|*,pretrained,*) .venv/bin/python -m pip install -q --no-deps "rapidocr-onnxruntime==1.4.4" ;;
esac
