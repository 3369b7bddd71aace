// The molora_emu op library of the CPU emulation module (csrc/emu/cuda_emu.h): the shim's private
// self-test op here; the op schemas are declared from Python (molora_ops._emu.load_emu, from the
// same op declarations as torch.ops.molora). Included once per emulation translation
// unit: csrc/emu/emu_bindings.cpp (molora_ops._C_emu) or the TU written by scripts/build_emu.py.
// The launcher files (csrc/cuda/*.cu) included after it register their kernels under
// torch.ops.molora_emu.<op> (CPU key) through MOLORA_CUDA_LIBRARY_IMPL (csrc/cuda/launch.h).
#pragma once

#if !defined(MOLORA_CUDA_EMULATION)
#error "csrc/emu is compiled with -DMOLORA_CUDA_EMULATION only"
#endif

#include <torch/library.h>

#include "emu_selftest.cu"

TORCH_LIBRARY_FRAGMENT(molora_emu, m) {
  // Test-only (python_tests/test_cuda_emulation_shim.py): runs self-test kernel `name` of
  // csrc/emu/emu_selftest.cu on x with integer parameters a, b.
  m.def("_selftest(str name, Tensor x, int a, int b) -> Tensor");
}

TORCH_LIBRARY_IMPL(molora_emu, CPU, m) { m.impl("_selftest", &molora::emu_selftest::selftest); }
