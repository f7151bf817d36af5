#!/usr/bin/env bash
# setup.sh VENV — build (or complete) a Python 3.11 venv at VENV for the EXPERIMENTAL ExecuTorch backend:
# torch first (so executorch keeps this torch), then executorch and the rest of what progfl's exporter needs.
# Idempotent: pip skips what is already installed at these versions. PyPI only. ~1.5 GB.
# Then: PYTHONPATH=/work/main VENV/bin/python tools/executorch/check.py
set -euo pipefail
VENV=${1:?usage: setup.sh VENV_PATH}
PY=${PYTHON:-python3.11}
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0  # PyPI's x86_64 Linux wheel is the CUDA build unless pip is
# pointed at a CPU wheel (this machine's pip config finds a local 2.13.0+cpu wheel)
"$VENV/bin/python" -m pip install -q executorch==1.5.1 numpy==2.3.5 click==8.5.1 \
  onnxruntime-training-cpu==1.19.2 onnx==1.17.0 torch==2.13.0
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
for p in ("torch", "executorch", "numpy", "click", "onnxruntime-training-cpu", "onnx"):
    print(f"{p}=={m.version(p)}")
PY
