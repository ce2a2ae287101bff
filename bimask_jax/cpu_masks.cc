// Forward and Bi-Mask backward masks of one (K, C) float32 kernel in a single pass, as an XLA FFI
// handler for the CPU (AVX-512 F/BW/VL/DQ). Compiled on first use by bimask_jax/cpu_masks.py, which
// also states the rule; bimask_jax/masks.py computes the same masks with plain XLA ops, and the tests
// check that the two agree bit for bit.
//
// Ranking rule (as in masks.py): larger |w| wins, ties go to the lower index, NaN ranks as +inf. The
// magnitudes are compared as int32 bit patterns: for non-negative floats the integer order is the float
// order, and min(bits, bits(+inf)) maps every NaN onto +inf. A forward-dropped entry gets key -1, below
// every kept one, for the backward ranking.
//
// Work is done per tile of 16 rows (m divides 16, so a tile holds whole forward groups):
//   1. per 16 columns: load the 16 rows, rank each forward group of m rows (vertical compares), store
//      the forward mask, turn the tile's keys into 16 column vectors (a 16x16 register transpose) and
//      store them in T (C x 16 int32, one 64-byte vector per column);
//   2. per backward group q: the m columns perm[q*m + j] are m aligned vector loads from T; rank them
//      (again vertical: lane = row), and store a 16-bit keep word per column (bit r = row r);
//   3. per 64 columns: spread the keep words back into 16 rows of bytes.
// The column permutation thus costs one scalar index load per column and tile, not a gather per
// element. Tiles are independent; the handler splits them over XLA's intra-op thread pool.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__)
#error "bimask_jax's CPU mask kernel needs AVX-512 F, BW, VL and DQ (compiled with -march=native)"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 16;
constexpr int32_t kAbsBits = 0x7fffffff;
constexpr int32_t kInfBits = 0x7f800000;

inline __mmask16 lanes16(int64_t rem) {
  return rem >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rem) - 1u);
}

inline __mmask64 lanes64(int64_t rem) {
  return rem >= 64 ? ~static_cast<__mmask64>(0) : ((static_cast<__mmask64>(1) << rem) - 1);
}

// keep[t] (per lane): fewer than n of v[0..M) beat v[t]; v[s] beats v[t] if greater, or equal and s < t.
template <int M>
inline void rank_keep(const __m512i (&v)[M], int n, __mmask16 (&keep)[M]) {
  __m512i r[M];
  const __m512i one = _mm512_set1_epi32(1);
  for (int t = 0; t < M; ++t) r[t] = _mm512_setzero_si512();
  for (int s = 0; s < M; ++s)
    for (int t = s + 1; t < M; ++t) {
      const __mmask16 k = _mm512_cmpge_epi32_mask(v[s], v[t]);  // s beats t, else t beats s
      r[t] = _mm512_mask_add_epi32(r[t], k, r[t], one);
      r[s] = _mm512_mask_add_epi32(r[s], static_cast<__mmask16>(~k), r[s], one);
    }
  const __m512i nv = _mm512_set1_epi32(n);
  for (int t = 0; t < M; ++t) keep[t] = _mm512_cmplt_epi32_mask(r[t], nv);
}

// In-register 16x16 transpose of 32-bit lanes: afterwards x[j] lane i is the old x[i] lane j.
inline void transpose16(__m512i (&x)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    x[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    x[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    x[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    x[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_i32x4(x[8 * i + k], x[8 * i + 4 + k], 0x88);
      t[8 * i + 4 + k] = _mm512_shuffle_i32x4(x[8 * i + k], x[8 * i + 4 + k], 0xdd);
    }
  for (int k = 0; k < 8; ++k) {
    x[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
    x[8 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xdd);
  }
}

struct Scratch {
  int32_t* cols = nullptr;  // C x 16 keys, column-major within the tile (64-byte aligned)
  uint16_t* keep = nullptr;  // C keep words, bit r = row r of the tile
  explicit Scratch(int64_t c) {  // c == 0: forward only, no scratch
    if (c == 0) return;
    cols = static_cast<int32_t*>(std::aligned_alloc(64, ((c * kTile * 4 + 63) / 64) * 64));
    keep = static_cast<uint16_t*>(std::aligned_alloc(64, ((c * 2 + 63) / 64) * 64));
  }
  ~Scratch() {
    std::free(cols);
    std::free(keep);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// One tile of R rows (R <= 16, R % M == 0) starting at w; fwd/bwd point at the same rows.
template <int M>
void tile(const int32_t* __restrict w, int64_t C, int R, int n, const int32_t* __restrict perm,
          bool* __restrict fwd, bool* __restrict bwd, Scratch& s) {
  const __m512i abs_bits = _mm512_set1_epi32(kAbsBits), inf_bits = _mm512_set1_epi32(kInfBits);
  const __m512i dropped = _mm512_set1_epi32(-1);
  const __m128i one8 = _mm_set1_epi8(1);
  uint8_t* __restrict f8 = reinterpret_cast<uint8_t*>(fwd);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 L = lanes16(C - c);
    __m512i key[kTile];
    // 16 row streams are more than the hardware prefetchers keep ahead of: fetch two chunks ahead.
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(w + r * C + c + 32), _MM_HINT_T0);
    for (int b = 0; b < kTile; b += M) {
      if (b >= R) {
        for (int t = 0; t < M; ++t) key[b + t] = dropped;
        continue;
      }
      __m512i a[M];
      for (int t = 0; t < M; ++t) {
        const __m512i x = _mm512_maskz_loadu_epi32(L, w + (b + t) * C + c);
        a[t] = _mm512_min_epu32(_mm512_and_si512(x, abs_bits), inf_bits);
      }
      __mmask16 k[M];
      rank_keep<M>(a, n, k);
      for (int t = 0; t < M; ++t) {
        _mm_mask_storeu_epi8(f8 + (b + t) * C + c, L, _mm_maskz_mov_epi8(k[t], one8));
        key[b + t] = _mm512_mask_blend_epi32(k[t], dropped, a[t]);
      }
    }
    if (bwd == nullptr) continue;
    transpose16(key);
    const int valid = static_cast<int>(std::min<int64_t>(16, C - c));
    for (int i = 0; i < valid; ++i) _mm512_store_si512(s.cols + (c + i) * kTile, key[i]);
  }
  if (bwd == nullptr) return;

  for (int64_t q = 0; q < C; q += M) {
    __m512i v[M];
    for (int j = 0; j < M; ++j) v[j] = _mm512_load_si512(s.cols + int64_t{perm[q + j]} * kTile);
    __mmask16 k[M];
    rank_keep<M>(v, n, k);
    for (int j = 0; j < M; ++j)  // and only forward-kept entries (key >= 0, sign bit clear)
      s.keep[perm[q + j]] = static_cast<uint16_t>(k[j] & ~_mm512_movepi32_mask(v[j]));
  }

  uint8_t* __restrict b8 = reinterpret_cast<uint8_t*>(bwd);
  const __m512i one = _mm512_set1_epi8(1);
  for (int64_t c = 0; c < C; c += 64) {
    const __mmask64 L = lanes64(C - c);
    const __mmask32 L0 = static_cast<__mmask32>(L), L1 = static_cast<__mmask32>(L >> 32);
    const __m512i w0 = _mm512_maskz_loadu_epi16(L0, s.keep + c);
    const __m512i w1 = _mm512_maskz_loadu_epi16(L1, s.keep + c + 32);
    const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(w0)),
                                          _mm512_cvtepi16_epi8(w1), 1);  // bits of rows 0-7
    const __m512i hi = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_srli_epi16(w0, 8))),
        _mm512_cvtepi16_epi8(_mm512_srli_epi16(w1, 8)), 1);  // bits of rows 8-15
    for (int r = 0; r < R; ++r) {
      const __m512i bit = _mm512_set1_epi8(static_cast<char>(1 << (r & 7)));
      const __m512i x = _mm512_min_epu8(_mm512_and_si512(r < 8 ? lo : hi, bit), one);
      _mm512_mask_storeu_epi8(b8 + r * C + c, L, x);
    }
  }
}

using TileFn = void (*)(const int32_t*, int64_t, int, int, const int32_t*, bool*, bool*, Scratch&);

TileFn tile_fn(int64_t m) {
  switch (m) {
    case 1: return tile<1>;
    case 2: return tile<2>;
    case 4: return tile<4>;
    case 8: return tile<8>;
    case 16: return tile<16>;
    default: return nullptr;
  }
}

// Runs tiles [0, tiles) as chunks claimed from a shared counter by the calling thread and by up to
// `helpers` tasks on XLA's pool. The caller waits only for claimed chunks to finish, never for a task
// to start, so a busy pool (or one whose workers all wait in this handler) cannot deadlock it.
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename Body>
void run_chunks(ffi::ThreadPool& pool, int64_t chunks, int helpers, Body body) {
  auto job = std::make_shared<Job>();
  auto work = [job, chunks, body]() {
    for (int64_t i; (i = job->next.fetch_add(1)) < chunks;) {
      body(i);
      if (job->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(job->mu);
        job->cv.notify_all();
      }
    }
  };
  for (int h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == chunks; });
}

// Checks the arguments, then runs the tiles of w over the pool. perm == nullptr: forward mask only.
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& w, const int32_t* p, int64_t perm_len,
               bool* f, bool* b, int64_t n, int64_t m) {
  const auto dims = w.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("kernel must be 2-D (K, C)");
  const int64_t K = dims[0], C = dims[1];
  const TileFn fn = tile_fn(m);
  if (fn == nullptr) return ffi::Error::InvalidArgument("m must divide 16");
  if (n < 1 || n > m) return ffi::Error::InvalidArgument("need 1 <= n <= m");
  if (K % m != 0) return ffi::Error::InvalidArgument("kernel rows (K) must be divisible by m");
  if (b != nullptr) {  // an out-of-range or repeated index would read out of bounds or stale scratch
    if (C % m != 0) return ffi::Error::InvalidArgument("kernel columns (C) must be divisible by m");
    if (perm_len != C) return ffi::Error::InvalidArgument("perm must have length C");
    std::vector<uint8_t> seen(C, 0);
    for (int64_t i = 0; i < C; ++i) {
      if (p[i] < 0 || p[i] >= C || seen[p[i]])
        return ffi::Error::InvalidArgument("perm is not a permutation of range(C)");
      seen[p[i]] = 1;
    }
  }
  if (K == 0 || C == 0) return ffi::Error::Success();

  const int32_t* wi = reinterpret_cast<const int32_t*>(w.typed_data());
  const int64_t tiles = (K + kTile - 1) / kTile;
  // About 4 chunks per thread for balance, but at least 32K entries each (tiny kernels stay on
  // the calling thread).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t min_tiles = std::max<int64_t>(1, (int64_t{1} << 15) / (kTile * C));
  const int64_t per_chunk = std::max(min_tiles, (tiles + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (tiles + per_chunk - 1) / per_chunk;
  const int helpers = static_cast<int>(std::min(chunks - 1, threads - 1));
  run_chunks(pool, chunks, helpers, [=](int64_t chunk) {
    Scratch s(b != nullptr ? C : 0);
    const int64_t end = std::min(tiles, (chunk + 1) * per_chunk);
    for (int64_t t = chunk * per_chunk; t < end; ++t) {
      const int64_t off = t * kTile * C;
      const int R = static_cast<int>(std::min<int64_t>(kTile, K - t * kTile));
      fn(wi + off, C, R, static_cast<int>(n), p, f + off, b != nullptr ? b + off : nullptr, s);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Masks(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> perm,
                 ffi::ResultBuffer<ffi::PRED> fwd, ffi::ResultBuffer<ffi::PRED> bwd, int64_t n,
                 int64_t m) {
  return Run(pool, w, perm.typed_data(), static_cast<int64_t>(perm.element_count()),
             fwd->typed_data(), bwd->typed_data(), n, m);
}

ffi::Error ForwardMask(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::PRED> fwd, int64_t n, int64_t m) {
  return Run(pool, w, nullptr, 0, fwd->typed_data(), nullptr, n, m);
}

}  // namespace

// (fwd, bwd) = Bi-Mask masks of w (K, C) f32 with the column permutation perm (C,) s32.
XLA_FFI_DEFINE_HANDLER_SYMBOL(BimaskCpuMasks, Masks,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("m"));

// fwd = forward N:M mask of w (K, C) f32, groups of m consecutive rows.
XLA_FFI_DEFINE_HANDLER_SYMBOL(BimaskCpuForwardMask, ForwardMask,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("m"));
