#!/usr/bin/env bash
# Compile-check CUDA sources with nvcc against the installed (CPU) torch's headers, as CI's
# molora_cuda_check target does, without a full rebuild:
#   bash scripts/nvcc_check.sh csrc/cuda/router.cu [more.cu ...]     (ARCHS="90 80" by default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NVCC="${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}"
[ -x "$NVCC" ] || NVCC="$(command -v nvcc)"
PY=.venv/bin/python
TORCH_INC="$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
ABI="$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
GENCODE=()
for a in ${ARCHS:-90 80}; do GENCODE+=("--generate-code=arch=compute_$a,code=[compute_$a,sm_$a]"); done
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for src in "$@"; do
  echo "nvcc_check: $src (${ARCHS:-90 80})"
  "$NVCC" -forward-unknown-to-host-compiler -ccbin="${CXX:-c++}" \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DMOLORA_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" -Icsrc -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" \
    -I"$PY_INC" -O3 -DNDEBUG -std=c++20 "${GENCODE[@]}" -Xcompiler=-fPIC \
    --expt-relaxed-constexpr --expt-extended-lambda -x cu -c "$src" -o "$OUT/$(basename "$src").o"
done
echo "nvcc_check: ok"
