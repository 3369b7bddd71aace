// The one translation unit of molora_ops._C_emu, the CPU emulation of the CUDA kernels (test-only;
// see csrc/kernels/cuda_compat.cuh and csrc/emu/cuda_emu.h). Compiled by the HOST compiler with
// MOLORA_CUDA_EMULATION defined (CMakeLists.txt target _C_emu): the launcher sources below are
// included as C++, their kernels run on host threads, and their ops register as
// torch.ops.molora_emu.<op> (CPU tensors). Load with molora_ops._emu.load_emu().
// To build only some launcher files (while others are being edited): scripts/build_emu.py.
#if !defined(MOLORA_CUDA_EMULATION)
#error "emu_bindings.cpp must be compiled with -DMOLORA_CUDA_EMULATION"
#endif

#include "../registration.h"
#include "emu_library.h"

#include "../cuda/router.cu"
#include "../cuda/dispatch.cu"
#include "../cuda/masked.cu"

REGISTER_EXTENSION(_C_emu)
