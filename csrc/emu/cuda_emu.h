// CPU emulation of the CUDA device API listed in csrc/kernels/cuda_compat.cuh (and of the host
// helpers csrc/cuda/launch.h needs), so the SAME kernel + launcher sources compile with the host
// compiler (-DMOLORA_CUDA_EMULATION) into the test module molora_ops._C_emu. CI has no GPU: this is
// how the kernels' logic is tested there against the reference.
//
// Execution model
//   * One launch at a time (a global mutex is held for the whole launch) and the blocks of a grid
//     run one after another. Hence a function-static array IS the block's shared memory:
//     `__shared__` expands to `static` (each template instantiation of a kernel has its own
//     statics, as C++ guarantees). Caveat: static shared memory keeps its contents from the
//     previous block (on the GPU it is undefined), so a kernel that reads static shared memory
//     before writing it may pass here; dynamic shared memory (MOLORA_DYNAMIC_SMEM) is refilled
//     with a NaN/garbage pattern (bytes AD DE C0 7F) before EVERY block.
//   * Within a block every CUDA thread is a host thread (a persistent pool, grown on demand up to
//     1024 threads and reused across blocks and launches).
//   * __syncthreads is a block barrier, __syncwarp and every shuffle / vote intrinsic a warp barrier
//     (lanes = linear thread id / 32). Shuffles exchange through a per-warp slot array
//     (double-buffered: one warp barrier per intrinsic).
//   * A thread that returns from the kernel (or stops at a failed MOLORA_DEVICE_ASSERT) leaves the
//     block barrier and its warp barrier ("arrive and drop"), so exited threads don't block later
//     __syncthreads, as on the GPU.
//
// Errors (reported by check_last_launch(), i.e. cuda::check_launch(), as c10::Error ->
// RuntimeError; the first error of a launch wins):
//   * invalid launch configuration (block size not in 1..1024 or not a multiple of 32 - our rule -,
//     a grid dimension of 0 or too large, too much dynamic shared memory);
//   * MOLORA_DEVICE_ASSERT failures (the failing thread stops; after the block completes, the
//     remaining blocks are not run, and later launches are skipped until the error is checked:
//     on the GPU a trap kills the context);
//   * misuse that is undefined on the GPU: a warp intrinsic with a mask other than the full mask,
//     lanes of one warp calling different warp intrinsics, a shuffle/vote in a warp where a lane
//     has exited, a shuffle width that is not a power of two <= 32;
//   * deadlocks, detected exactly: when every live thread of the block waits at a barrier that can
//     no longer complete (e.g. some threads at __syncthreads, others at a warp intrinsic), all
//     threads are released with an error. No hang;
//   * any other exception escaping a kernel thread (never a crash of the process);
//   * watchdog: a block running longer than MOLORA_EMU_TIMEOUT_S seconds (default 300; an endless
//     loop, e.g. a spin-wait on another block) aborts the launch (atomics throw once aborted); if
//     the threads still don't stop, the process is terminated with a message instead of hanging.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

// ------------------------------------------------------------------------------------------------
// Keywords.
// ------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Blocks run sequentially, one launch at a time: a function-static variable is the block's shared
// memory (see the header comment for the stale-contents caveat).
#define __shared__ static

// ------------------------------------------------------------------------------------------------
// Built-in types and variables (global namespace, as in CUDA).
// ------------------------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace molora::emu {

struct Stream {};

// Host side (defined in cuda_emu_impl.h, included at the end of this header).
void check_last_launch();
void set_max_dynamic_smem(int bytes);

namespace detail {

// Thrown inside a kernel thread to stop it (failed assert, detected misuse, aborted launch);
// caught by the thread wrapper, after which the thread behaves as an exited thread.
struct ThreadStop {};

enum WarpOp : uint32_t { kOpSyncwarp = 1, kOpShfl, kOpBallot, kOpAny, kOpAll, kOpMatch };

[[noreturn]] void device_error(const std::string& msg);  // record (first wins) + stop thread
[[noreturn]] void device_assert_fail(const char* msg, const char* cond, const char* file, int line);
void syncthreads();
// Warp exchange: publishes `value` for this lane, waits for the warp, returns the warp's 32 slots.
const uint64_t* warp_exchange(WarpOp op, unsigned mask, uint64_t value, const char* name);
unsigned lane_id();
void check_abort();  // throws ThreadStop if the launch was aborted (watchdog)
uint8_t* dynamic_smem();

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "warp intrinsics take 4- or 8-byte values");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline void check_width(int width, const char* name) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    device_error(std::string(name) + ": width must be a power of two in [1, 32], got " +
                 std::to_string(width));
}

// PTX shfl.sync semantics (mode, b = lane/delta/mask, width) -> source lane (own lane if invalid).
enum ShflMode { kIdx, kUp, kDown, kBfly };
inline unsigned shfl_source(ShflMode mode, unsigned lane, int b, int width) {
  const unsigned segmask = 31u & ~static_cast<unsigned>(width - 1);  // bits of the segment id
  const unsigned min_lane = lane & segmask;
  const unsigned max_lane = min_lane | (31u & ~segmask);
  long j = 0;
  bool ok = false;
  switch (mode) {
    case kIdx:
      j = static_cast<long>(min_lane | (static_cast<unsigned>(b) & (31u & ~segmask)));
      ok = j <= static_cast<long>(max_lane);
      break;
    case kUp:
      j = static_cast<long>(lane) - b;
      ok = j >= static_cast<long>(min_lane);
      break;
    case kDown:
      j = static_cast<long>(lane) + b;
      ok = j <= static_cast<long>(max_lane);
      break;
    case kBfly:
      j = static_cast<long>(lane ^ (static_cast<unsigned>(b) & 31u));
      ok = j <= static_cast<long>(max_lane);
      break;
  }
  return ok ? static_cast<unsigned>(j) : lane;
}

template <typename T>
inline T shfl_impl(ShflMode mode, unsigned mask, T var, int b, int width, const char* name) {
  check_width(width, name);
  const uint64_t* slots = warp_exchange(kOpShfl, mask, to_bits(var), name);
  return from_bits<T>(slots[shfl_source(mode, lane_id(), b, width)]);
}

template <typename T>
inline unsigned match_impl(unsigned mask, T value) {
  const uint64_t* slots = warp_exchange(kOpMatch, mask, to_bits(value), "__match_any_sync");
  const uint64_t mine = to_bits(value);
  unsigned r = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (slots[l] == mine) r |= 1u << l;
  return r;
}

template <typename T>
inline T* atomic_target(T* p) {
  check_abort();
  return p;
}

}  // namespace detail
}  // namespace molora::emu

// ------------------------------------------------------------------------------------------------
// Launch, dynamic shared memory, device assert.
// ------------------------------------------------------------------------------------------------
#define MOLORA_LAUNCH(grid, block, smem, stream, kernel, ...) \
  ::molora::emu::launch((grid), (block), (smem), (stream), (kernel) __VA_OPT__(, ) __VA_ARGS__)

#define MOLORA_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(::molora::emu::detail::dynamic_smem())

#define MOLORA_DEVICE_ASSERT(cond, msg)                                                       \
  do {                                                                                        \
    if (!(cond))                                                                              \
      ::molora::emu::detail::device_assert_fail(msg, #cond, __FILE__, __LINE__);              \
  } while (0)

// ------------------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics (global namespace, as in CUDA).
// ------------------------------------------------------------------------------------------------
inline void __syncthreads() { ::molora::emu::detail::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::molora::emu::detail::warp_exchange(::molora::emu::detail::kOpSyncwarp, mask, 0, "__syncwarp");
}

// Overloads per type, like cuda's (so the same implicit conversions apply: bool -> int, ...).
#define MOLORA_EMU_SHFL_OVERLOADS(T)                                                          \
  inline T __shfl_sync(unsigned mask, T var, int src, int width = 32) {                      \
    return ::molora::emu::detail::shfl_impl<T>(::molora::emu::detail::kIdx, mask, var, src,  \
                                               width, "__shfl_sync");                        \
  }                                                                                          \
  inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {            \
    return ::molora::emu::detail::shfl_impl<T>(::molora::emu::detail::kUp, mask, var,        \
                                               static_cast<int>(delta), width,               \
                                               "__shfl_up_sync");                            \
  }                                                                                          \
  inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {          \
    return ::molora::emu::detail::shfl_impl<T>(::molora::emu::detail::kDown, mask, var,      \
                                               static_cast<int>(delta), width,               \
                                               "__shfl_down_sync");                          \
  }                                                                                          \
  inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {            \
    return ::molora::emu::detail::shfl_impl<T>(::molora::emu::detail::kBfly, mask, var,      \
                                               lane_mask, width, "__shfl_xor_sync");         \
  }                                                                                          \
  inline unsigned __match_any_sync(unsigned mask, T value) {                                 \
    return ::molora::emu::detail::match_impl<T>(mask, value);                                \
  }
MOLORA_EMU_SHFL_OVERLOADS(int)
MOLORA_EMU_SHFL_OVERLOADS(unsigned int)
MOLORA_EMU_SHFL_OVERLOADS(long)
MOLORA_EMU_SHFL_OVERLOADS(unsigned long)
MOLORA_EMU_SHFL_OVERLOADS(long long)
MOLORA_EMU_SHFL_OVERLOADS(unsigned long long)
MOLORA_EMU_SHFL_OVERLOADS(float)
MOLORA_EMU_SHFL_OVERLOADS(double)
#undef MOLORA_EMU_SHFL_OVERLOADS

inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* s = ::molora::emu::detail::warp_exchange(::molora::emu::detail::kOpBallot, mask,
                                                           pred != 0, "__ballot_sync");
  unsigned r = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (s[l]) r |= 1u << l;
  return r;
}
inline int __any_sync(unsigned mask, int pred) {
  const uint64_t* s = ::molora::emu::detail::warp_exchange(::molora::emu::detail::kOpAny, mask,
                                                           pred != 0, "__any_sync");
  for (unsigned l = 0; l < 32; ++l)
    if (s[l]) return 1;
  return 0;
}
inline int __all_sync(unsigned mask, int pred) {
  const uint64_t* s = ::molora::emu::detail::warp_exchange(::molora::emu::detail::kOpAll, mask,
                                                           pred != 0, "__all_sync");
  for (unsigned l = 0; l < 32; ++l)
    if (!s[l]) return 0;
  return 1;
}

// ------------------------------------------------------------------------------------------------
// Atomics (std::atomic_ref; the types CUDA has overloads for). They check the abort flag, so a
// spin-wait on an atomic stops when the watchdog fires.
// ------------------------------------------------------------------------------------------------
#define MOLORA_EMU_ATOMIC_ARITH(T)                                                             \
  inline T atomicAdd(T* p, T v) {                                                             \
    return std::atomic_ref<T>(*::molora::emu::detail::atomic_target(p)).fetch_add(v);         \
  }                                                                                           \
  inline T atomicSub(T* p, T v) {                                                             \
    return std::atomic_ref<T>(*::molora::emu::detail::atomic_target(p)).fetch_sub(v);         \
  }                                                                                           \
  inline T atomicExch(T* p, T v) {                                                            \
    return std::atomic_ref<T>(*::molora::emu::detail::atomic_target(p)).exchange(v);          \
  }                                                                                           \
  inline T atomicCAS(T* p, T compare, T v) {                                                  \
    std::atomic_ref<T>(*::molora::emu::detail::atomic_target(p))                              \
        .compare_exchange_strong(compare, v);                                                 \
    return compare;                                                                           \
  }                                                                                           \
  inline T atomicMax(T* p, T v) {                                                             \
    std::atomic_ref<T> a(*::molora::emu::detail::atomic_target(p));                           \
    T old = a.load();                                                                         \
    while (old < v && !a.compare_exchange_weak(old, v)) {                                     \
    }                                                                                         \
    return old;                                                                               \
  }                                                                                           \
  inline T atomicMin(T* p, T v) {                                                             \
    std::atomic_ref<T> a(*::molora::emu::detail::atomic_target(p));                           \
    T old = a.load();                                                                         \
    while (v < old && !a.compare_exchange_weak(old, v)) {                                     \
    }                                                                                         \
    return old;                                                                               \
  }                                                                                           \
  inline T atomicAnd(T* p, T v) {                                                             \
    return std::atomic_ref<T>(*::molora::emu::detail::atomic_target(p)).fetch_and(v);         \
  }                                                                                           \
  inline T atomicOr(T* p, T v) {                                                              \
    return std::atomic_ref<T>(*::molora::emu::detail::atomic_target(p)).fetch_or(v);          \
  }                                                                                           \
  inline T atomicXor(T* p, T v) {                                                             \
    return std::atomic_ref<T>(*::molora::emu::detail::atomic_target(p)).fetch_xor(v);         \
  }
MOLORA_EMU_ATOMIC_ARITH(int)
MOLORA_EMU_ATOMIC_ARITH(unsigned int)
MOLORA_EMU_ATOMIC_ARITH(unsigned long long)
#undef MOLORA_EMU_ATOMIC_ARITH
// long long: CUDA has atomicMax/Min/And/Or/Xor (sm_35+) but no atomicAdd/CAS/Exch overload.
inline long long atomicMax(long long* p, long long v) {
  std::atomic_ref<long long> a(*::molora::emu::detail::atomic_target(p));
  long long old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline long long atomicMin(long long* p, long long v) {
  std::atomic_ref<long long> a(*::molora::emu::detail::atomic_target(p));
  long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline float atomicAdd(float* p, float v) {
  return std::atomic_ref<float>(*::molora::emu::detail::atomic_target(p)).fetch_add(v);
}
inline double atomicAdd(double* p, double v) {
  return std::atomic_ref<double>(*::molora::emu::detail::atomic_target(p)).fetch_add(v);
}
inline float atomicExch(float* p, float v) {
  return std::atomic_ref<float>(*::molora::emu::detail::atomic_target(p)).exchange(v);
}

inline void __threadfence() {
  ::molora::emu::detail::check_abort();
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline void __threadfence_block() { __threadfence(); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ------------------------------------------------------------------------------------------------
// Bit and math intrinsics.
// ------------------------------------------------------------------------------------------------
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline unsigned int __brev(unsigned int x) {
  unsigned int r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline float __int_as_float(int x) { return molora::emu::detail::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(molora::emu::detail::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return molora::emu::detail::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(molora::emu::detail::to_bits(x)); }

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// CUDA's global min/max overloads for device code (std::min/max work too).
#define MOLORA_EMU_MINMAX(T)                          \
  inline T min(T a, T b) { return b < a ? b : a; }    \
  inline T max(T a, T b) { return a < b ? b : a; }
MOLORA_EMU_MINMAX(int)
MOLORA_EMU_MINMAX(unsigned int)
MOLORA_EMU_MINMAX(long)
MOLORA_EMU_MINMAX(unsigned long)
MOLORA_EMU_MINMAX(long long)
MOLORA_EMU_MINMAX(unsigned long long)
#undef MOLORA_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// expf, logf, fmaxf, sqrtf, ... are in the global namespace through <cmath> / <math.h> (glibc);
// the classification functions are only in std:: there, but global in CUDA.
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

#include "cuda_emu_impl.h"
