// Shared by the CPU (fastpeft_ops.cpp) and CUDA (cuda_ops.cpp) bindings: operator schemas,
// argument validation and the small host-side helpers both devices use.
//
// The semantics of every operator are those of fastpeft/ops/reference.py; the docstrings
// of fastpeft/ops/_schema.py give the shapes. Names: M rows, K in features, N out features,
// S adapter slots, R padded rank, J adapters applied per row.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastpeft {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Operator schemas (TORCH_LIBRARY_FRAGMENT(fastpeft, m) in fastpeft_ops.cpp).
// native_adapter_linear has exactly the argument list of the Python-defined routed
// operator fastpeft::adapter_linear (fastpeft/ops/_schema.py).
constexpr const char* kAdapterLinearSchema =
    "native_adapter_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, "
    "Tensor? slot_scales, Tensor? token_slots, Tensor? dora_scale, Tensor? input_scale, "
    "Tensor? output_scale) -> Tensor";
constexpr const char* kAdapterEmbeddingSchema =
    "native_adapter_embedding(Tensor ids, Tensor weight, Tensor? lora_a, Tensor? lora_b, "
    "Tensor? slot_scales, Tensor? token_slots) -> Tensor";
constexpr const char* kLoraShrinkExpandSchema =
    "native_lora_shrink_expand(Tensor y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor slot_scales, "
    "Tensor token_slots) -> Tensor";

inline std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

// The dtype the low-rank path is accumulated in: float for fp32/fp16/bf16 adapters, double
// for fp64 adapters (CPU only).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Validated low-rank arguments. `slots` is int32 and contiguous [Ms, J] with Ms in {1, M};
// `scales` is [S] in acc_dtype(lora dtype); `dora` (if any) is [S, N] in the lora dtype with a
// contiguous last dimension (the reference rounds dora_scale to the lora dtype:
// dora_scale[s].to(xl.dtype)).
struct LoraArgs {
  Tensor lora_a, lora_b, scales, slots;
  OptTensor dora;
  int64_t S = 0, R = 0, Ms = 0, J = 0;
  at::ScalarType dtype = at::kFloat;
};

inline Tensor last_dim_contiguous(const Tensor& t) {
  return (t.dim() > 0 && t.size(-1) > 1 && t.stride(-1) != 1) ? t.contiguous() : t;
}

// Returns std::nullopt when no adapter applies (lora_a or token_slots missing, or J == 0),
// exactly when the reference skips the low-rank path.
inline std::optional<LoraArgs> check_lora(const char* op, const Tensor& like, int64_t M, int64_t K, int64_t N,
                                          const OptTensor& lora_a, const OptTensor& lora_b,
                                          const OptTensor& slot_scales, const OptTensor& token_slots,
                                          const OptTensor& dora_scale, const char* k_name = "K") {
  if (!lora_a.has_value() || !token_slots.has_value() || token_slots->numel() == 0) return std::nullopt;
  TORCH_CHECK(lora_b.has_value() && slot_scales.has_value(), op,
              ": lora_a and token_slots are given, so lora_b and slot_scales must be too");
  const Tensor& a = *lora_a;
  const Tensor& b = *lora_b;
  const Tensor& ts = *token_slots;
  TORCH_CHECK(a.dim() == 3 && a.size(2) == K, op, ": lora_a must be [S, R, ", k_name, "] with ", k_name, " = ", K,
              ", got ", shape_str(a));
  const int64_t S = a.size(0), R = a.size(1);
  TORCH_CHECK(b.dim() == 3 && b.size(0) == S && b.size(1) == R && b.size(2) == N, op,
              ": lora_b must be [S, R, N] = [", S, ", ", R, ", ", N, "] (B transposed), got ", shape_str(b));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": lora_a and lora_b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": lora_a must be floating point, got ", a.scalar_type());
  TORCH_CHECK(slot_scales->numel() == S && slot_scales->dim() <= 1, op, ": slot_scales must be [S] = [", S,
              "], got ", shape_str(*slot_scales));
  TORCH_CHECK(ts.dim() == 2 && (ts.size(0) == 1 || ts.size(0) == M), op,
              ": token_slots must be [M, J] or [1, J] with M = ", M, ", got ", shape_str(ts));
  TORCH_CHECK(!at::isFloatingType(ts.scalar_type()) && ts.scalar_type() != at::kBool, op,
              ": token_slots must be an integer tensor (int32), got ", ts.scalar_type());
  for (const Tensor* t : {&a, &b, &*slot_scales, &ts}) {
    TORCH_CHECK(t->device() == like.device(), op, ": all tensors must be on ", like.device(), ", got one on ",
                t->device());
  }
  LoraArgs r;
  r.dtype = a.scalar_type();
  r.S = S;
  r.R = R;
  r.Ms = ts.size(0);
  r.J = ts.size(1);
  r.lora_a = last_dim_contiguous(a);
  r.lora_b = last_dim_contiguous(b);
  r.scales = slot_scales->reshape({S}).to(acc_dtype(r.dtype)).contiguous();
  r.slots = ts.to(at::kInt).contiguous();
  if (dora_scale.has_value()) {
    const Tensor& d = *dora_scale;
    TORCH_CHECK(d.dim() == 2 && d.size(0) == S && d.size(1) == N, op, ": dora_scale must be [S, N] = [", S, ", ", N,
                "], got ", shape_str(d));
    TORCH_CHECK(d.device() == like.device(), op, ": dora_scale must be on ", like.device());
    r.dora = last_dim_contiguous(d.to(r.dtype));
  }
  return r;
}

inline void check_linear(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                         const OptTensor& input_scale, const OptTensor& output_scale) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K], got ", shape_str(x));
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, K], got ", shape_str(weight));
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must be [N, K] with K = x.size(1) = ", x.size(1), ", got ",
              shape_str(weight));
  TORCH_CHECK(x.device() == weight.device(), op, ": x is on ", x.device(), " but weight on ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [N] = [", weight.size(0),
                "], got ", shape_str(*bias));
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  if (input_scale.has_value()) {
    const Tensor& s = *input_scale;
    TORCH_CHECK((s.dim() == 1 && s.size(0) == K) || (s.dim() == 2 && (s.size(0) == M || s.size(0) == 1) &&
                                                     s.size(1) == K),
                op, ": input_scale must be [K] or [M, K] with M = ", M, ", K = ", K, ", got ", shape_str(s));
  }
  if (output_scale.has_value()) {
    const Tensor& s = *output_scale;
    TORCH_CHECK((s.dim() == 1 && s.size(0) == N) || (s.dim() == 2 && (s.size(0) == M || s.size(0) == 1) &&
                                                     s.size(1) == N),
                op, ": output_scale must be [N] or [M, N] with M = ", M, ", N = ", N, ", got ", shape_str(s));
  }
}

// IA3 input scale, as the reference: (x * input_scale).to(weight.dtype).
inline Tensor scale_input(const Tensor& x, const OptTensor& input_scale, at::ScalarType weight_dtype) {
  if (!input_scale.has_value()) return x;
  return at::mul(x, *input_scale).to(weight_dtype);
}

// The tail of the reference once the low-rank path is in y: y * output_scale, cast to x.dtype.
// In place when the result dtype is y's own (then the multiply rounds once, like the reference).
inline Tensor finish_output(Tensor y, const OptTensor& output_scale, at::ScalarType out_dtype) {
  if (output_scale.has_value()) {
    if (out_dtype == y.scalar_type()) {
      y.mul_(*output_scale);
    } else {
      y = at::mul(y, *output_scale);
    }
  }
  return y.to(out_dtype);
}

// The low-rank path written with ATen ops, exactly as reference.apply_adapters (per-row
// gather of A[s] and B[s]; no host synchronisation). For devices and dtypes the kernels do not
// cover (float64 on CUDA). y: base output incl. bias; returns y with the deltas, promoted.
inline Tensor apply_adapters_composite(Tensor y, const Tensor& xs, const OptTensor& bias, const LoraArgs& l) {
  const Tensor xl = xs.to(l.dtype);
  const int64_t M = xs.size(0);
  Tensor base;
  if (l.dora.has_value()) base = bias.has_value() ? y - *bias : y;
  for (int64_t j = 0; j < l.J; ++j) {
    const Tensor col = l.slots.select(1, j).expand({M});
    const Tensor valid = col.ge(0).unsqueeze(-1);
    const Tensor idx = col.clamp_min(0).to(at::kLong);
    const Tensor t = at::bmm(l.lora_a.index_select(0, idx), xl.unsqueeze(-1)).squeeze(-1);          // [M, R]
    Tensor lora = at::bmm(t.unsqueeze(1), l.lora_b.index_select(0, idx)).squeeze(1);                 // [M, N]
    lora = lora * l.scales.index_select(0, idx).to(l.dtype).unsqueeze(-1);
    if (l.dora.has_value()) {
      const Tensor g = l.dora->index_select(0, idx);
      lora = (g - 1) * base + g * lora;
    }
    y = y + at::where(valid, lora, at::zeros({}, lora.options()));
  }
  return y;
}

// adapter_embedding's low-rank path with ATen ops (reference.adapter_embedding), for dtypes the
// kernels do not cover. ids [M] int64, y = weight[ids]; returns y with the deltas, promoted.
inline Tensor embedding_adapters_composite(Tensor y, const Tensor& ids, const LoraArgs& l) {
  const int64_t M = ids.size(0);
  for (int64_t j = 0; j < l.J; ++j) {
    const Tensor col = l.slots.select(1, j).expand({M});
    const Tensor valid = col.ge(0).unsqueeze(-1);
    const Tensor idx = col.clamp_min(0).to(at::kLong);
    c10::List<std::optional<Tensor>> index;
    index.push_back(idx);
    index.push_back(std::nullopt);
    index.push_back(ids);
    const Tensor after_a = at::index(l.lora_a, index);  // [M, R] = lora_a[idx, :, ids]
    Tensor lora = at::bmm(after_a.unsqueeze(1), l.lora_b.index_select(0, idx)).squeeze(1);
    lora = lora * l.scales.index_select(0, idx).to(l.dtype).unsqueeze(-1);
    y = y + at::where(valid, lora, at::zeros({}, lora.options()));
  }
  return y;
}

// output_scale as an [M or 1, N] tensor in `dtype` with contiguous rows; row stride 0 when it
// is shared by all rows.
inline std::pair<Tensor, int64_t> output_scale_rows(const Tensor& os, at::ScalarType dtype) {
  Tensor t = os.to(dtype).contiguous();
  if (t.dim() == 1 || t.size(0) == 1) return {t.reshape({-1}), 0};
  return {t, t.stride(0)};
}

}  // namespace fastpeft
