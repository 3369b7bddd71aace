// The instruction set a translation unit compiles the CPU kernels for. The kernel headers put
// their functions in `inline namespace MOLORA_ISA`, so the copy built for AVX2 + FMA
// (csrc/cpu/sgmv_avx2.cpp, -DMOLORA_ISA=isa_avx2) and the baseline copy (every other TU) are
// distinct symbols: the linker can never merge an AVX2 instantiation into the baseline path.
#pragma once

#ifndef MOLORA_ISA
#define MOLORA_ISA isa_default
#endif
