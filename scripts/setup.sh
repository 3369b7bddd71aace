#!/usr/bin/env bash
# Create (if missing) the project's virtualenv .venv, install the build and test requirements, and
# build molora_ops in editable mode (molora_ops/_C*.so next to the Python sources) as a DEVELOPER
# build (MOLORA_DEV_BUILD=1): besides what users get (_C), the test-only CUDA emulation module
# _C_emu and, where nvcc exists, the nvcc compile-check of the .cu files, which the tests need.
# Idempotent: a second run installs nothing new and only rebuilds what changed.
#   PYTHON=python3.12 bash scripts/setup.sh    # choose the interpreter for a new .venv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $(command -v "$PYTHON") ($("$PYTHON" -V 2>&1))"
  "$PYTHON" -m venv "$VENV"
else
  echo "setup: using existing $VENV ($("$VENV/bin/python" -V 2>&1))"
fi
PY="$VENV/bin/python"

# torch is installed first and the build then sees it (--no-build-isolation); pip does not
# upgrade requirements that are already satisfied.
# triton: the GPU machine's version; without a GPU its interpreter runs the Triton kernels in the
# tests (it needs numpy < 2.4 there).
# transformers / peft / kernels: the integrations (molora_ops.integrations) and their tests, which
# build tiny models from configs (no hub downloads).
# build: python_tests/test_install.py builds the sdist (python -m build).
echo "setup: pip install torch==2.13.0 triton==3.6.0 'numpy<2.4' pytest hypothesis expecttest tqdm matplotlib pytest-benchmark transformers==5.23.0 peft==0.21.2 kernels==0.17.2 bitsandbytes==0.50.2 ninja 'cmake>=3.26,<4' setuptools wheel build"
# (-qq: this machine's pip config names index folders that do not exist; pip warns per package.)
"$PY" -m pip install -qq --disable-pip-version-check \
  torch==2.13.0 triton==3.6.0 "numpy<2.4" pytest hypothesis expecttest tqdm matplotlib pytest-benchmark \
  transformers==5.23.0 peft==0.21.2 kernels==0.17.2 bitsandbytes==0.50.2 ninja \
  "cmake>=3.26,<4" \
  "setuptools>=64" wheel build

echo "setup: MOLORA_DEV_BUILD=1 pip install --no-build-isolation -e .  (CMake + Ninja: _C, _C_emu, nvcc check)"
start=$SECONDS
MOLORA_DEV_BUILD=1 "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e .
echo "setup: molora_ops built in $((SECONDS - start)) s"
