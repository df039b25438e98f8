// fastpeft._C: the compiled operators fastpeft::native_* and their CPU kernels.
//
// Loading this library (``import fastpeft._C`` from Python, or dlopen from a C++ program)
// registers the operators with the PyTorch dispatcher through the static initialisers of
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL below. The library does not use libtorch_python:
// it is built with the Python limited API and only defines an empty Python module, so the
// same file serves Python and plain C++ programs linked against libtorch.
//
// Semantics: fastpeft/ops/reference.py (the oracle); shapes: fastpeft/ops/_schema.py.
#include <Python.h>

#include "common.h"
#include "cpu/kernels.h"

#include <dlfcn.h>

namespace fastpeft {
namespace {

using cpu::EmbeddingArgs;
using cpu::ExpandArgs;

// What the CPU learns from one pass over token_slots [Ms, J]: whether each column uses one
// slot for every row (then the low-rank path is two GEMMs), and that every slot is < S.
struct SlotScan {
  std::vector<int32_t> uniform;  // per column: the slot shared by all rows, or kMixed
  bool all_uniform = true;
  bool any_active = false;  // some row has some slot >= 0
  static constexpr int32_t kMixed = INT32_MIN;
};

SlotScan scan_slots(const char* op, const LoraArgs& l) {
  SlotScan r;
  r.uniform.assign(l.J, SlotScan::kMixed);
  const int32_t* s = l.slots.data_ptr<int32_t>();
  for (int64_t j = 0; j < l.J; ++j) {
    int32_t first = s[j] < 0 ? -1 : s[j];
    bool same = true;
    for (int64_t m = 0; m < l.Ms; ++m) {
      const int32_t v = s[m * l.J + j];
      TORCH_CHECK(v < l.S, op, ": token_slots[", m, ", ", j, "] = ", v, " is out of range for ", l.S,
                  " adapter slots (use -1 for no adapter)");
      const int32_t vv = v < 0 ? -1 : v;
      same = same && vv == first;
      r.any_active = r.any_active || vv >= 0;
    }
    if (same) {
      r.uniform[j] = first;
    } else {
      r.all_uniform = false;
    }
  }
  return r;
}

template <typename F>
void dispatch_float(at::ScalarType t, const char* op, const F& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kDouble:
      f(double{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, " (float32, bfloat16, float16 or float64 expected)");
  }
}

// Rows from which a batch whose rows share one adapter takes MKL/oneDNN GEMMs for the low-rank
// products instead of the BGMV kernels. Measured with native_lora_shrink_expand, K = N = 4096,
// R = 16, one thread (AMD EPYC, AVX-512), min of 400 interleaved calls, GEMM vs BGMV in us:
//   fp32  M=1 22 vs 18, M=8 66 vs 59, M=16  97 vs 113, M=64 282 vs 418
//   bf16  M=1 70 vs 24, M=8 81 vs 72, M=16 107 vs 134, M=64 236 vs 507
// (oneDNN's small bf16 GEMMs carry ~50 us of setup, which the BGMV loop does not pay.)
constexpr int64_t kGemmRows = 16;

// T [M, J, R] in acc_dtype(lora dtype): the shrink x @ A[s].T for every row and adapter.
// Columns whose slot is shared by all rows of a batch of >= kGemmRows rows use one GEMM;
// everything else the per-row BGMV kernel. Rows whose slot is -1 are not written (never read).

Tensor shrink_cpu(const Tensor& xl, const LoraArgs& l, const SlotScan& scan) {
  const int64_t M = xl.size(0), K = xl.size(1);
  Tensor t = at::empty({M, l.J, l.R}, xl.options().dtype(acc_dtype(l.dtype)));
  std::vector<char> gemm(l.J, 0);
  bool any_bgmv = false;
  for (int64_t j = 0; j < l.J; ++j) {
    const int32_t s = scan.uniform[j];
    if (s != SlotScan::kMixed && (s < 0 || M >= kGemmRows)) {
      gemm[j] = 1;
      if (s >= 0) t.select(1, j).copy_(at::mm(xl, l.lora_a.select(0, s).t()));
    } else {
      any_bgmv = true;
    }
  }
  if (!any_bgmv) return t;
  // the BGMV handles all mixed columns; GEMM columns are skipped by masking their slots
  Tensor slots = l.slots;
  if (std::any_of(gemm.begin(), gemm.end(), [](char g) { return g != 0; })) {
    slots = l.slots.clone();
    for (int64_t j = 0; j < l.J; ++j)
      if (gemm[j]) slots.select(1, j).fill_(-1);
  }
  dispatch_float(l.dtype, "native_adapter_linear", [&](auto tag) {
    using L = decltype(tag);
    cpu::bgmv_shrink<L>(xl.data_ptr<L>(), xl.stride(0), l.lora_a.data_ptr<L>(), l.lora_a.stride(0),
                        l.lora_a.stride(1), slots.data_ptr<int32_t>(), l.Ms == 1 ? 0 : l.J, M, l.J, l.R, K,
                        t.data_ptr<cpu::acc_of<L>>());
  });
  return t;
}

// xl: xs in the lora dtype with contiguous rows
Tensor lora_input(const Tensor& xs, at::ScalarType dtype) {
  Tensor xl = xs.to(dtype);
  if (xl.size(1) > 1 && xl.stride(1) != 1) xl = xl.contiguous();
  if (xl.size(0) > 1 && xl.stride(0) < xl.size(1)) xl = xl.contiguous();
  return xl;
}

// Runs the expand + epilogue kernel: out = (y + low-rank deltas) * oscale.
void run_expand(const Tensor& y, const Tensor& out, const Tensor& t, const LoraArgs& l, const OptTensor& bias,
                const OptTensor& output_scale) {
  const at::ScalarType ydt = y.scalar_type();
  const at::ScalarType epi = (ydt == at::kDouble || l.dtype == at::kDouble) ? at::kDouble : at::kFloat;
  ExpandArgs p;
  p.y = y.data_ptr();
  p.ldy = y.stride(0);
  p.out = out.data_ptr();
  p.ldo = out.stride(0);
  p.out_float = out.scalar_type() != ydt;
  TORCH_INTERNAL_ASSERT(!p.out_float || out.scalar_type() == at::kFloat);
  p.t = t.data_ptr();
  p.b = l.lora_b.data_ptr();
  p.b_ss = l.lora_b.stride(0);
  p.b_sr = l.lora_b.stride(1);
  p.scales = l.scales.data_ptr();
  p.slots = l.slots.data_ptr<int32_t>();
  p.slot_sm = l.Ms == 1 ? 0 : l.J;
  Tensor bias_t, os_t;
  if (l.dora.has_value()) {
    p.dora = l.dora->data_ptr();
    p.dora_ss = l.dora->stride(0);
    if (bias.has_value()) {
      bias_t = bias->to(epi).contiguous();
      p.bias = bias_t.data_ptr();
    }
  }
  if (output_scale.has_value()) {
    auto [os, sm] = output_scale_rows(*output_scale, epi);
    os_t = os;
    p.oscale = os_t.data_ptr();
    p.os_sm = sm;
  }
  p.M = y.size(0);
  p.N = y.size(1);
  p.J = l.J;
  p.R = l.R;
  dispatch_float(ydt, "native_adapter_linear", [&](auto ytag) {
    using Y = decltype(ytag);
    dispatch_float(l.dtype, "native_adapter_linear", [&](auto ltag) {
      using L = decltype(ltag);
      cpu::expand_epilogue<Y, L>(p);
    });
  });
}

// ------------------------------------------------------------------------ adapter_linear
Tensor adapter_linear_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_a,
                          const OptTensor& lora_b, const OptTensor& slot_scales, const OptTensor& token_slots,
                          const OptTensor& dora_scale, const OptTensor& input_scale,
                          const OptTensor& output_scale) {
  constexpr const char* op = "native_adapter_linear";
  check_linear(op, x, weight, bias, input_scale, output_scale);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::ScalarType out_dtype = x.scalar_type();
  auto lora = check_lora(op, x, M, K, N, lora_a, lora_b, slot_scales, token_slots, dora_scale);

  const Tensor xs = scale_input(x, input_scale, weight.scalar_type());
  Tensor y = at::linear(xs, weight, bias);  // [M, N]: MKL/oneDNN GEMM with the bias in its epilogue
  if (!lora.has_value() || M == 0 || N == 0) return finish_output(y, output_scale, out_dtype);
  const LoraArgs& l = *lora;
  const SlotScan scan = scan_slots(op, l);
  if (!scan.any_active) return finish_output(y, output_scale, out_dtype);
  const Tensor xl = lora_input(xs, l.dtype);

  // Every row uses the same adapter(s), no DoRA, adapters in the output's dtype, enough rows:
  // the LoRA path is one shrink GEMM and one expand GEMM accumulated into y (beta = 1,
  // alpha = scale). Fewer rows (decode) take the BGMV kernels below, which are faster there.
  if (scan.all_uniform && M >= kGemmRows && !l.dora.has_value() && y.scalar_type() == l.dtype &&
      l.dtype != at::kDouble) {
    const float* sc = l.scales.data_ptr<float>();
    for (int64_t j = 0; j < l.J; ++j) {
      const int32_t s = scan.uniform[j];
      if (s < 0) continue;
      float scale = sc[s];
      dispatch_float(l.dtype, op, [&](auto tag) { scale = cpu::round_to<decltype(tag), float>(scale); });
      const Tensor t = at::mm(xl, l.lora_a.select(0, s).t());  // [M, R]
      y.addmm_(t, l.lora_b.select(0, s), /*beta=*/1, /*alpha=*/scale);
    }
    return finish_output(y, output_scale, out_dtype);
  }

  // General case (mixed batch, DoRA, mixed dtypes): BGMV shrink into T, then one pass over
  // y that adds the deltas, applies DoRA and the IA3 output scale and casts (in place when
  // the output dtype is y's).
  const Tensor t = shrink_cpu(xl, l, scan);
  Tensor out = y;
  if (out_dtype != y.scalar_type()) out = at::empty({M, N}, y.options().dtype(at::kFloat));
  run_expand(y, out, t, l, bias, output_scale);
  return out.scalar_type() == out_dtype ? out : out.to(out_dtype);
}

// ------------------------------------------------------------------------ lora_shrink_expand
Tensor lora_shrink_expand_cpu(const Tensor& y, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b,
                              const Tensor& slot_scales, const Tensor& token_slots) {
  constexpr const char* op = "native_lora_shrink_expand";
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K], got ", shape_str(x));
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0), op, ": y must be [M, N] with M = ", x.size(0), ", got ",
              shape_str(y));
  TORCH_CHECK(x.device() == y.device(), op, ": x and y must be on one device");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  auto lora = check_lora(op, y, M, K, N, lora_a, lora_b, slot_scales, token_slots, std::nullopt);
  if (!lora.has_value() || M == 0 || N == 0) return y.clone(at::MemoryFormat::Contiguous);
  const LoraArgs& l = *lora;
  const SlotScan scan = scan_slots(op, l);
  if (!scan.any_active) return y.clone(at::MemoryFormat::Contiguous);
  const Tensor xl = lora_input(x, l.dtype);
  if (scan.all_uniform && M >= kGemmRows && y.scalar_type() == l.dtype && l.dtype != at::kDouble) {
    Tensor out;
    const float* sc = l.scales.data_ptr<float>();
    for (int64_t j = 0; j < l.J; ++j) {
      const int32_t s = scan.uniform[j];
      if (s < 0) continue;
      float scale = sc[s];
      dispatch_float(l.dtype, op, [&](auto tag) { scale = cpu::round_to<decltype(tag), float>(scale); });
      const Tensor t = at::mm(xl, l.lora_a.select(0, s).t());
      if (out.defined()) {
        out.addmm_(t, l.lora_b.select(0, s), 1, scale);
      } else {
        out = at::addmm(y, t, l.lora_b.select(0, s), 1, scale);
      }
    }
    return out;
  }
  const Tensor t = shrink_cpu(xl, l, scan);
  const Tensor yc = last_dim_contiguous(y);
  Tensor out = at::empty({M, N}, y.options());
  run_expand(yc, out, t, l, std::nullopt, std::nullopt);
  return out;
}

// ------------------------------------------------------------------------ adapter_embedding
Tensor adapter_embedding_cpu(const Tensor& ids, const Tensor& weight, const OptTensor& lora_a,
                             const OptTensor& lora_b, const OptTensor& slot_scales, const OptTensor& token_slots) {
  constexpr const char* op = "native_adapter_embedding";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [V, D], got ", shape_str(weight));
  TORCH_CHECK(!at::isFloatingType(ids.scalar_type()), op, ": ids must be integer, got ", ids.scalar_type());
  const int64_t V = weight.size(0), D = weight.size(1);
  const bool has_lora = lora_a.has_value() && token_slots.has_value() && token_slots->numel() > 0;
  if (!has_lora) return at::embedding(weight, ids);
  TORCH_CHECK(ids.dim() == 1, op, ": ids must be [M] when adapters apply, got ", shape_str(ids));
  const int64_t M = ids.size(0);
  auto lora = check_lora(op, weight, M, V, D, lora_a, lora_b, slot_scales, token_slots, std::nullopt, "V");
  const LoraArgs& l = *lora;
  (void)scan_slots(op, l);  // range check of the slots
  const Tensor ids64 = ids.to(at::kLong).contiguous();
  const int64_t* id = ids64.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK_INDEX(id[m] >= 0 && id[m] < V, op, ": ids[", m, "] = ", id[m], " is out of range for ", V,
                      " embeddings");
  }
  const Tensor w = last_dim_contiguous(weight);
  Tensor out = at::empty({M, D}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || D == 0) return out;
  EmbeddingArgs p;
  p.ids = id;
  p.w = w.data_ptr();
  p.ldw = w.stride(0);
  p.a = l.lora_a.data_ptr();
  p.a_ss = l.lora_a.stride(0);
  p.a_sr = l.lora_a.stride(1);
  p.a_sv = l.lora_a.stride(2);
  p.b = l.lora_b.data_ptr();
  p.b_ss = l.lora_b.stride(0);
  p.b_sr = l.lora_b.stride(1);
  p.scales = l.scales.data_ptr();
  p.slots = l.slots.data_ptr<int32_t>();
  p.slot_sm = l.Ms == 1 ? 0 : l.J;
  p.out = out.data_ptr();
  p.M = M;
  p.D = D;
  p.J = l.J;
  p.R = l.R;
  dispatch_float(weight.scalar_type(), op, [&](auto wtag) {
    using W = decltype(wtag);
    dispatch_float(l.dtype, op, [&](auto ltag) {
      using L = decltype(ltag);
      cpu::adapter_embedding<W, L>(p);
    });
  });
  return out;
}

}  // namespace

// Compiled-in features, queried from Python through torch.ops.fastpeft.native_build_info().
namespace {
std::string build_info() {
  std::string s = "cpu";
#ifdef FASTPEFT_WITH_CUDA
  s += ",cuda";
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTPEFT_NO_MULTIVERSION)
  s += ",x86-multiversion";
#endif
  return s;
}
}  // namespace


// The operator definitions. A fragment, because the Python-defined routed operators
// (fastpeft::adapter_linear, fastpeft::adapter_embedding) live in the same namespace.
TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def(kAdapterLinearSchema, {at::Tag::pt2_compliant_tag});
  m.def(kAdapterEmbeddingSchema, {at::Tag::pt2_compliant_tag});
  m.def(kLoraShrinkExpandSchema, {at::Tag::pt2_compliant_tag});
  // compiled-in features ("cpu", "cuda", "x86-multiversion"), for fastpeft._ext
  m.def("native_build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("native_adapter_linear", &adapter_linear_cpu);
  m.impl("native_adapter_embedding", &adapter_embedding_cpu);
  m.impl("native_lora_shrink_expand", &lora_shrink_expand_cpu);
}

}  // namespace fastpeft

// An empty Python module, so that `import fastpeft._C` loads this library (and runs the
// registrations above). PyModule_Create2 is looked up when Python calls PyInit__C instead of
// being linked, so the library has no undefined Python symbols: C++ programs without Python
// can link it (-Wl,--no-as-needed) or dlopen it with RTLD_NOW.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastpeft compiled operators (registered as torch.ops.fastpeft.native_*)",
      -1,
      nullptr,
  };
  using Create = PyObject* (*)(PyModuleDef*, int);
  static const auto create = reinterpret_cast<Create>(dlsym(RTLD_DEFAULT, "PyModule_Create2"));
  return create != nullptr ? create(&module_def, PYTHON_ABI_VERSION) : nullptr;
}
}
