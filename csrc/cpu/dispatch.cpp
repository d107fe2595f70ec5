// Run-time ISA selection (cpuid + xgetbv, COMPRESSOR_ISA override) and the CPU implementations of the ops:
// activation preparation, path choice by M, and threading over weight tiles with at::parallel_for.
#include "dispatch.h"

#include <ATen/Parallel.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define COMPRESSOR_X86 1
#endif
#if defined(COMPRESSOR_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace compressor {
namespace {

#ifdef COMPRESSOR_X86
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

struct CpuFeatures {
  bool avx2 = false, avx512 = false, amx = false;
  bool intel = false;  // cpuid vendor GenuineIntel (kernel tuning, not a path choice)
};

// Linux hands out the AMX tile data state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA), once per
// process; true when granted.
bool request_amx_state() {
#if defined(COMPRESSOR_X86) && defined(__linux__) && defined(SYS_arch_prctl)
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
#ifdef COMPRESSOR_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  f.intel = b == 0x756E6547 && d == 0x49656E69 && c == 0x6C65746E;  // "Genu" "ineI" "ntel"
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6, zmm_os = (xcr0 & 0xE6) == 0xE6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  const bool vnni = c & (1u << 11);
  f.avx2 = ymm_os && avx2 && fma && f16c;
  f.avx512 = f.avx2 && zmm_os && avx512f && avx512bw && avx512vl && vnni;
  const bool amx_tile = d & (1u << 24), amx_int8 = d & (1u << 25), tile_os = (xcr0 & 0x60000) == 0x60000;
  f.amx = f.avx512 && amx_tile && amx_int8 && tile_os && request_amx_state();
#endif
  return f;
}

const KernelTable* table_for(const std::string& name) {
  const CpuFeatures f = detect();
  if (name == "scalar") return scalar_kernels();
  if (name == "avx2") return f.avx2 ? avx2_kernels() : nullptr;
  if (name == "avx512") return f.avx512 ? avx512_kernels() : nullptr;
  if (name == "amx") return f.amx ? amx_kernels() : nullptr;
  return nullptr;
}

std::mutex g_mutex;
const KernelTable* g_active = nullptr;

const KernelTable* active() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_active) return g_active;
  const char* env = std::getenv("COMPRESSOR_ISA");
  if (env && *env) {
    g_active = table_for(env);
    TORCH_CHECK(g_active, "COMPRESSOR_ISA=", env, " is not available on this CPU/build (available: ",
                c10::Join(", ", available_isas()), "); unset it or pick one of those");
    return g_active;
  }
  for (const char* name : {"amx", "avx512", "avx2", "scalar"})
    if ((g_active = table_for(name))) break;
  return g_active;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Activation quantization block: divides the group (blocks never straddle groups), multiple of 32, <= 128.
int64_t act_block(const Weights& W) {
  if (W.G == 1) return 128;
  for (int64_t b : {128, 64, 32})
    if (W.group % b == 0) return b;
  return 0;
}

// Contention guard (2026-12-07). When another process keeps a core busy, a worker of ours waits for its time slice
// (milliseconds) before it joins a parallel region, and the region ends only once it has: a decode step makes
// ~120 such calls, so every one of them would wait. A worker that joins more than kLateNs after the region began
// therefore switches the ops to the calling thread alone for kSerialNs; the next region after that probes again.
// On an idle machine workers join within a few microseconds and nothing changes. COMPRESSOR_CONTENTION_GUARD=0
// turns the guard off.
constexpr int64_t kLateNs = 200'000;       // 0.2 ms: far above an idle wake-up, far below a time slice
constexpr int64_t kSerialNs = 250'000'000;  // 0.25 s of calling-thread-only calls per stall seen
std::atomic<int64_t> g_serial_until{0};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool contention_guard_on() {
  static const bool on = [] {
    const char* v = std::getenv("COMPRESSOR_CONTENTION_GUARD");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

bool run_serially() { return contention_guard_on() && now_ns() < g_serial_until.load(std::memory_order_relaxed); }

void note_join(int64_t region_start) {
  if (!contention_guard_on()) return;
  const int64_t now = now_ns();
  if (now - region_start > kLateNs) g_serial_until.store(now + kSerialNs, std::memory_order_relaxed);
}

struct Prepared {
  at::Tensor xpad, xsum, workspace;
  FloatAct fa{};
  QuantAct qa{};
};

void prepare_float(const Weights& W, const at::Tensor& x, Prepared& P) {
  const int64_t M = x.size(0), K = x.size(1);
  P.xpad = at::zeros({M, W.Kp}, x.options().dtype(at::kFloat));
  P.xpad.narrow(1, 0, K).copy_(x);
  P.xsum = at::empty({M, W.G}, P.xpad.options());
  const float* xp = P.xpad.data_ptr<float>();
  float* xs = P.xsum.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < W.G; ++g) {  // columns of group g in order (the last group runs to Kp)
      float sum = 0.f;
      for (int64_t k = g * W.group; k < W.group_end(g); ++k) sum += xp[m * W.Kp + k];
      xs[m * W.G + g] = sum;
    }
  P.fa = FloatAct{xp, xs, M};
}

// From M = 16, q, xs, qsum and tg get rows up to a multiple of 16 (zeros past M); q has 64 bytes of slack: the AMX
// kernel loads whole 16-row tiles.
void prepare_quant(const KernelTable* T, const Weights& W, const at::Tensor& x, int64_t ablk, Prepared& P) {
  const int64_t M = x.size(0), K = x.size(1), NB = (W.Kp + ablk - 1) / ablk;
  const int64_t Mp = M < 16 ? M : round_up(M, 16);  // whole 16-row tiles only where the tile kernel runs
  const at::Tensor xf = x.scalar_type() == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  auto opts = xf.options();
  const int64_t ldq = W.Kp + 64;
  // one zeroed workspace for q, xs, qsum and tg (one allocation and one memset per call: at M=1 the fixed cost
  // of a call is part of what a decode step pays per layer)
  const int64_t q_bytes = round_up(Mp * ldq + 64, 64), xs_bytes = Mp * NB * 4, tg_bytes = Mp * W.G * 4;
  P.workspace = at::empty({q_bytes + 2 * xs_bytes + tg_bytes}, opts.dtype(at::kByte));
  uint8_t* base = P.workspace.data_ptr<uint8_t>();
  std::memset(base, 0, P.workspace.numel());  // (at::zeros: one more dispatcher call)
  int8_t* q = reinterpret_cast<int8_t*>(base);
  float* xs = reinterpret_cast<float*>(base + q_bytes);
  int32_t* qsum = reinterpret_cast<int32_t*>(base + q_bytes + xs_bytes);
  float* tg = reinterpret_cast<float*>(base + q_bytes + 2 * xs_bytes);
  const ActPerm perm = act_perm(W.kind);
  const auto quantize_rows = [&](int64_t m0, int64_t m1) {
    T->quantize(xp, K, W.Kp, ldq, ablk, perm, q, xs, qsum, m0, m1);
  };
  if (run_serially())
    quantize_rows(0, M);
  else
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), quantize_rows);
  if (W.zero_terms())  // only z * s rows use the group sums (symmetric weights fold their offset into the integers)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < NB; ++b)
        tg[m * W.G + W.group_of(b * ablk)] += xs[m * NB + b] * static_cast<float>(qsum[m * NB + b]);
  P.qa = QuantAct{q, xs, qsum, tg, M, ablk, NB, ldq};
}

// Runs fn over [0, n) on at::get_num_threads() workers. Worker w owns a contiguous share of [0, n) and takes it
// front first in shrinking chunks (an eighth of what is left, whole streams); a worker that runs out takes halves
// of what is left of another's share from its back end. Each share's (begin, end) is one atomic word, so the owner
// and thieves never hand out a chunk twice.
//  - Dynamic (2026-12-03 morning): a worker the OS deschedules on a busy machine delays the call by at most one
//    chunk, not by its whole share (cold GEMV 87-97% of the probe against 83-98% with fixed shares).
//  - Owned shares (2026-12-03 evening): with one shared counter both workers took chunks from the front, so which
//    core read which weights changed from call to call; with shares a weight that fits the caches is read by the
//    same core every call. The M=1 4096 x 4096 GEMV (8.6 MB, L3-resident) was at its slowest (0.087-0.102 ms
//    against 0.056-0.073) in runs whose probe read over 55 GB/s, a placement of our two vCPUs where each may sit
//    behind its own L3. Against the shared counter, interleaved in one process: 0.94-0.99x the time (median 0.97x,
//    8 rounds, normal rounds), cold GEMV unchanged.
// Chunks are multiples of kStreamPairs = 4 tile pairs, i.e. whole weight streams (the AVX-512 kernels take a
// stream's 4 pairs at once); the weights' N is padded to whole streams, so only other callers (read_memory) see a
// shorter last chunk.
template <typename F>
void for_each_chunk(int64_t n, const F& fn) {
  const int64_t workers = std::max(1, at::get_num_threads());
  if (workers == 1 || n <= kStreamPairs || run_serially()) {
    if (n > 0) fn(0, n);
    return;
  }
  TORCH_CHECK(n < (int64_t{1} << 31), "compressor: too many chunks (", n, ")");
  struct alignas(64) Share {
    std::atomic<uint64_t> range;  // begin << 32 | end
  };
  auto shares = std::make_unique<Share[]>(workers);
  auto pack = [](int64_t b, int64_t e) { return static_cast<uint64_t>(b) << 32 | static_cast<uint64_t>(e); };
  auto boundary = [&](int64_t w) { return w >= workers ? n : n * w / workers / kStreamPairs * kStreamPairs; };
  for (int64_t w = 0; w < workers; ++w) shares[w].range.store(pack(boundary(w), boundary(w + 1)));
  // take a chunk from the front (owner) or from the back (thief) of share v; false once it is empty
  auto take = [&](int64_t v, bool front, int64_t& b, int64_t& e) {
    uint64_t cur = shares[v].range.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t lo = static_cast<int64_t>(cur >> 32), hi = static_cast<int64_t>(cur & 0xFFFFFFFFu);
      if (lo >= hi) return false;
      int64_t size = std::max<int64_t>(kStreamPairs, (hi - lo) / (front ? 8 : 2));
      size -= size % kStreamPairs;
      if (front) {
        b = lo;
        e = std::min(hi, lo + size);
      } else {  // the cut stays on a stream boundary (share ends are, except n itself)
        e = hi;
        b = std::max(lo, (hi - size) / kStreamPairs * kStreamPairs);
      }
      const uint64_t next = front ? pack(e, hi) : pack(lo, b);
      if (shares[v].range.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return true;
    }
  };
  const int64_t region_start = now_ns();
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    note_join(region_start);
    for (int64_t w = w0; w < w1; ++w) {
      int64_t b = 0, e = 0;
      while (take(w, true, b, e)) fn(b, e);
      for (bool found = true; found;) {  // then the others' leftovers, until every share is empty
        found = false;
        for (int64_t i = 1; i < workers; ++i)
          while (take((w + i) % workers, false, b, e)) {
            fn(b, e);
            found = true;
          }
      }
    }
  });
}

enum Mode : int64_t { kAuto = 0, kFloat = 1, kQ8 = 2, kGemvF32 = 3, kGemmF32 = 4 };

at::Tensor run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor* zs, int64_t group,
               int64_t out_features, int64_t mode, WKind kind) {
  TORCH_CHECK(x.dim() == 2, "compressor ops: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "compressor ops: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kInt && w.dim() == 3 && w.size(2) == kPairWordStride && w.is_contiguous(),
              "compressor ops: packed weight must be the repacked int32 [Np/64, Kw, 64] layout");
  TORCH_CHECK((s.scalar_type() == at::kFloat || s.scalar_type() == at::kHalf || s.scalar_type() == at::kBFloat16) &&
                  s.dim() == 2 && s.is_contiguous(),
              "scales must be float32, float16 or bfloat16 [G, Np], got ", s.scalar_type(), " ", s.sizes());
  Weights W{};
  W.kind = kind;
  W.zoff = code_offset(kind);
  W.w = reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>());
  W.s = s.data_ptr();
  W.stype = s.scalar_type() == at::kHalf ? SType::F16 : s.scalar_type() == at::kBFloat16 ? SType::BF16 : SType::F32;
  W.K = x.size(1);
  W.Kp = round_up(W.K, 32);
  W.Np = s.size(1);
  W.N = out_features;
  W.G = s.size(0);
  W.group = group;
  TORCH_CHECK(w.size(0) * kStreamRows == W.Np && w.size(1) == W.Kw() && W.N <= W.Np,
              "compressor ops: weight layout [", w.sizes(), "] does not match x [", x.sizes(), "] / scales [",
              s.sizes(), "]");
  TORCH_CHECK(group > 0 && (W.G - 1) * group < W.K && W.G * group >= W.K, "compressor ops: group_size ", group,
              " and ", W.G, " groups do not cover K=", W.K);
  if (zs) {
    TORCH_CHECK(zs->sizes() == s.sizes() && zs->scalar_type() == at::kFloat && zs->is_contiguous(),
                "zeros must be float32 [G, Np] like scales");
    W.zs = zs->data_ptr<float>();
  }
  const int64_t M = x.size(0);
  // zeroed chunk by chunk by the worker that computes it (the kernels accumulate into y)
  at::Tensor y = at::empty({M, W.Np}, x.options().dtype(at::kFloat));
  // rows past N (padding) are cut by a view; skipped when there are none (a dispatcher call per op call)
  auto result = [&] { return W.N == W.Np ? y : y.narrow(1, 0, W.N); };
  if (M == 0) return result();

  const bool simd_ok = W.G == 1 || W.group % W.block_cols() == 0;
  const KernelTable* T = simd_ok ? active() : scalar_kernels();
  const int64_t ablk = kind == WKind::Fp8 ? 0 : act_block(W);
  TORCH_CHECK(mode >= kAuto && mode <= kGemmF32, "compressor ops: unknown mode ", mode);
  if (mode == kAuto) mode = M < 16 ? kQ8 : kFloat;
  if (mode == kQ8 && !ablk) mode = kFloat;  // fp8, or a group size that is not a multiple of 32
  if (mode == kFloat) mode = M < 16 ? kGemvF32 : kGemmF32;

  Prepared P;
  if (mode == kQ8)
    prepare_quant(T, W, x, ablk, P);
  else
    prepare_float(W, x, P);
  float* yp = y.data_ptr<float>();
  const int64_t pairs = W.Np / 16;
  for_each_chunk(pairs, [&](int64_t p0, int64_t p1) {
    for (int64_t m = 0; m < M; ++m) std::memset(yp + m * W.Np + 16 * p0, 0, 16 * (p1 - p0) * sizeof(float));
    if (mode == kQ8)
      (M >= 16 ? T->gemm_q8 : T->gemv_q8)(W, P.qa, yp, 2 * p0, 2 * p1);
    else if (mode == kGemvF32)
      T->gemv_f32(W, P.fa, yp, 2 * p0, 2 * p1);
    else
      T->gemm_f32(W, P.fa, yp, 2 * p0, 2 * p1);
  });
  return result();
}

}  // namespace

bool cpu_is_intel() {
  static const bool intel = detect().intel;
  return intel;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* name : {"scalar", "avx2", "avx512", "amx"})
    if (table_for(name)) out.emplace_back(name);
  return out;
}

std::string current_isa() { return active()->name; }

std::string set_isa(const std::string& name) {
  const std::string previous = current_isa();
  const KernelTable* t = table_for(name);
  TORCH_CHECK(t, "ISA '", name, "' is not available here (available: ", c10::Join(", ", available_isas()), ")");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_active = t;
  return previous;
}

void parallel_chunks(int64_t n, const std::function<void(int64_t, int64_t)>& fn) { for_each_chunk(n, fn); }

int64_t read_memory(const at::Tensor& buf) {
  TORCH_CHECK(buf.is_contiguous() && buf.nbytes() % 256 == 0, "read_memory: contiguous buffer, size multiple of 256");
  const uint8_t* p = static_cast<const uint8_t*>(buf.data_ptr());
  const KernelTable* T = active();
  std::atomic<uint64_t> result{0};
  for_each_chunk(static_cast<int64_t>(buf.nbytes() / 256), [&](int64_t b, int64_t e) {
    result.fetch_xor(T->read(p + 256 * b, 256 * (e - b)));
  });
  return static_cast<int64_t>(result.load());
}

at::Tensor int4_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t out_features, int64_t mode) {
  return run(x, w, scales, zeros ? &*zeros : nullptr, group_size, out_features, mode, WKind::Int4);
}

at::Tensor int8_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t out_features, int64_t mode) {
  return run(x, w, scales, zeros ? &*zeros : nullptr, group_size, out_features, mode, WKind::Int8);
}

at::Tensor int2_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t out_features, int64_t mode) {
  return run(x, w, scales, zeros ? &*zeros : nullptr, group_size, out_features, mode, WKind::Int2);
}

at::Tensor int3_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t out_features, int64_t mode) {
  return run(x, w, scales, zeros ? &*zeros : nullptr, group_size, out_features, mode, WKind::Int3);
}

at::Tensor fp8_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group_size,
                        int64_t out_features, int64_t mode) {
  return run(x, w, scales, nullptr, group_size, out_features, mode, WKind::Fp8);
}

}  // namespace compressor
