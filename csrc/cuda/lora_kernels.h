// Launcher API of the CUDA kernels (csrc/cuda/lora_kernels.cu).
//
// Plain C++: no torch headers on either side of this interface, so the kernels compile with
// nvcc alone (tools/check_cuda_compile.sh) and the torch binding (csrc/cuda_ops.cpp) only
// passes pointers, strides and sizes. Every launcher is asynchronous on `stream`, never
// synchronises with the host and returns the launch status.
//
// Names: M rows, K in features, N out features, S adapter slots, R padded rank, J adapters per
// row. token slots: int32 [Ms, J] contiguous, Ms in {1, M} (slot_sm = 0 broadcasts row 0),
// a negative slot means "no adapter" for that row and column: the row is skipped.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastpeft {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Shrink: t[m, j, r] = sum_k x[m, k] * a[s, r, k], s = slots[m * slot_sm + j]; fp32 result.
// Rows with s < 0 (or s >= S) are not written. Any K, any R (ranks > 256 take more blocks).
struct ShrinkParams {
  const void* x = nullptr;  // [M, K], dtype, k contiguous
  int64_t ldx = 0;
  const void* a = nullptr;  // [S, R, K], dtype, k contiguous
  int64_t a_ss = 0, a_sr = 0;
  const int32_t* slots = nullptr;
  int64_t slot_sm = 0;
  float* t = nullptr;  // [M, J, R] contiguous
  int64_t M = 0, K = 0;
  int32_t J = 0, R = 0, S = 0;
  DType dtype = DType::kFloat32;
};

// Expand with epilogue, for every row m and column n:
//   acc = y[m, n]
//   for j with s = slot(m, j) >= 0:
//     lora = round(scales[s]) * sum_r t[m, j, r] * b[s, r, n]      (round: to lora_dtype)
//     acc += lora                                                   (no DoRA)
//     acc += (g - 1) * (y[m, n] - bias[n]) + g * lora, g = dora[s, n] (DoRA)
//   out[m, n] = acc * oscale[m, n]     (oscale optional; row stride os_sm, 0 = shared row)
// out may alias y (same dtype); out_float: out is fp32 instead of y_dtype.
struct ExpandParams {
  const void* y = nullptr;
  int64_t ldy = 0;
  DType y_dtype = DType::kFloat32;
  void* out = nullptr;
  int64_t ldo = 0;
  bool out_float = false;
  const float* t = nullptr;  // [M, J, R]
  const void* b = nullptr;   // [S, R, N], lora_dtype, n contiguous
  int64_t b_ss = 0, b_sr = 0;
  DType lora_dtype = DType::kFloat32;
  const float* scales = nullptr;  // [S]
  const int32_t* slots = nullptr;
  int64_t slot_sm = 0;
  const void* dora = nullptr;  // [S, N], lora_dtype, n contiguous, or null
  int64_t dora_ss = 0;
  const float* bias = nullptr;    // [N] or null (read only with dora)
  const float* oscale = nullptr;  // [M or 1, N] or null
  int64_t os_sm = 0;
  int64_t M = 0, N = 0;
  int32_t J = 0, R = 0, S = 0;
};

// Embedding: out[m, :] = w[id, :] + sum_j round(scales[s]) * sum_r a[s, r, id] * b[s, r, :],
// id = ids[m]; an id outside [0, V) writes NaN to its row (and trips a device assert in
// debug builds) instead of reading out of bounds.
struct EmbeddingParams {
  const int64_t* ids = nullptr;  // [M]
  const void* w = nullptr;       // [V, D], w_dtype, d contiguous
  int64_t ldw = 0;
  DType w_dtype = DType::kFloat32;
  const void* a = nullptr;  // [S, R, V], lora_dtype (any strides)
  int64_t a_ss = 0, a_sr = 0, a_sv = 0;
  const void* b = nullptr;  // [S, R, D], lora_dtype, d contiguous
  int64_t b_ss = 0, b_sr = 0;
  DType lora_dtype = DType::kFloat32;
  const float* scales = nullptr;
  const int32_t* slots = nullptr;
  int64_t slot_sm = 0;
  void* out = nullptr;  // [M, D] contiguous, w_dtype
  int64_t M = 0, D = 0, V = 0;
  int32_t J = 0, R = 0, S = 0;
};

// Shared memory the expand and embedding kernels need for their coefficients (J * R floats
// and J slots); the launchers return cudaErrorInvalidValue above this.
constexpr int64_t kMaxCoefBytes = 48 * 1024;

cudaError_t launch_bgmv_shrink(const ShrinkParams& p, cudaStream_t stream);
cudaError_t launch_bgmv_expand(const ExpandParams& p, cudaStream_t stream);
cudaError_t launch_adapter_embedding(const EmbeddingParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastpeft
