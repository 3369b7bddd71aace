// Implementation of the CUDA emulation shim (see cuda_emu.h for the model). Header-only: the
// emulation module is a single translation unit (csrc/emu/emu_bindings.cpp, or the TU that
// scripts/build_emu.py writes), everything here is `inline`.
#pragma once

#include <c10/util/Exception.h>

#include <chrono>
#include <condition_variable>
#include <pthread.h>

#include <map>
#include <memory>
#include <mutex>
#include <semaphore>
#include <sstream>
#include <thread>
#include <vector>

namespace molora::emu {
namespace detail {

constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kDefaultMaxDynamicSmem = 48 * 1024;
constexpr int kHardMaxDynamicSmem = 227 * 1024;  // sm_90 opt-in limit (sm_80: 163 KiB)
constexpr int kCanary = 256;                        // guard bytes around dynamic smem
constexpr uint32_t kSmemPattern = 0x7FC0DEADu;      // fp32 NaN, fp16 NaN/-427, huge int32

// ---- errors -------------------------------------------------------------------------------------
struct LastError {
  std::mutex m;
  bool set = false;
  bool sticky = false;  // a device-side failure: later launches are skipped until checked
  std::string msg;
};
inline LastError& last_error() {
  static LastError* e = new LastError;  // leaked: never destroyed while worker threads live
  return *e;
}
inline void record_last_error(const std::string& msg, bool sticky) {
  LastError& e = last_error();
  std::lock_guard<std::mutex> lk(e.m);
  if (!e.set) {
    e.set = true;
    e.msg = msg;
  }
  e.sticky = e.sticky || sticky;
}

// ---- per-launch and per-block state ------------------------------------------------------------
struct Barrier {
  int expected = 0;
  int arrived = 0;
  int waiters = 0;
  std::atomic<uint32_t> gen{0};
};

struct WarpSlots {
  uint64_t value[32];
  uint64_t tag[32];
};

struct Warp {
  Barrier bar;
  int lanes = 0;
  WarpSlots slots[2];
  int expected_at_phase[2] = {0, 0};  // barrier.expected when phase (gen & 1) completed
  std::atomic<bool> lane_exited[32];
  Warp() {
    for (auto& e : lane_exited) e.store(false, std::memory_order_relaxed);
  }
};

struct Launch;

struct Block {
  std::mutex m;  // guards every barrier's counters and alive/blocked
  int alive = 0;
  int blocked = 0;
  Barrier bar;
  std::unique_ptr<Warp[]> warps;
  int num_warps = 0;
  uint3 idx{0, 0, 0};
  explicit Block(int nthreads, uint3 block_idx) : idx(block_idx) {
    alive = nthreads;
    bar.expected = nthreads;
    num_warps = (nthreads + 31) / 32;
    warps.reset(new Warp[num_warps]);
    for (int w = 0; w < num_warps; ++w) {
      warps[w].lanes = std::min(32, nthreads - 32 * w);
      warps[w].bar.expected = warps[w].lanes;
    }
  }
};

struct Launch {
  const std::function<void()>* body = nullptr;
  dim3 grid, block;
  int nthreads = 0;
  uint8_t* smem = nullptr;
  std::atomic<bool> abort{false};
  std::mutex err_m;
  bool has_err = false;
  std::string err;
  // completion of the current block
  std::mutex done_m;
  std::condition_variable done_cv;
  int done = 0;
  Block* cur = nullptr;
};

struct ThreadCtx {
  Launch* L;
  Block* B;
  int tid;
  int lane;
  int warp;
  uint32_t seq;  // number of warp intrinsics this thread has executed in this block
};
inline thread_local ThreadCtx* tctx = nullptr;

inline ThreadCtx& ctx() {
  ThreadCtx* c = tctx;
  TORCH_CHECK(c != nullptr, "molora emulation: a device intrinsic was called outside a kernel");
  return *c;
}

inline std::string where(const ThreadCtx& c) {
  std::ostringstream s;
  s << "block (" << c.B->idx.x << "," << c.B->idx.y << "," << c.B->idx.z << ") thread ("
    << threadIdx.x << "," << threadIdx.y << "," << threadIdx.z << ")";
  return s.str();
}

inline void record_launch_error(Launch& L, const std::string& msg) {
  std::lock_guard<std::mutex> lk(L.err_m);
  if (!L.has_err) {
    L.has_err = true;
    L.err = msg;
  }
}

// Wake every waiter of every barrier of the block (abort / deadlock). Caller holds B.m.
inline void wake_all_locked(Block& B) {
  B.bar.gen.fetch_add(1);
  B.bar.gen.notify_all();
  for (int w = 0; w < B.num_warps; ++w) {
    B.warps[w].bar.gen.fetch_add(1);
    B.warps[w].bar.gen.notify_all();
  }
}

// Caller holds B.m.
inline void deadlock_locked(Launch& L, Block& B, const ThreadCtx* c) {
  std::ostringstream s;
  s << "molora emulation: deadlock in block (" << B.idx.x << "," << B.idx.y << "," << B.idx.z
    << "): every live thread (" << B.alive << ") waits at a barrier that can no longer complete";
  if (B.bar.arrived > 0)
    s << "; " << B.bar.arrived << " of " << B.bar.expected << " live threads wait at __syncthreads";
  for (int w = 0; w < B.num_warps; ++w)
    if (B.warps[w].bar.arrived > 0)
      s << "; warp " << w << ": " << B.warps[w].bar.arrived << " of " << B.warps[w].bar.expected
        << " live lanes wait at a warp intrinsic (__syncwarp/__shfl*/vote)";
  if (c != nullptr) s << " (detected by thread " << c->tid << ")";
  s << ". Divergent __syncthreads / warp intrinsics?";
  record_launch_error(L, s.str());
  L.abort.store(true);
  wake_all_locked(B);
}

// Caller holds B.m. Completes the current phase of `bar`.
inline void complete_locked(Block& B, Barrier& bar, Warp* warp) {
  if (warp != nullptr) warp->expected_at_phase[bar.gen.load() & 1u] = bar.expected;
  bar.arrived = 0;
  B.blocked -= bar.waiters;
  bar.waiters = 0;
  bar.gen.fetch_add(1);
  bar.gen.notify_all();
}

// Arrive at `bar` and wait for the phase to complete. Returns the phase's gen value.
inline uint32_t barrier_wait(ThreadCtx& c, Barrier& bar, Warp* warp) {
  Launch& L = *c.L;
  Block& B = *c.B;
  std::unique_lock<std::mutex> lk(B.m);
  if (L.abort.load()) throw ThreadStop{};
  const uint32_t g = bar.gen.load();
  if (++bar.arrived == bar.expected) {
    complete_locked(B, bar, warp);
    return g;
  }
  ++bar.waiters;
  ++B.blocked;
  if (B.blocked == B.alive) {
    deadlock_locked(L, B, &c);
    throw ThreadStop{};
  }
  lk.unlock();
  bar.gen.wait(g);
  if (L.abort.load()) throw ThreadStop{};
  return g;
}

// Caller holds B.m: a thread leaves `bar` for good.
inline void drop_locked(Block& B, Barrier& bar, Warp* warp) {
  --bar.expected;
  if (bar.arrived > 0 && bar.arrived == bar.expected) complete_locked(B, bar, warp);
}

inline void thread_exit(ThreadCtx& c) {
  Launch& L = *c.L;
  Block& B = *c.B;
  Warp& w = B.warps[c.warp];
  std::lock_guard<std::mutex> lk(B.m);
  w.lane_exited[c.lane].store(true);
  --B.alive;
  if (L.abort.load()) return;
  drop_locked(B, B.bar, nullptr);
  drop_locked(B, w.bar, &w);
  if (B.alive > 0 && B.blocked == B.alive) deadlock_locked(L, B, nullptr);
}

[[noreturn]] inline void device_error(const std::string& msg) {
  ThreadCtx& c = ctx();
  record_launch_error(*c.L, "molora emulation: " + msg + " (" + where(c) + ")");
  throw ThreadStop{};
}

[[noreturn]] inline void device_assert_fail(const char* msg, const char* cond, const char* file,
                                            int line) {
  // Outside a kernel (a __host__ __device__ helper called by a launcher): a plain c10::Error.
  TORCH_CHECK(tctx != nullptr, "molora assert failed: ", msg, " [", cond, "] (", file, ":", line, ")");
  ThreadCtx& c = ctx();
  std::ostringstream s;
  s << "device-side assert triggered: molora device assert failed: " << msg << " [" << cond
    << "] (" << file << ":" << line << ") in " << where(c);
  record_launch_error(*c.L, s.str());
  throw ThreadStop{};
}

inline void syncthreads() {
  ThreadCtx& c = ctx();
  barrier_wait(c, c.B->bar, nullptr);
}

inline unsigned lane_id() { return static_cast<unsigned>(ctx().lane); }

inline void check_abort() {
  ThreadCtx* c = tctx;
  if (c != nullptr && c->L->abort.load(std::memory_order_relaxed)) throw ThreadStop{};
}

inline uint8_t* dynamic_smem() { return ctx().L->smem; }

inline const char* op_name(uint32_t op) {
  switch (op) {
    case kOpSyncwarp: return "__syncwarp";
    case kOpShfl: return "__shfl*_sync";
    case kOpBallot: return "__ballot_sync";
    case kOpAny: return "__any_sync";
    case kOpAll: return "__all_sync";
    case kOpMatch: return "__match_any_sync";
    default: return "?";
  }
}

inline const uint64_t* warp_exchange(WarpOp op, unsigned mask, uint64_t value, const char* name) {
  ThreadCtx& c = ctx();
  if (mask != 0xffffffffu) {
    std::ostringstream s;
    s << name << " with mask 0x" << std::hex << mask
      << ": only the full mask (kFullMask) is supported (cuda_compat.cuh)";
    device_error(s.str());
  }
  Warp& w = c.B->warps[c.warp];
  const uint32_t p = c.seq & 1u;
  const uint64_t tag = (static_cast<uint64_t>(op) << 32) | c.seq;
  ++c.seq;
  w.slots[p].value[c.lane] = value;
  w.slots[p].tag[c.lane] = tag;
  const uint32_t g = barrier_wait(c, w.bar, &w);
  if (op != kOpSyncwarp && w.expected_at_phase[g & 1u] != w.lanes)
    device_error(std::string(name) + " in warp " + std::to_string(c.warp) +
                 " after some of its lanes exited (undefined on the GPU: every lane of the full "
                 "mask must execute it)");
  for (int l = 0; l < w.lanes; ++l) {
    if (w.lane_exited[l].load()) continue;
    if (w.slots[p].tag[l] != tag) {
      const uint64_t t = w.slots[p].tag[l];
      std::ostringstream s;
      s << "lanes of warp " << c.warp << " execute different warp intrinsics: lane " << c.lane
        << " " << name << " (#" << (tag & 0xffffffffu) << " of this thread), lane " << l << " "
        << op_name(static_cast<uint32_t>(t >> 32)) << " (#" << (t & 0xffffffffu)
        << "); divergent warp-synchronous code?";
      device_error(s.str());
    }
  }
  return w.slots[p].value;
}

// ---- thread pool ------------------------------------------------------------------------------
struct Job {
  Launch* L = nullptr;
  Block* B = nullptr;
};
inline Job& current_job() {
  static Job* j = new Job;
  return *j;
}

inline void run_thread(int tid) {
  const Job job = current_job();
  Launch& L = *job.L;
  Block& B = *job.B;
  const unsigned bx = L.block.x, by = L.block.y;
  threadIdx = uint3{static_cast<unsigned>(tid) % bx, (static_cast<unsigned>(tid) / bx) % by,
                    static_cast<unsigned>(tid) / (bx * by)};
  blockIdx = B.idx;
  blockDim = L.block;
  gridDim = L.grid;
  ThreadCtx c{&L, &B, tid, tid % 32, tid / 32, 0};
  tctx = &c;
  try {
    (*L.body)();
  } catch (const ThreadStop&) {
  } catch (const c10::Error& e) {
    record_launch_error(L, std::string("molora emulation: exception escaped a kernel thread (") +
                               where(c) + "): " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    record_launch_error(L, std::string("molora emulation: exception escaped a kernel thread (") +
                               where(c) + "): " + e.what());
  } catch (...) {
    record_launch_error(L, "molora emulation: unknown exception escaped a kernel thread (" +
                               where(c) + ")");
  }
  try {
    thread_exit(c);
  } catch (...) {
  }
  tctx = nullptr;
  std::lock_guard<std::mutex> lk(L.done_m);
  if (++L.done == L.nthreads) L.done_cv.notify_all();
}

struct Worker {
  std::binary_semaphore go{0};
  int index = 0;
};

struct Pool {
  std::vector<Worker*> workers;  // leaked with the pool: threads are detached, live forever
};
inline Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

inline std::mutex& launch_mutex();

// After fork() only the forking thread exists in the child: forget the parent's workers (leaked)
// so that a launch in the child starts its own instead of waiting for threads that are gone.
inline void after_fork_in_child() {
  pool().workers.clear();
  new (&launch_mutex()) std::mutex;  // it may have been held by another thread of the parent
}

inline void ensure_workers(int n) {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, &after_fork_in_child); });
  Pool& p = pool();
  while (static_cast<int>(p.workers.size()) < n) {
    Worker* w = new Worker;
    w->index = static_cast<int>(p.workers.size());
    std::thread([w] {
      for (;;) {
        w->go.acquire();
        run_thread(w->index);
      }
    }).detach();
    p.workers.push_back(w);
  }
}

// ---- launch -----------------------------------------------------------------------------------
inline std::mutex& launch_mutex() {
  static std::mutex* m = new std::mutex;
  return *m;
}

struct SmemLimits {
  std::mutex m;
  int global_max = kDefaultMaxDynamicSmem;
  std::map<const void*, int> per_kernel;
};
inline SmemLimits& smem_limits() {
  static SmemLimits* s = new SmemLimits;
  return *s;
}

inline double watchdog_seconds() {
  static const double s = [] {
    const char* v = std::getenv("MOLORA_EMU_TIMEOUT_S");
    const double d = v != nullptr ? std::atof(v) : 0.0;
    return d > 0 ? d : 300.0;
  }();
  return s;
}

template <typename G>
inline bool to_dim3(const G& g, dim3& out) {
  if constexpr (std::is_integral_v<G>) {
    if (g < 1 || static_cast<unsigned long long>(g) > 0x7fffffffull) {
      out = dim3(0);
      return false;
    }
    out = dim3(static_cast<unsigned>(g));
    return true;
  } else {
    out = dim3(g);
    return true;
  }
}

inline std::string dim_str(const dim3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

inline void fill_pattern(uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; i += 4) {
    uint32_t v = kSmemPattern;
    std::memcpy(p + i, &v, std::min<size_t>(4, n - i));
  }
}

// Runs every block of the grid. Caller holds launch_mutex.
inline void run_launch(const dim3& grid, const dim3& block, size_t smem, const void* kernel_key,
                       const std::function<void()>& body) {
  {
    LastError& e = last_error();
    std::lock_guard<std::mutex> lk(e.m);
    if (e.set && e.sticky) return;  // like a GPU context after a trap: nothing runs anymore
  }
  // ---- configuration checks (CUDA: cudaErrorInvalidConfiguration) ----
  std::string bad;
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535)
    bad = "grid " + dim_str(grid) + " out of range (each dimension >= 1; x < 2^31, y, z <= 65535)";
  else if (block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024 || block.y > 1024 ||
           block.z > 64 || nthreads > kMaxThreadsPerBlock)
    bad = "block " + dim_str(block) + " out of range (1..1024 threads)";
  else if (nthreads % 32 != 0)
    bad = "block " + dim_str(block) + " has " + std::to_string(nthreads) +
          " threads, not a multiple of 32 (molora rule, cuda_compat.cuh)";
  else {
    int limit;
    {
      SmemLimits& s = smem_limits();
      std::lock_guard<std::mutex> lk(s.m);
      limit = s.global_max;
      auto it = s.per_kernel.find(kernel_key);
      if (it != s.per_kernel.end()) limit = it->second;  // the kernel's own attribute wins
    }
    if (smem > static_cast<size_t>(limit))
      bad = std::to_string(smem) + " bytes of dynamic shared memory > the kernel's limit " +
            std::to_string(limit) + " (default 48 KiB; raise with cuda::set_max_dynamic_smem, at most " +
            std::to_string(kHardMaxDynamicSmem) + ")";
  }
  if (!bad.empty()) {
    record_last_error("CUDA error (emulated): invalid configuration argument: " + bad, false);
    return;
  }

  Launch L;
  L.body = &body;
  L.grid = grid;
  L.block = block;
  L.nthreads = static_cast<int>(nthreads);
  const size_t total = smem + 2 * kCanary + 16;
  std::unique_ptr<uint8_t[]> raw(new uint8_t[total]);
  uint8_t* base = raw.get();
  base += (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
  L.smem = base + kCanary;
  ensure_workers(L.nthreads);
  Pool& p = pool();
  const auto timeout = std::chrono::duration<double>(watchdog_seconds());
  std::vector<uint8_t> ref(smem + 2 * kCanary);  // the pattern, to check the guard bytes
  fill_pattern(ref.data(), ref.size());

  for (unsigned bz = 0; bz < grid.z && !L.has_err; ++bz)
    for (unsigned by = 0; by < grid.y && !L.has_err; ++by)
      for (unsigned bx = 0; bx < grid.x && !L.has_err; ++bx) {
        fill_pattern(base, smem + 2 * kCanary);
        Block B(L.nthreads, uint3{bx, by, bz});
        L.cur = &B;
        L.done = 0;
        current_job() = Job{&L, &B};
        for (int t = 0; t < L.nthreads; ++t) p.workers[t]->go.release();
        std::unique_lock<std::mutex> lk(L.done_m);
        if (!L.done_cv.wait_for(lk, timeout, [&] { return L.done == L.nthreads; })) {
          record_launch_error(L, "molora emulation: watchdog: block (" + std::to_string(bx) + "," +
                                     std::to_string(by) + "," + std::to_string(bz) +
                                     ") did not finish within " +
                                     std::to_string(watchdog_seconds()) +
                                     " s (MOLORA_EMU_TIMEOUT_S): endless loop or a spin-wait on "
                                     "another block?");
          L.abort.store(true);
          {
            std::lock_guard<std::mutex> bl(B.m);
            wake_all_locked(B);
          }
          if (!L.done_cv.wait_for(lk, std::chrono::seconds(30),
                                  [&] { return L.done == L.nthreads; })) {
            std::fprintf(stderr, "%s\nmolora emulation: the kernel threads do not stop; aborting "
                                 "the process instead of hanging.\n", L.err.c_str());
            std::fflush(stderr);
            std::abort();
          }
        }
        lk.unlock();
        // Out-of-bounds writes to dynamic shared memory (caught within the guard bytes).
        if (std::memcmp(base, ref.data(), kCanary) != 0 ||
            std::memcmp(base + kCanary + smem, ref.data() + kCanary + smem, kCanary) != 0)
          record_launch_error(L, "molora emulation: a kernel wrote outside its " +
                                     std::to_string(smem) + " bytes of dynamic shared memory (block " +
                                     dim_str(dim3(bx, by, bz)) + ")");
        L.cur = nullptr;
      }
  if (L.has_err) record_last_error(L.err, true);
}

template <typename K>
inline const void* kernel_key(K kernel) {
  if constexpr (std::is_pointer_v<std::decay_t<K>>)
    return reinterpret_cast<const void*>(kernel);
  else
    return nullptr;
}

}  // namespace detail

inline void check_last_launch() {
  detail::LastError& e = detail::last_error();
  std::string msg;
  {
    std::lock_guard<std::mutex> lk(e.m);
    if (!e.set) return;
    msg = e.msg;
    e.set = false;
    e.sticky = false;
    e.msg.clear();
  }
  TORCH_CHECK(false, msg);
}

// launch.h's emulation branch calls this one (no kernel argument): it raises the limit of every
// kernel that has no limit of its own.
inline void set_max_dynamic_smem(int bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= detail::kHardMaxDynamicSmem,
              "CUDA error (emulated): invalid argument: max dynamic shared memory ", bytes,
              " > ", detail::kHardMaxDynamicSmem, " bytes");
  detail::SmemLimits& s = detail::smem_limits();
  std::lock_guard<std::mutex> lk(s.m);
  s.global_max = std::max(s.global_max, bytes);
}

// Per-kernel limit, like cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes).
template <typename K>
inline void set_max_dynamic_smem(K kernel, int bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= detail::kHardMaxDynamicSmem,
              "CUDA error (emulated): invalid argument: max dynamic shared memory ", bytes,
              " > ", detail::kHardMaxDynamicSmem, " bytes");
  detail::SmemLimits& s = detail::smem_limits();
  std::lock_guard<std::mutex> lk(s.m);
  s.per_kernel[detail::kernel_key(kernel)] = bytes;
}

// MOLORA_LAUNCH(grid, block, smem, stream, kernel, args...): every thread calls kernel(args...)
// (arguments are copied into the kernel's by-value parameters, as on the GPU).
template <typename G, typename B, typename K, typename... Args>
inline void launch(const G& grid, const B& block, size_t smem, Stream, K kernel,
                   const Args&... args) {
  TORCH_CHECK(detail::tctx == nullptr,
              "molora emulation: kernel launch from inside a kernel (dynamic parallelism is not "
              "supported)");
  std::lock_guard<std::mutex> lk(detail::launch_mutex());
  dim3 g, b;
  const bool ok_g = detail::to_dim3(grid, g);
  const bool ok_b = detail::to_dim3(block, b);
  if (!ok_g || !ok_b) {
    detail::record_last_error(
        std::string("CUDA error (emulated): invalid configuration argument: ") +
            (!ok_g ? "grid" : "block") + " size out of range (must be in [1, 2^31))",
        false);
    return;
  }
  const std::function<void()> body = [&]() { kernel(args...); };
  detail::run_launch(g, b, smem, detail::kernel_key(kernel), body);
}

}  // namespace molora::emu
