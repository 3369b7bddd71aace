// Self-test kernels of the CUDA emulation shim (csrc/emu/cuda_emu.h), exposed as the private op
// torch.ops.molora_emu._selftest(name, x, a, b) and exercised by
// python_tests/test_cuda_emulation_shim.py. Emulation-only (compiled as C++ into the emu module).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "../cuda/launch.h"
#include "../kernels/cuda_compat.cuh"

namespace molora::emu_selftest {

using kernels::kFullMask;

// Block sum of x[0..n) with `blockDim.x` threads: strided partial sums, shared-memory tree.
template <typename T>
__global__ void block_sum_kernel(const T* __restrict__ x, int64_t n, T* __restrict__ out) {
  __shared__ T partial[1024];
  T acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Warp-shuffle reduction (xor butterfly) of one value per thread; out[warp] = warp sum.
__global__ void warp_sum_kernel(const float* __restrict__ x, float* __restrict__ out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[t];
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(kFullMask, v, m);
  if ((threadIdx.x & 31) == 0) out[t / 32] = v;
}

// out[t] = shuffle(x[t]) with mode 0 idx / 1 up / 2 down / 3 xor, argument a, width w.
template <typename T>
__global__ void shfl_kernel(const T* __restrict__ x, T* __restrict__ out, int mode, int a, int w) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const T v = x[t];
  T r;
  if (mode == 0)
    r = __shfl_sync(kFullMask, v, a, w);
  else if (mode == 1)
    r = __shfl_up_sync(kFullMask, v, static_cast<unsigned>(a), w);
  else if (mode == 2)
    r = __shfl_down_sync(kFullMask, v, static_cast<unsigned>(a), w);
  else
    r = __shfl_xor_sync(kFullMask, v, a, w);
  out[t] = r;
}

// out[4t..4t+3] = ballot, any, all, match_any of x[t] (int64 to hold the unsigned masks).
__global__ void vote_kernel(const int32_t* __restrict__ x, int64_t* __restrict__ out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int v = x[t];
  out[4 * t + 0] = static_cast<int64_t>(__ballot_sync(kFullMask, v != 0));
  out[4 * t + 1] = __any_sync(kFullMask, v != 0);
  out[4 * t + 2] = __all_sync(kFullMask, v != 0);
  out[4 * t + 3] = static_cast<int64_t>(__match_any_sync(kFullMask, v));
}

// Many-thread atomics: counts[x[i]] += 1 (int, shared then global), sum (float), total (u64),
// max / min (int), CAS-increment (unsigned).
__global__ void atomics_kernel(const int32_t* __restrict__ x, int64_t n, int32_t bins,
                               int32_t* __restrict__ counts, float* __restrict__ fsum,
                               unsigned long long* __restrict__ total, int32_t* __restrict__ mx,
                               int32_t* __restrict__ mn, unsigned* __restrict__ cas_count) {
  MOLORA_DYNAMIC_SMEM(int32_t, local);
  for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int v = x[i];
    atomicAdd(&local[v], 1);
    atomicAdd(fsum, 1.0f);
    atomicAdd(total, static_cast<unsigned long long>(v));
    atomicMax(mx, v);
    atomicMin(mn, v);
    unsigned old = *cas_count, assumed;
    do {
      assumed = old;
      old = atomicCAS(cas_count, assumed, assumed + 1);
    } while (old != assumed);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (local[b] != 0) atomicAdd(&counts[b], local[b]);
}

// Threads >= `keep` return early; the others still do __syncthreads twice (must not hang) and a
// shared-memory reversal among themselves. out[t] = x[keep - 1 - t] for t < keep.
__global__ void early_exit_kernel(const float* __restrict__ x, int keep, float* __restrict__ out) {
  __shared__ float buf[1024];
  if (static_cast<int>(threadIdx.x) >= keep) return;
  buf[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  const float v = buf[keep - 1 - threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = v;
}

// Dynamic shared memory of n floats per block: out[block*n + i] = x[block*n + n-1-i].
__global__ void dyn_smem_kernel(const float* __restrict__ x, int n, float* __restrict__ out) {
  MOLORA_DYNAMIC_SMEM(float, s);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = x[base + i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[base + i] = s[n - 1 - i];
}

// Reads dynamic shared memory without writing it (out = the garbage pattern).
__global__ void uninit_smem_kernel(int n, float* __restrict__ out) {
  MOLORA_DYNAMIC_SMEM(float, s);
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[i];
}

// Writes one element past the end of n floats of dynamic shared memory.
__global__ void smem_overflow_kernel(int n) {
  MOLORA_DYNAMIC_SMEM(float, s);
  if (threadIdx.x == 0) s[n] = 1.0f;
}

__global__ void assert_kernel(const float* __restrict__ x, int64_t n, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  MOLORA_DEVICE_ASSERT(x[i] >= 0.0f, "selftest: negative input");
  out[i] = x[i];
}

// Misuse: half of warp 0 waits at __syncthreads, the other half at a shuffle -> deadlock.
__global__ void deadlock_kernel(float* __restrict__ out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(kFullMask, 1.0f, 1);
  }
}

// Misuse: thread 0 does an extra __syncthreads while the rest of its warp waits at __syncwarp
// (warp 1 exits, so only warp 0 is alive, every thread blocked -> deadlock).
__global__ void deadlock2_kernel(float* __restrict__ out) {
  __shared__ float s[64];
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) {
    __syncthreads();
  }
  __syncwarp();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

__global__ void partial_mask_kernel(float* __restrict__ out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

__global__ void exited_lane_kernel(float* __restrict__ out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(kFullMask, 1.0f, 1);
}

__global__ void divergent_ops_kernel(float* __restrict__ out) {
  float v;
  if (threadIdx.x % 2 == 0)
    v = __shfl_xor_sync(kFullMask, 1.0f, 1);
  else
    v = static_cast<float>(__ballot_sync(kFullMask, 1));
  out[threadIdx.x] = v;
}

__global__ void throw_kernel(float* __restrict__ out) {
  if (threadIdx.x == 5) throw std::runtime_error("selftest: thrown from a kernel thread");
  out[threadIdx.x] = 1.0f;
}

// Spins until another block sets a flag: never happens in emulation (blocks are sequential).
__global__ void spin_kernel(int32_t* __restrict__ flag) {
  if (blockIdx.x == 0) {
    while (atomicAdd(flag, 0) == 0) {
    }
  } else {
    atomicExch(flag, 1);
  }
}

__global__ void noop_kernel(int32_t* __restrict__ out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) atomicAdd(out, 1);
}

// out[((bz*gy + by)*gx + bx) * nthreads + tid] = linear thread id + 1000 * linear block id,
// for a 3-D grid and block; also checks blockDim/gridDim.
__global__ void dims_kernel(int32_t* __restrict__ out) {
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  const int bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  out[static_cast<int64_t>(bid) * nthreads + tid] = tid + 1000 * bid;
}

// Two instantiations with static __shared__ arrays of their own.
template <typename T, int N>
__global__ void static_smem_kernel(T* __restrict__ out) {
  __shared__ T s[N];
  if (threadIdx.x < N) s[threadIdx.x] = static_cast<T>(threadIdx.x * 2 + N);
  __syncthreads();
  if (threadIdx.x < N) out[threadIdx.x] = s[N - 1 - threadIdx.x];
}

// Warp-level inclusive scan with __shfl_up_sync + a block-level combine through shared memory.
__global__ void block_scan_kernel(const int32_t* __restrict__ x, int32_t* __restrict__ out) {
  __shared__ int32_t warp_tot[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int v = x[threadIdx.x];
  for (int d = 1; d < 32; d *= 2) {
    const int u = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += u;
  }
  if (lane == 31) warp_tot[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    int t = lane < nw ? warp_tot[lane] : 0;
    for (int d = 1; d < 32; d *= 2) {
      const int u = __shfl_up_sync(kFullMask, t, d);
      if (lane >= d) t += u;
    }
    warp_tot[lane] = t;
  }
  __syncthreads();
  if (warp > 0) v += warp_tot[warp - 1];
  out[threadIdx.x] = v;
}

inline at::Tensor selftest(const std::string& name, const at::Tensor& x_in, int64_t a, int64_t b) {
  const at::Tensor x = x_in.contiguous();
  const cuda::Stream stream = cuda::current_stream();
  const auto f32 = x.options().dtype(at::kFloat);
  const auto i32 = x.options().dtype(at::kInt);
  if (name == "block_sum") {  // a = threads, b = blocks (each block sums all of x)
    at::Tensor out = cuda::new_output({b}, x.options());
    if (x.scalar_type() == at::kDouble)
      MOLORA_LAUNCH(b, a, 0, stream, block_sum_kernel<double>, x.data_ptr<double>(), x.numel(),
                    out.data_ptr<double>());
    else
      MOLORA_LAUNCH(b, a, 0, stream, block_sum_kernel<float>, x.data_ptr<float>(), x.numel(),
                    out.data_ptr<float>());
    cuda::check_launch();
    return out;
  }
  if (name == "warp_sum") {  // a = threads per block; x.numel() multiple of a
    at::Tensor out = cuda::new_output({x.numel() / 32}, f32);
    MOLORA_LAUNCH(x.numel() / a, a, 0, stream, warp_sum_kernel, x.data_ptr<float>(),
                  out.data_ptr<float>());
    cuda::check_launch();
    return out;
  }
  if (name.rfind("shfl_", 0) == 0) {  // shfl_idx / up / down / xor; a = arg, b = width
    const int mode = name == "shfl_idx" ? 0 : name == "shfl_up" ? 1 : name == "shfl_down" ? 2 : 3;
    at::Tensor out = cuda::new_output(x.sizes(), x.options());
    const int64_t threads = std::min<int64_t>(x.numel(), 128);
    const int64_t blocks = x.numel() / threads;
    if (x.scalar_type() == at::kDouble)
      MOLORA_LAUNCH(blocks, threads, 0, stream, shfl_kernel<double>, x.data_ptr<double>(),
                    out.data_ptr<double>(), mode, static_cast<int>(a), static_cast<int>(b));
    else if (x.scalar_type() == at::kLong)
      MOLORA_LAUNCH(blocks, threads, 0, stream, shfl_kernel<long long>,
                    reinterpret_cast<const long long*>(x.data_ptr<int64_t>()),
                    reinterpret_cast<long long*>(out.data_ptr<int64_t>()), mode,
                    static_cast<int>(a), static_cast<int>(b));
    else if (x.scalar_type() == at::kInt)
      MOLORA_LAUNCH(blocks, threads, 0, stream, shfl_kernel<int>, x.data_ptr<int32_t>(),
                    out.data_ptr<int32_t>(), mode, static_cast<int>(a), static_cast<int>(b));
    else
      MOLORA_LAUNCH(blocks, threads, 0, stream, shfl_kernel<float>, x.data_ptr<float>(),
                    out.data_ptr<float>(), mode, static_cast<int>(a), static_cast<int>(b));
    cuda::check_launch();
    return out;
  }
  if (name == "vote") {  // x int32 [32 * w]; a = threads per block
    at::Tensor out = cuda::new_output({x.numel(), 4}, x.options().dtype(at::kLong));
    MOLORA_LAUNCH(x.numel() / a, a, 0, stream, vote_kernel, x.data_ptr<int32_t>(),
                  out.data_ptr<int64_t>());
    cuda::check_launch();
    return out;
  }
  if (name == "atomics") {  // x int32 values in [0, a); b = blocks; returns [a + 5] int64
    const int bins = static_cast<int>(a);
    at::Tensor counts = at::zeros({bins}, i32);
    at::Tensor fsum = at::zeros({1}, f32);
    at::Tensor total = at::zeros({1}, x.options().dtype(at::kLong));
    at::Tensor mx = at::full({1}, INT32_MIN, i32);
    at::Tensor mn = at::full({1}, INT32_MAX, i32);
    at::Tensor cas = at::zeros({1}, i32);
    MOLORA_LAUNCH(b, 256, bins * sizeof(int32_t), stream, atomics_kernel, x.data_ptr<int32_t>(),
                  x.numel(), bins, counts.data_ptr<int32_t>(), fsum.data_ptr<float>(),
                  reinterpret_cast<unsigned long long*>(total.data_ptr<int64_t>()),
                  mx.data_ptr<int32_t>(), mn.data_ptr<int32_t>(),
                  reinterpret_cast<unsigned*>(cas.data_ptr<int32_t>()));
    cuda::check_launch();
    return at::cat({counts.to(at::kLong), fsum.to(at::kLong), total, mx.to(at::kLong),
                    mn.to(at::kLong), cas.to(at::kLong)});
  }
  if (name == "early_exit") {  // a = threads, b = keep
    at::Tensor out = at::full({b}, -1.0, f32);
    MOLORA_LAUNCH(1, a, 0, stream, early_exit_kernel, x.data_ptr<float>(), static_cast<int>(b),
                  out.data_ptr<float>());
    cuda::check_launch();
    return out;
  }
  if (name == "dyn_smem") {  // x [blocks, n]; a = threads; b = the kernel's dyn smem limit (0: unset)
    const int n = static_cast<int>(x.size(1));
    if (b > 0) ::molora::emu::set_max_dynamic_smem(&dyn_smem_kernel, static_cast<int>(b));
    at::Tensor out = cuda::new_output(x.sizes(), f32);
    MOLORA_LAUNCH(x.size(0), a, n * sizeof(float), stream, dyn_smem_kernel, x.data_ptr<float>(),
                  n, out.data_ptr<float>());
    cuda::check_launch();
    return out;
  }
  if (name == "uninit_smem") {  // a = floats
    at::Tensor out = at::zeros({a}, f32);
    MOLORA_LAUNCH(1, 64, a * sizeof(float), stream, uninit_smem_kernel, static_cast<int>(a),
                  out.data_ptr<float>());
    cuda::check_launch();
    return out;
  }
  if (name == "smem_overflow") {
    MOLORA_LAUNCH(1, 32, a * sizeof(float), stream, smem_overflow_kernel, static_cast<int>(a));
    cuda::check_launch();
    return x;
  }
  if (name == "assert") {  // a = threads per block
    at::Tensor out = at::zeros_like(x);
    MOLORA_LAUNCH((x.numel() + a - 1) / a, a, 0, stream, assert_kernel, x.data_ptr<float>(),
                  x.numel(), out.data_ptr<float>());
    cuda::check_launch();
    return out;
  }
  if (name == "launch") {  // a = grid, b = block, to test the launch configuration check
    at::Tensor out = at::zeros({1}, i32);
    MOLORA_LAUNCH(a, b, 0, stream, noop_kernel, out.data_ptr<int32_t>());
    cuda::check_launch();
    return out;
  }
  at::Tensor scratch = at::zeros({1024}, f32);
  if (name == "deadlock") {
    MOLORA_LAUNCH(1, 64, 0, stream, deadlock_kernel, scratch.data_ptr<float>());
  } else if (name == "deadlock2") {
    MOLORA_LAUNCH(1, 64, 0, stream, deadlock2_kernel, scratch.data_ptr<float>());
  } else if (name == "partial_mask") {
    MOLORA_LAUNCH(1, 32, 0, stream, partial_mask_kernel, scratch.data_ptr<float>());
  } else if (name == "exited_lane") {
    MOLORA_LAUNCH(1, 32, 0, stream, exited_lane_kernel, scratch.data_ptr<float>());
  } else if (name == "divergent_ops") {
    MOLORA_LAUNCH(1, 32, 0, stream, divergent_ops_kernel, scratch.data_ptr<float>());
  } else if (name == "throw") {
    MOLORA_LAUNCH(2, 32, 0, stream, throw_kernel, scratch.data_ptr<float>());
  } else if (name == "spin") {
    at::Tensor flag = at::zeros({1}, i32);
    MOLORA_LAUNCH(2, 32, 0, stream, spin_kernel, flag.data_ptr<int32_t>());
  } else if (name == "dims") {  // grid (2,3,2), block (8,4,2) = 64 threads
    const dim3 grid(2, 3, 2), block(8, 4, 2);
    at::Tensor out = cuda::new_output({12 * 64}, i32);
    MOLORA_LAUNCH(grid, block, 0, stream, dims_kernel, out.data_ptr<int32_t>());
    cuda::check_launch();
    return out;
  } else if (name == "static_smem") {  // two instantiations, interleaved
    at::Tensor o1 = cuda::new_output({32}, f32), o2 = cuda::new_output({64}, i32);
    at::Tensor o3 = cuda::new_output({32}, f32);
    auto* k1 = &static_smem_kernel<float, 32>;
    auto* k2 = &static_smem_kernel<int32_t, 64>;
    MOLORA_LAUNCH(1, 64, 0, stream, k1, o1.data_ptr<float>());
    MOLORA_LAUNCH(1, 64, 0, stream, k2, o2.data_ptr<int32_t>());
    MOLORA_LAUNCH(1, 64, 0, stream, k1, o3.data_ptr<float>());
    cuda::check_launch();
    return at::cat({o1, o2.to(at::kFloat), o3});
  } else if (name == "block_scan") {  // x int32 [threads]
    at::Tensor out = cuda::new_output(x.sizes(), i32);
    MOLORA_LAUNCH(1, x.numel(), 0, stream, block_scan_kernel, x.data_ptr<int32_t>(),
                  out.data_ptr<int32_t>());
    cuda::check_launch();
    return out;
  } else {
    TORCH_CHECK_VALUE(false, "molora_emu._selftest: unknown case ", name);
  }
  cuda::check_launch();
  return scratch;
}

}  // namespace molora::emu_selftest
