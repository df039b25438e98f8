// CPU kernels of the low-rank path: per-row BGMV shrink, expand with a fused epilogue
// (DoRA, IA3 output scale, cast), and the adapter embedding. Included by fastpeft_ops.cpp
// only (one translation unit keeps the build short).
//
// Vectorisation: the two inner loops (dot products of the shrink, axpy of the expand) are
// plain loops with `omp simd`, compiled three times with GCC's target_clones (AVX-512,
// AVX2+FMA, baseline x86-64) and picked at load time, so one build runs well on any x86-64
// CPU without -march=native. Other compilers get the baseline loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTPEFT_NO_MULTIVERSION)
#define FP_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FP_MULTIVERSION
#endif
#define FP_INLINE inline __attribute__((always_inline))

namespace fastpeft {
namespace cpu {

// ---------------------------------------------------------------- scalar helpers
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

// accumulation type of the epilogue: double if the output or the adapters are fp64
template <typename Y, typename L>
using epi_acc = std::conditional_t<std::is_same_v<Y, double> || std::is_same_v<L, double>, double, float>;

FP_INLINE float load_f(const float* p, int64_t i) { return p[i]; }
FP_INLINE double load_f(const double* p, int64_t i) { return p[i]; }
FP_INLINE float load_f(const c10::BFloat16* p, int64_t i) {
  // bf16 -> fp32 is a shift; written on the bits so the compiler vectorises it
  uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
FP_INLINE float load_f(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T, typename A>
FP_INLINE void store_f(T* p, int64_t i, A v) {
  p[i] = static_cast<T>(v);
}

// the value a scale takes once rounded to the adapters' dtype (reference: scale.to(lora dtype))
template <typename L, typename A>
FP_INLINE A round_to(A v) {
  return static_cast<A>(static_cast<L>(v));
}

// ---------------------------------------------------------------- micro-kernels
// out[r] = sum_k x[k] * a[r * lda + k], r < nr
template <typename T>
FP_INLINE void dot_rows_impl(const T* __restrict x, const T* __restrict a, int64_t lda, int64_t nr, int64_t K,
                             acc_of<T>* __restrict out) {
  using A = acc_of<T>;
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    const T* __restrict a0 = a + r * lda;
    const T* __restrict a1 = a0 + lda;
    const T* __restrict a2 = a1 + lda;
    const T* __restrict a3 = a2 + lda;
    A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < K; ++k) {
      const A xv = load_f(x, k);
      s0 += xv * load_f(a0, k);
      s1 += xv * load_f(a1, k);
      s2 += xv * load_f(a2, k);
      s3 += xv * load_f(a3, k);
    }
    out[r] = s0;
    out[r + 1] = s1;
    out[r + 2] = s2;
    out[r + 3] = s3;
  }
  for (; r < nr; ++r) {
    const T* __restrict a0 = a + r * lda;
    A s0 = 0;
#pragma omp simd reduction(+ : s0)
    for (int64_t k = 0; k < K; ++k) s0 += load_f(x, k) * load_f(a0, k);
    out[r] = s0;
  }
}

// acc[n] += sum_r c[r] * b[r * ldb + n], n < nn, r < nr; ranks whose four coefficients are
// all zero (padding rows of a smaller adapter) are skipped without reading b.
template <typename T>
FP_INLINE void axpy_rows_impl(acc_of<T>* __restrict acc, const acc_of<T>* __restrict c, const T* __restrict b,
                              int64_t ldb, int64_t nr, int64_t nn) {
  using A = acc_of<T>;
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    const A c0 = c[r], c1 = c[r + 1], c2 = c[r + 2], c3 = c[r + 3];
    if (c0 == A(0) && c1 == A(0) && c2 == A(0) && c3 == A(0)) continue;
    const T* __restrict b0 = b + r * ldb;
    const T* __restrict b1 = b0 + ldb;
    const T* __restrict b2 = b1 + ldb;
    const T* __restrict b3 = b2 + ldb;
#pragma omp simd
    for (int64_t n = 0; n < nn; ++n) {
      acc[n] += c0 * load_f(b0, n) + c1 * load_f(b1, n) + c2 * load_f(b2, n) + c3 * load_f(b3, n);
    }
  }
  for (; r < nr; ++r) {
    const A c0 = c[r];
    if (c0 == A(0)) continue;
    const T* __restrict b0 = b + r * ldb;
#pragma omp simd
    for (int64_t n = 0; n < nn; ++n) acc[n] += c0 * load_f(b0, n);
  }
}

// Non-template entry points, one per dtype, so that target_clones can multiversion them.
#define FASTPEFT_MICRO(T)                                                                                        \
  FP_MULTIVERSION __attribute__((noinline)) void dot_rows(const T* x, const T* a, int64_t lda, int64_t nr,      \
                                                          int64_t K, acc_of<T>* out) {                          \
    dot_rows_impl<T>(x, a, lda, nr, K, out);                                                                     \
  }                                                                                                              \
  FP_MULTIVERSION __attribute__((noinline)) void axpy_rows(acc_of<T>* acc, const acc_of<T>* c, const T* b,      \
                                                           int64_t ldb, int64_t nr, int64_t nn) {               \
    axpy_rows_impl<T>(acc, c, b, ldb, nr, nn);                                                                   \
  }
FASTPEFT_MICRO(float)
FASTPEFT_MICRO(double)
FASTPEFT_MICRO(c10::BFloat16)
FASTPEFT_MICRO(c10::Half)
#undef FASTPEFT_MICRO

// ---------------------------------------------------------------- block sizes
// Ranks per shrink work item (two 4-row register blocks of dot_rows); a first choice, not tuned.
constexpr int64_t kShrinkRanks = 8;
// Columns per expand work item: 256 keeps the fp32 accumulators (1 KiB) and an R=16 slab
// of B (8 KiB bf16) in L1. Measured (native_lora_shrink_expand, K=N=4096, R=16, 16 rows on 15
// adapters, 1 thread, min of 400 calls): NB=128/256/512 -> fp32 153/147/148 us, bf16
// 145/138/133 us; at 2 rows all three within 1 us. 256: no measurable loss, smaller stack.
constexpr int64_t kExpandCols = 256;
// Multiply-adds per parallel chunk: below this a chunk is not worth an OpenMP hand-off.
// A first choice (a few microseconds of work per chunk), not tuned.
constexpr int64_t kMacsPerTask = 1 << 15;

inline int64_t grain_for(int64_t macs_per_item) {
  return std::max<int64_t>(1, kMacsPerTask / std::max<int64_t>(1, macs_per_item));
}

// ---------------------------------------------------------------- shrink
// T[m, j, r] = sum_k xl[m, k] * A[s, r, k] with s = slots[m * slot_sm + j]; rows with s < 0 are
// left untouched (the expand never reads them).
template <typename L>
void bgmv_shrink(const L* x, int64_t ldx, const L* a, int64_t a_ss, int64_t a_sr, const int32_t* slots,
                 int64_t slot_sm, int64_t M, int64_t J, int64_t R, int64_t K, acc_of<L>* t) {
  if (M == 0 || J == 0 || R == 0) return;
  const int64_t nrb = (R + kShrinkRanks - 1) / kShrinkRanks;
  const int64_t items = M * J * nrb;
  at::parallel_for(0, items, grain_for(kShrinkRanks * K), [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t m = it / (J * nrb);
      const int64_t rem = it - m * J * nrb;
      const int64_t j = rem / nrb;
      const int64_t r0 = (rem - j * nrb) * kShrinkRanks;
      const int64_t s = slots[m * slot_sm + j];
      if (s < 0) continue;
      const int64_t nr = std::min(kShrinkRanks, R - r0);
      dot_rows(x + m * ldx, a + s * a_ss + r0 * a_sr, a_sr, nr, K, t + (m * J + j) * R + r0);
    }
  });
}

// ---------------------------------------------------------------- expand + epilogue
struct ExpandArgs {
  const void* y = nullptr;  // [M, N] base output incl. bias (dtype Y), row stride ldy
  int64_t ldy = 0;
  void* out = nullptr;  // [M, N] (dtype Y, or float when out_float), may alias y
  int64_t ldo = 0;
  bool out_float = false;
  const void* t = nullptr;  // [M, J, R] acc_of<L>
  const void* b = nullptr;  // [S, R, N] dtype L, last dim contiguous
  int64_t b_ss = 0, b_sr = 0;
  const void* scales = nullptr;  // [S] acc_of<L>
  const int32_t* slots = nullptr;
  int64_t slot_sm = 0;
  const void* dora = nullptr;  // [S, N] dtype L or null
  int64_t dora_ss = 0;
  const void* bias = nullptr;  // [N] epi_acc<Y, L> (only read with dora)
  const void* oscale = nullptr;  // [M or 1, N] epi_acc<Y, L> or null
  int64_t os_sm = 0;
  int64_t M = 0, N = 0, J = 0, R = 0;
};

// out[m, n] = (y + sum_j valid * delta_j) * oscale, with
//   lora_j  = scale[s] * sum_r T[m, j, r] * B[s, r, n]
//   delta_j = lora_j                               (no DoRA)
//   delta_j = (g - 1) * (y - bias) + g * lora_j    (DoRA, g = dora[s, n])
template <typename Y, typename L>
void expand_epilogue(const ExpandArgs& p) {
  using A = epi_acc<Y, L>;
  using AL = acc_of<L>;
  constexpr int64_t NB = kExpandCols;
  const int64_t nblocks = (p.N + NB - 1) / NB;
  const int64_t items = p.M * nblocks;
  const Y* y = static_cast<const Y*>(p.y);
  const AL* t = static_cast<const AL*>(p.t);
  const L* b = static_cast<const L*>(p.b);
  const AL* scales = static_cast<const AL*>(p.scales);
  const L* dora = static_cast<const L*>(p.dora);
  const A* bias = static_cast<const A*>(p.bias);
  const A* oscale = static_cast<const A*>(p.oscale);
  const int64_t R = p.R, J = p.J;
  // the row's LoRA work is R * NB multiply-adds per adapter and block
  at::parallel_for(0, items, grain_for(std::max<int64_t>(1, J * R) * NB), [&](int64_t begin, int64_t end) {
    A acc[NB];
    A base[NB];
    AL lbuf[NB];
    AL coef[256 + 4];
    std::vector<AL> coef_big;  // ranks > 256 (not expected; kept correct)
    AL* c = coef;
    if (R > 256) {
      coef_big.resize(R);
      c = coef_big.data();
    }
    // items are ordered block-major so that consecutive rows of one chunk reuse the same slab
    // of B (prefill rows mostly share an adapter)
    for (int64_t it = begin; it < end; ++it) {
      const int64_t nb = it / p.M;
      const int64_t m = it - nb * p.M;
      const int64_t n0 = nb * NB;
      const int64_t nn = std::min(NB, p.N - n0);
      const Y* yrow = y + m * p.ldy + n0;
      for (int64_t n = 0; n < nn; ++n) acc[n] = static_cast<A>(load_f(yrow, n));
      if (dora) {
        for (int64_t n = 0; n < nn; ++n) base[n] = acc[n] - (bias ? bias[n0 + n] : A(0));
      }
      for (int64_t j = 0; j < J; ++j) {
        const int64_t s = p.slots[m * p.slot_sm + j];
        if (s < 0) continue;
        const AL sc = round_to<L, AL>(scales[s]);
        const AL* trow = t + (m * J + j) * R;
        for (int64_t r = 0; r < R; ++r) c[r] = sc * trow[r];
        const L* bs = b + s * p.b_ss + n0;
        if constexpr (std::is_same_v<A, AL>) {
          if (!dora) {
            axpy_rows(acc, c, bs, p.b_sr, R, nn);
            continue;
          }
        }
        for (int64_t n = 0; n < nn; ++n) lbuf[n] = AL(0);
        axpy_rows(lbuf, c, bs, p.b_sr, R, nn);
        if (dora) {
          const L* g = dora + s * p.dora_ss + n0;
          for (int64_t n = 0; n < nn; ++n) {
            const A gv = static_cast<A>(load_f(g, n));
            acc[n] += (gv - A(1)) * base[n] + gv * static_cast<A>(lbuf[n]);
          }
        } else {
          for (int64_t n = 0; n < nn; ++n) acc[n] += static_cast<A>(lbuf[n]);
        }
      }
      if (oscale) {
        const A* os = oscale + m * p.os_sm + n0;
        for (int64_t n = 0; n < nn; ++n) acc[n] *= os[n];
      }
      if (p.out_float) {
        float* o = static_cast<float*>(p.out) + m * p.ldo + n0;
        for (int64_t n = 0; n < nn; ++n) o[n] = static_cast<float>(acc[n]);
      } else {
        Y* o = static_cast<Y*>(p.out) + m * p.ldo + n0;
        for (int64_t n = 0; n < nn; ++n) store_f(o, n, acc[n]);
      }
    }
  });
}

// ---------------------------------------------------------------- embedding
struct EmbeddingArgs {
  const int64_t* ids = nullptr;  // [M], validated 0 <= id < V
  const void* w = nullptr;       // [V, D] dtype W, last dim contiguous
  int64_t ldw = 0;
  const void* a = nullptr;  // [S, R, V] dtype L
  int64_t a_ss = 0, a_sr = 0, a_sv = 0;
  const void* b = nullptr;  // [S, R, D] dtype L, last dim contiguous
  int64_t b_ss = 0, b_sr = 0;
  const void* scales = nullptr;  // [S] acc_of<L>
  const int32_t* slots = nullptr;
  int64_t slot_sm = 0;
  void* out = nullptr;  // [M, D] dtype W, contiguous
  int64_t M = 0, D = 0, J = 0, R = 0;
};

// out[m] = W[id] + sum_j valid * scale[s] * sum_r A[s, r, id] * B[s, r, :], id = ids[m]
template <typename W, typename L>
void adapter_embedding(const EmbeddingArgs& p) {
  using A = epi_acc<W, L>;
  using AL = acc_of<L>;
  constexpr int64_t NB = kExpandCols;
  const int64_t nblocks = (p.D + NB - 1) / NB;
  const int64_t items = p.M * nblocks;
  const W* w = static_cast<const W*>(p.w);
  const L* a = static_cast<const L*>(p.a);
  const L* b = static_cast<const L*>(p.b);
  const AL* scales = static_cast<const AL*>(p.scales);
  W* out = static_cast<W*>(p.out);
  const int64_t R = p.R, J = p.J;
  at::parallel_for(0, items, grain_for(std::max<int64_t>(1, J * R) * NB), [&](int64_t begin, int64_t end) {
    A acc[NB];
    AL lbuf[NB];
    std::vector<AL> c(static_cast<size_t>(std::max<int64_t>(R, 1)));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t nb = it / p.M;
      const int64_t m = it - nb * p.M;
      const int64_t n0 = nb * NB;
      const int64_t nn = std::min(NB, p.D - n0);
      const int64_t id = p.ids[m];
      const W* wrow = w + id * p.ldw + n0;
      for (int64_t n = 0; n < nn; ++n) acc[n] = static_cast<A>(load_f(wrow, n));
      for (int64_t j = 0; j < J; ++j) {
        const int64_t s = p.slots[m * p.slot_sm + j];
        if (s < 0) continue;
        const AL sc = round_to<L, AL>(scales[s]);
        const L* acol = a + s * p.a_ss + id * p.a_sv;
        for (int64_t r = 0; r < R; ++r) c[r] = sc * static_cast<AL>(load_f(acol, r * p.a_sr));
        const L* bs = b + s * p.b_ss + n0;
        if constexpr (std::is_same_v<A, AL>) {
          axpy_rows(acc, c.data(), bs, p.b_sr, R, nn);
        } else {
          for (int64_t n = 0; n < nn; ++n) lbuf[n] = AL(0);
          axpy_rows(lbuf, c.data(), bs, p.b_sr, R, nn);
          for (int64_t n = 0; n < nn; ++n) acc[n] += static_cast<A>(lbuf[n]);
        }
      }
      W* o = out + m * p.D + n0;
      for (int64_t n = 0; n < nn; ++n) store_f(o, n, acc[n]);
    }
  });
}

}  // namespace cpu
}  // namespace fastpeft
