// Experiment for issue 2 (not part of the library): forward and Bi-Mask backward masks of one
// (K, C) float32 kernel, fused per block of m rows, in plain C++ for XLA:CPU's competitor.
// Built and timed by bench.py; the library computes the same masks with XLA (bimask_jax/masks.py).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// keep[q] of member u of every group: rank among the m slices base + s*stride, < n (ties: lower s).
template <int M>
void rank_slices(const float* __restrict base, int64_t stride, int64_t len, int u,
                 int8_t* __restrict r) {
  const float* __restrict ku = base + u * stride;
  for (int64_t q = 0; q < len; ++q) r[q] = 0;
  for (int s = 0; s < M; ++s) {
    const float* __restrict ks = base + s * stride;
    if (s < u) {
      for (int64_t q = 0; q < len; ++q) r[q] += ks[q] >= ku[q];
    } else if (s > u) {
      for (int64_t q = 0; q < len; ++q) r[q] += ks[q] > ku[q];
    }
  }
}

// One block of M rows: fwd (N:M down the rows), then per row the backward mask: gather the
// row's keys into the permuted order (member t of group q at t*g + q), rank, gather back.
template <int M>
void block(const float* __restrict w, int64_t C, int n, const int32_t* __restrict order,
           const int32_t* __restrict inv, uint8_t* __restrict fwd, uint8_t* __restrict bwd,
           float* __restrict mag, float* __restrict key, float* __restrict kp,
           int32_t* __restrict keep, int8_t* __restrict rk) {
  for (int64_t i = 0; i < M * C; ++i) {
    const float a = __builtin_fabsf(w[i]);
    mag[i] = (a == a) ? a : kInf;  // NaN ranks as +inf, as in the library
  }
  for (int t = 0; t < M; ++t) {
    rank_slices<M>(mag, C, C, t, rk);
    for (int64_t c = 0; c < C; ++c) fwd[t * C + c] = rk[c] < n;
  }
  const int64_t g = C / M;
  for (int t = 0; t < M; ++t) {
    const float* __restrict mt = mag + t * C;
    const uint8_t* __restrict ft = fwd + t * C;
    for (int64_t c = 0; c < C; ++c) key[c] = ft[c] ? mt[c] : -1.0f;
    for (int64_t i = 0; i < C; ++i) kp[i] = key[order[i]];
    for (int u = 0; u < M; ++u) {
      rank_slices<M>(kp, g, g, u, rk);
      for (int64_t q = 0; q < g; ++q) keep[u * g + q] = (rk[q] < n) & (kp[u * g + q] >= 0.0f);
    }
    uint8_t* __restrict bt = bwd + t * C;
    for (int64_t j = 0; j < C; ++j) bt[j] = static_cast<uint8_t>(keep[inv[j]]);
  }
}

}  // namespace

// m in {4, 8}; K % m == 0, C % m == 0; order/inv as built by bench.py.
extern "C" int masks(const float* w, int64_t K, int64_t C, int n, int m, const int32_t* order,
                     const int32_t* inv, uint8_t* fwd, uint8_t* bwd, int threads) {
  if ((m != 4 && m != 8) || K % m || C % m) return 1;
  const int64_t blocks = K / m;
#pragma omp parallel num_threads(threads) if (threads > 1 && K * C >= (1 << 16))
  {
    std::vector<float> mag(m * C), key(C), kp(C);
    std::vector<int32_t> keep(C);
    std::vector<int8_t> rk(C);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t off = b * m * C;
      if (m == 4)
        block<4>(w + off, C, n, order, inv, fwd + off, bwd + off, mag.data(), key.data(),
                 kp.data(), keep.data(), rk.data());
      else
        block<8>(w + off, C, n, order, inv, fwd + off, bwd + off, mag.data(), key.data(),
                 kp.data(), keep.data(), rk.data());
    }
  }
  return 0;
}
