// CUDA kernels of the multi-adapter low-rank path, BGMV style: one token slot per row and
// adapter column, fixed grids, rows without an adapter exit early, no host synchronisation
// (so CUDA graphs and torch.compile can capture them). fp32 / fp16 / bf16, fp32 accumulation.
//
// No torch headers here: only the CUDA runtime and the fp16/bf16 headers, so that
// tools/check_cuda_compile.sh can compile this file with nvcc alone. The launcher API is in
// lora_kernels.h; the torch binding in csrc/cuda_ops.cpp.
//
// Status: compiled for sm_80/sm_90 in CI, but not yet run on a GPU by the author (no device was
// available); the block sizes below are first choices, not measured (see docs/extension.md).
#include "lora_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

namespace fastpeft {
namespace cuda {
namespace {

// ------------------------------------------------------------------ conversions
template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// a scale rounded to the adapters' dtype, as the reference does (scale.to(lora dtype))
template <typename L>
__device__ __forceinline__ float round_to(float v) {
  return to_f<L>(from_f<L>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ------------------------------------------------------------------ shrink
// One block per (row, adapter column, chunk of 256 ranks); 8 warps, warp w owns ranks
// w, w + 8, ... (RPW of them). x is staged in shared memory in chunks of kKChunk columns, so
// any K works; each warp reads its rows of A coalesced (16-byte vectors when aligned).
constexpr int kShrinkThreads = 256;
constexpr int kShrinkWarps = kShrinkThreads / 32;
constexpr int kRanksPerBlock = 256;  // = kShrinkWarps * 32 (largest RPW)
constexpr int kKChunk = 2048;        // 8 KiB of fp32 x per block

template <typename T, int RPW, bool VEC>
__global__ void __launch_bounds__(kShrinkThreads) bgmv_shrink_kernel(const ShrinkParams p) {
  const int64_t mj = blockIdx.x;
  const int64_t m = mj / p.J;
  const int32_t j = static_cast<int32_t>(mj - m * p.J);
  const int32_t s = p.slots[m * p.slot_sm + j];
  if (s < 0 || s >= p.S) return;  // no adapter on this row (uniform over the block)
  const int32_t r_base = static_cast<int32_t>(blockIdx.y) * kRanksPerBlock;

  __shared__ float xs[kKChunk];
  const T* __restrict__ x = static_cast<const T*>(p.x) + m * p.ldx;
  const T* __restrict__ a = static_cast<const T*>(p.a) + static_cast<int64_t>(s) * p.a_ss;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  float acc[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) acc[i] = 0.f;

  for (int64_t k0 = 0; k0 < p.K; k0 += kKChunk) {
    const int kn = static_cast<int>(p.K - k0 < kKChunk ? p.K - k0 : kKChunk);
    __syncthreads();
    for (int k = threadIdx.x; k < kn; k += kShrinkThreads) xs[k] = to_f(x[k0 + k]);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int32_t r = r_base + warp + i * kShrinkWarps;
      if (r < p.R) {  // uniform within the warp
        const T* __restrict__ arow = a + static_cast<int64_t>(r) * p.a_sr + k0;
        float sum = 0.f;
        if constexpr (VEC) {
          constexpr int V = 16 / sizeof(T);
          for (int k = lane * V; k < kn; k += 32 * V) {
            alignas(16) T v[V];
            *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(arow + k);
#pragma unroll
            for (int e = 0; e < V; ++e) sum += xs[k + e] * to_f(v[e]);
          }
        } else {
          for (int k = lane; k < kn; k += 32) sum += xs[k] * to_f(arow[k]);
        }
        acc[i] += sum;
      }
    }
  }
  float* __restrict__ t = p.t + (m * p.J + j) * static_cast<int64_t>(p.R);
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int32_t r = r_base + warp + i * kShrinkWarps;
    if (r < p.R) {
      const float v = warp_sum(acc[i]);
      if (lane == 0) t[r] = v;
    }
  }
}

template <typename T, int RPW>
void shrink_launch(const ShrinkParams& p, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.M * p.J), static_cast<unsigned>((p.R + kRanksPerBlock - 1) / kRanksPerBlock));
  if (vec) {
    bgmv_shrink_kernel<T, RPW, true><<<grid, kShrinkThreads, 0, stream>>>(p);
  } else {
    bgmv_shrink_kernel<T, RPW, false><<<grid, kShrinkThreads, 0, stream>>>(p);
  }
}

template <typename T>
void shrink_dispatch(const ShrinkParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.a) % 16 == 0 &&
                   p.K % V == 0 && p.ldx % V == 0 && p.a_ss % V == 0 && p.a_sr % V == 0;
  // ranks per warp: 8 warps cover 16, 64 or 256 ranks per block
  if (p.R <= 2 * kShrinkWarps) {
    shrink_launch<T, 2>(p, vec, stream);
  } else if (p.R <= 8 * kShrinkWarps) {
    shrink_launch<T, 8>(p, vec, stream);
  } else {
    shrink_launch<T, 32>(p, vec, stream);
  }
}

// ------------------------------------------------------------------ expand + epilogue
// One block per (row, tile of kExpandThreads * kExpandCols columns). The block first puts
// coef[j, r] = round(scale[s_j]) * t[m, j, r] in shared memory; each thread then owns
// kExpandCols columns (stride blockDim, so B reads are coalesced across the warp).
constexpr int kExpandThreads = 256;
constexpr int kExpandCols = 2;

template <typename Y, typename L>
__global__ void __launch_bounds__(kExpandThreads) bgmv_expand_kernel(const ExpandParams p) {
  extern __shared__ float smem[];
  float* coef = smem;                                      // [J, R]
  int32_t* sl = reinterpret_cast<int32_t*>(smem + p.J * p.R);  // [J]
  const int64_t m = blockIdx.x;
  for (int j = threadIdx.x; j < p.J; j += kExpandThreads) {
    const int32_t s = p.slots[m * p.slot_sm + j];
    sl[j] = (s >= 0 && s < p.S) ? s : -1;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < p.J * p.R; idx += kExpandThreads) {
    const int j = idx / p.R;
    const int32_t s = sl[j];
    coef[idx] = s >= 0 ? round_to<L>(p.scales[s]) * p.t[m * p.J * static_cast<int64_t>(p.R) + idx] : 0.f;
  }
  __syncthreads();

  const Y* __restrict__ y = static_cast<const Y*>(p.y) + m * p.ldy;
  const L* __restrict__ b = static_cast<const L*>(p.b);
  const L* __restrict__ dora = static_cast<const L*>(p.dora);
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * (kExpandThreads * kExpandCols) + threadIdx.x;
#pragma unroll
  for (int c = 0; c < kExpandCols; ++c) {
    const int64_t n = col0 + static_cast<int64_t>(c) * kExpandThreads;
    if (n >= p.N) break;
    const float yv = to_f(y[n]);
    const float base = yv - (p.bias != nullptr ? p.bias[n] : 0.f);
    float acc = yv;
    for (int j = 0; j < p.J; ++j) {
      const int32_t s = sl[j];
      if (s < 0) continue;  // uniform over the block
      const L* __restrict__ bcol = b + static_cast<int64_t>(s) * p.b_ss + n;
      const float* cj = coef + j * p.R;
      float l0 = 0.f, l1 = 0.f;
      int r = 0;
      for (; r + 4 <= p.R; r += 4) {
        const float c0 = cj[r], c1 = cj[r + 1], c2 = cj[r + 2], c3 = cj[r + 3];
        if (c0 == 0.f && c1 == 0.f && c2 == 0.f && c3 == 0.f) continue;  // rank padding: skip B
        l0 += c0 * to_f(bcol[r * p.b_sr]) + c1 * to_f(bcol[(r + 1) * p.b_sr]);
        l1 += c2 * to_f(bcol[(r + 2) * p.b_sr]) + c3 * to_f(bcol[(r + 3) * p.b_sr]);
      }
      for (; r < p.R; ++r) l0 += cj[r] * to_f(bcol[r * p.b_sr]);
      const float lora = l0 + l1;
      if (dora != nullptr) {
        const float g = to_f(dora[static_cast<int64_t>(s) * p.dora_ss + n]);
        acc += (g - 1.f) * base + g * lora;
      } else {
        acc += lora;
      }
    }
    if (p.oscale != nullptr) acc *= p.oscale[m * p.os_sm + n];
    if (p.out_float) {
      static_cast<float*>(p.out)[m * p.ldo + n] = acc;
    } else {
      static_cast<Y*>(p.out)[m * p.ldo + n] = from_f<Y>(acc);
    }
  }
}

// ------------------------------------------------------------------ embedding
template <typename W, typename L>
__global__ void __launch_bounds__(kExpandThreads) adapter_embedding_kernel(const EmbeddingParams p) {
  extern __shared__ float smem[];
  float* coef = smem;
  int32_t* sl = reinterpret_cast<int32_t*>(smem + p.J * p.R);
  const int64_t m = blockIdx.x;
  const int64_t id = p.ids[m];
  const bool ok = id >= 0 && id < p.V;
  assert(ok && "fastpeft native_adapter_embedding: id out of range");
  for (int j = threadIdx.x; j < p.J; j += kExpandThreads) {
    const int32_t s = p.slots[m * p.slot_sm + j];
    sl[j] = (ok && s >= 0 && s < p.S) ? s : -1;
  }
  __syncthreads();
  const L* __restrict__ a = static_cast<const L*>(p.a);
  for (int idx = threadIdx.x; idx < p.J * p.R; idx += kExpandThreads) {
    const int j = idx / p.R;
    const int r = idx - j * p.R;
    const int32_t s = sl[j];
    coef[idx] = s >= 0 ? round_to<L>(p.scales[s]) * to_f(a[s * p.a_ss + r * p.a_sr + id * p.a_sv]) : 0.f;
  }
  __syncthreads();
  const W* __restrict__ w = static_cast<const W*>(p.w);
  const L* __restrict__ b = static_cast<const L*>(p.b);
  W* __restrict__ out = static_cast<W*>(p.out) + m * p.D;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * (kExpandThreads * kExpandCols) + threadIdx.x;
#pragma unroll
  for (int c = 0; c < kExpandCols; ++c) {
    const int64_t n = col0 + static_cast<int64_t>(c) * kExpandThreads;
    if (n >= p.D) break;
    if (!ok) {
      out[n] = from_f<W>(__int_as_float(0x7fc00000));  // NaN row for an invalid id
      continue;
    }
    float acc = to_f(w[id * p.ldw + n]);
    for (int j = 0; j < p.J; ++j) {
      const int32_t s = sl[j];
      if (s < 0) continue;
      const L* __restrict__ bcol = b + static_cast<int64_t>(s) * p.b_ss + n;
      const float* cj = coef + j * p.R;
      for (int r = 0; r < p.R; ++r) acc += cj[r] * to_f(bcol[r * p.b_sr]);
    }
    out[n] = from_f<W>(acc);
  }
}

// ------------------------------------------------------------------ dispatch helpers
template <typename F>
bool with_type(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      f(float{});
      return true;
    case DType::kFloat16:
      f(__half{});
      return true;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      return true;
  }
  return false;
}

inline bool grid_ok(int64_t x, int64_t y) { return x > 0 && x <= 0x7fffffff && y > 0 && y <= 65535; }

}  // namespace

cudaError_t launch_bgmv_shrink(const ShrinkParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.J == 0 || p.R == 0) return cudaSuccess;
  if (!grid_ok(p.M * p.J, (p.R + kRanksPerBlock - 1) / kRanksPerBlock)) return cudaErrorInvalidValue;
  const bool ok = with_type(p.dtype, [&](auto tag) { shrink_dispatch<decltype(tag)>(p, stream); });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_bgmv_expand(const ExpandParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  const int64_t smem = static_cast<int64_t>(p.J) * p.R * 4 + static_cast<int64_t>(p.J) * 4;
  const int64_t tiles = (p.N + kExpandThreads * kExpandCols - 1) / (kExpandThreads * kExpandCols);
  if (smem > kMaxCoefBytes || !grid_ok(p.M, tiles)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.M), static_cast<unsigned>(tiles));
  bool ok = false;
  with_type(p.y_dtype, [&](auto ytag) {
    using Y = decltype(ytag);
    ok = with_type(p.lora_dtype, [&](auto ltag) {
      using L = decltype(ltag);
      bgmv_expand_kernel<Y, L><<<grid, kExpandThreads, static_cast<size_t>(smem), stream>>>(p);
    });
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_adapter_embedding(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.D == 0) return cudaSuccess;
  const int64_t smem = static_cast<int64_t>(p.J) * p.R * 4 + static_cast<int64_t>(p.J) * 4;
  const int64_t tiles = (p.D + kExpandThreads * kExpandCols - 1) / (kExpandThreads * kExpandCols);
  if (smem > kMaxCoefBytes || !grid_ok(p.M, tiles)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.M), static_cast<unsigned>(tiles));
  bool ok = false;
  with_type(p.w_dtype, [&](auto wtag) {
    using W = decltype(wtag);
    ok = with_type(p.lora_dtype, [&](auto ltag) {
      using L = decltype(ltag);
      adapter_embedding_kernel<W, L><<<grid, kExpandThreads, static_cast<size_t>(smem), stream>>>(p);
    });
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastpeft
