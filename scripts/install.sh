#!/usr/bin/env bash
# Install picochat into the current Python environment.
#   bash scripts/install.sh          the app
#   bash scripts/install.sh test     the app plus test dependencies
# An existing torch (a CUDA build on a GPU box, say) is kept. Without one, the CPU wheel named by
# PICOCHAT_TORCH (default torch==2.13.0) goes in first, so that resolving `torch>=2.4` never pulls
# a multi-GB CUDA build onto a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "${PICOCHAT_TORCH:-torch==2.13.0}"
fi
if [ "${1:-}" = "test" ]; then
  "$PY" -m pip install -q -e ".[test]"
else
  "$PY" -m pip install -q -e .
fi
# picochat's C++ CPU kernels (int4 / int8 matmuls, decode attention) are built once per torch
# version into the user cache dir (~30 s): here, so that the first start does not wait for them.
# Where they cannot be built (no AVX-512 VNNI, no compiler) torch's kernels serve; nothing fails.
"$PY" -c "from picochat.kernels import cpu_vnni; cpu_vnni.available()"
