// Loop hints for the CPU kernels. A vectorised float reduction reorders the sum, which the
// compiler may only do when told; `omp simd` says so per loop (honoured with -fopenmp or
// -fopenmp-simd, which the build passes; ignored otherwise).
#pragma once

#define MOLORA_PRAGMA(x) _Pragma(#x)
#define MOLORA_SIMD_SUM(var) MOLORA_PRAGMA(omp simd reduction(+ : var))
#define MOLORA_SIMD MOLORA_PRAGMA(omp simd)
