// CUDA kernels of the fastpeft::native_* operators (defined in fastpeft_ops.cpp), bound to
// the kernels of csrc/cuda/lora_kernels.cu through the plain launcher API of lora_kernels.h.
// Compiled only when the extension is built with CUDA (setup.py: CUDAExtension, which defines
// FASTPEFT_WITH_CUDA).
//
// No host synchronisation anywhere: token slots are read only by the kernels (a slot >= S is
// treated as "no adapter" instead of raising as on the CPU, which would need a sync).
#include "common.h"
#include "cuda/lora_kernels.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace fastpeft {
namespace {

cuda::DType kernel_dtype(at::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": the CUDA kernels take float32, float16 or bfloat16 ", what, ", got ", t);
  }
}

bool kernel_dtype_ok(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_launch(cudaError_t e, const char* op, const char* kernel) {
  TORCH_CHECK(e == cudaSuccess, op, ": launching ", kernel, " failed: ", cudaGetErrorString(e),
              e == cudaErrorInvalidValue ? " (sizes beyond the kernel's limits: J * R too large or grid too big)" : "");
}

// T [M, J, R] fp32 = x @ A[s].T per row and adapter column (rows with s < 0 unwritten)
Tensor shrink_cuda(const char* op, const Tensor& xl, const LoraArgs& l, cudaStream_t stream) {
  const int64_t M = xl.size(0);
  Tensor t = at::empty({M, l.J, l.R}, xl.options().dtype(at::kFloat));
  cuda::ShrinkParams p;
  p.x = xl.data_ptr();
  p.ldx = xl.stride(0);
  p.a = l.lora_a.data_ptr();
  p.a_ss = l.lora_a.stride(0);
  p.a_sr = l.lora_a.stride(1);
  p.slots = l.slots.data_ptr<int32_t>();
  p.slot_sm = l.Ms == 1 ? 0 : l.J;
  p.t = t.data_ptr<float>();
  p.M = M;
  p.K = xl.size(1);
  p.J = static_cast<int32_t>(l.J);
  p.R = static_cast<int32_t>(l.R);
  p.S = static_cast<int32_t>(l.S);
  p.dtype = kernel_dtype(l.dtype, op, "adapters");
  check_launch(cuda::launch_bgmv_shrink(p, stream), op, "bgmv_shrink");
  return t;
}

void expand_cuda(const char* op, const Tensor& y, const Tensor& out, const Tensor& t, const LoraArgs& l,
                 const OptTensor& bias, const OptTensor& output_scale, cudaStream_t stream) {
  cuda::ExpandParams p;
  p.y = y.data_ptr();
  p.ldy = y.stride(0);
  p.y_dtype = kernel_dtype(y.scalar_type(), op, "outputs");
  p.out = out.data_ptr();
  p.ldo = out.stride(0);
  p.out_float = out.scalar_type() != y.scalar_type();
  TORCH_INTERNAL_ASSERT(!p.out_float || out.scalar_type() == at::kFloat);
  p.t = t.data_ptr<float>();
  p.b = l.lora_b.data_ptr();
  p.b_ss = l.lora_b.stride(0);
  p.b_sr = l.lora_b.stride(1);
  p.lora_dtype = kernel_dtype(l.dtype, op, "adapters");
  p.scales = l.scales.data_ptr<float>();
  p.slots = l.slots.data_ptr<int32_t>();
  p.slot_sm = l.Ms == 1 ? 0 : l.J;
  Tensor bias_t, os_t;
  if (l.dora.has_value()) {
    p.dora = l.dora->data_ptr();
    p.dora_ss = l.dora->stride(0);
    if (bias.has_value()) {
      bias_t = bias->to(at::kFloat).contiguous();
      p.bias = bias_t.data_ptr<float>();
    }
  }
  if (output_scale.has_value()) {
    auto [os, sm] = output_scale_rows(*output_scale, at::kFloat);
    os_t = os;
    p.oscale = os_t.data_ptr<float>();
    p.os_sm = sm;
  }
  p.M = y.size(0);
  p.N = y.size(1);
  p.J = static_cast<int32_t>(l.J);
  p.R = static_cast<int32_t>(l.R);
  p.S = static_cast<int32_t>(l.S);
  check_launch(cuda::launch_bgmv_expand(p, stream), op, "bgmv_expand");
}

// Rows at or above which a batch whose rows all use one adapter (token_slots [1, J]) takes
// cuBLAS for both low-rank products instead of the BGMV kernels. A first choice (prefill
// shapes are compute-bound and cuBLAS reads A[s] once per tile rather than once per row);
// not yet measured on a GPU.
constexpr int64_t kGemmRows = 64;

Tensor adapter_linear_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_a,
                           const OptTensor& lora_b, const OptTensor& slot_scales, const OptTensor& token_slots,
                           const OptTensor& dora_scale, const OptTensor& input_scale,
                           const OptTensor& output_scale) {
  constexpr const char* op = "native_adapter_linear";
  check_linear(op, x, weight, bias, input_scale, output_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::ScalarType out_dtype = x.scalar_type();
  auto lora = check_lora(op, x, M, K, N, lora_a, lora_b, slot_scales, token_slots, dora_scale);
  const Tensor xs = scale_input(x, input_scale, weight.scalar_type());
  Tensor y = at::linear(xs, weight, bias);  // cuBLAS, bias in the epilogue
  if (!lora.has_value() || M == 0 || N == 0) return finish_output(y, output_scale, out_dtype);
  const LoraArgs& l = *lora;
  if (!kernel_dtype_ok(y.scalar_type()) || !kernel_dtype_ok(l.dtype)) {  // float64: ATen ops
    return finish_output(apply_adapters_composite(y, xs, bias, l), output_scale, out_dtype);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  Tensor xl = xs.to(l.dtype);
  if (xl.stride(1) != 1 || (M > 1 && xl.stride(0) < K)) xl = xl.contiguous();

  if (l.Ms == 1 && M >= kGemmRows && !l.dora.has_value() && y.scalar_type() == l.dtype) {
    // every row on the same adapter(s): select A[s], B[s] and the scale on the device
    for (int64_t j = 0; j < l.J; ++j) {
      const Tensor sj = l.slots.select(1, j);  // [1] int32, may be -1
      const Tensor idx = sj.clamp_min(0).to(at::kLong);
      const Tensor a_s = l.lora_a.index_select(0, idx).select(0, 0);  // [R, K]
      const Tensor b_s = l.lora_b.index_select(0, idx).select(0, 0);  // [R, N]
      const Tensor coef = at::where(sj >= 0, l.scales.index_select(0, idx), at::zeros_like(l.scales.index_select(0, idx)));
      Tensor t = at::mm(xl, a_s.t());  // [M, R]
      t.mul_(coef.to(l.dtype));
      y.addmm_(t, b_s);
    }
    return finish_output(y, output_scale, out_dtype);
  }
  const Tensor t = shrink_cuda(op, xl, l, stream);
  Tensor out = y;
  if (out_dtype != y.scalar_type()) out = at::empty({M, N}, y.options().dtype(at::kFloat));
  expand_cuda(op, y, out, t, l, bias, output_scale, stream);
  return out.scalar_type() == out_dtype ? out : out.to(out_dtype);
}

Tensor lora_shrink_expand_cuda(const Tensor& y, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b,
                               const Tensor& slot_scales, const Tensor& token_slots) {
  constexpr const char* op = "native_lora_shrink_expand";
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K], got ", shape_str(x));
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0), op, ": y must be [M, N] with M = ", x.size(0), ", got ",
              shape_str(y));
  TORCH_CHECK(x.device() == y.device(), op, ": x and y must be on one device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  auto lora = check_lora(op, y, M, K, N, lora_a, lora_b, slot_scales, token_slots, std::nullopt);
  if (!lora.has_value() || M == 0 || N == 0) return y.clone(at::MemoryFormat::Contiguous);
  const LoraArgs& l = *lora;
  if (!kernel_dtype_ok(y.scalar_type()) || !kernel_dtype_ok(l.dtype)) {
    return apply_adapters_composite(y, x, std::nullopt, l).to(y.scalar_type());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  Tensor xl = x.to(l.dtype);
  if (xl.stride(1) != 1 || (M > 1 && xl.stride(0) < K)) xl = xl.contiguous();
  const Tensor t = shrink_cuda(op, xl, l, stream);
  const Tensor yc = last_dim_contiguous(y);
  Tensor out = at::empty({M, N}, y.options());
  expand_cuda(op, yc, out, t, l, std::nullopt, std::nullopt, stream);
  return out;
}

Tensor adapter_embedding_cuda(const Tensor& ids, const Tensor& weight, const OptTensor& lora_a,
                              const OptTensor& lora_b, const OptTensor& slot_scales, const OptTensor& token_slots) {
  constexpr const char* op = "native_adapter_embedding";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [V, D], got ", shape_str(weight));
  TORCH_CHECK(!at::isFloatingType(ids.scalar_type()), op, ": ids must be integer, got ", ids.scalar_type());
  const bool has_lora = lora_a.has_value() && token_slots.has_value() && token_slots->numel() > 0;
  if (!has_lora) return at::embedding(weight, ids);
  TORCH_CHECK(ids.dim() == 1, op, ": ids must be [M] when adapters apply, got ", shape_str(ids));
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t M = ids.size(0), V = weight.size(0), D = weight.size(1);
  auto lora = check_lora(op, weight, M, V, D, lora_a, lora_b, slot_scales, token_slots, std::nullopt, "V");
  const LoraArgs& l = *lora;
  const Tensor ids64 = ids.to(at::kLong).contiguous();
  if (!kernel_dtype_ok(weight.scalar_type()) || !kernel_dtype_ok(l.dtype)) {  // float64: ATen ops
    return embedding_adapters_composite(at::embedding(weight, ids64), ids64, l).to(weight.scalar_type());
  }
  const Tensor w = last_dim_contiguous(weight);
  Tensor out = at::empty({M, D}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  cuda::EmbeddingParams p;
  p.ids = ids64.data_ptr<int64_t>();
  p.w = w.data_ptr();
  p.ldw = w.stride(0);
  p.w_dtype = kernel_dtype(weight.scalar_type(), op, "weights");
  p.a = l.lora_a.data_ptr();
  p.a_ss = l.lora_a.stride(0);
  p.a_sr = l.lora_a.stride(1);
  p.a_sv = l.lora_a.stride(2);
  p.b = l.lora_b.data_ptr();
  p.b_ss = l.lora_b.stride(0);
  p.b_sr = l.lora_b.stride(1);
  p.lora_dtype = kernel_dtype(l.dtype, op, "adapters");
  p.scales = l.scales.data_ptr<float>();
  p.slots = l.slots.data_ptr<int32_t>();
  p.slot_sm = l.Ms == 1 ? 0 : l.J;
  p.out = out.data_ptr();
  p.M = M;
  p.D = D;
  p.V = V;
  p.J = static_cast<int32_t>(l.J);
  p.R = static_cast<int32_t>(l.R);
  p.S = static_cast<int32_t>(l.S);
  check_launch(cuda::launch_adapter_embedding(p, c10::cuda::getCurrentCUDAStream(weight.device().index()).stream()),
               op, "adapter_embedding");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("native_adapter_linear", &adapter_linear_cuda);
  m.impl("native_adapter_embedding", &adapter_embedding_cuda);
  m.impl("native_lora_shrink_expand", &lora_shrink_expand_cuda);
}

}  // namespace fastpeft
