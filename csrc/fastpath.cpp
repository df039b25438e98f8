// fastpeft._fastpath: the eager decode fast path of LoraLinear, in C++.
//
// Why a second module: fastpeft._C is built without libtorch_python (so plain C++ programs can
// dlopen it), so it cannot take Python tensors. This small pybind11 module can, and it calls
// fastpeft::native_adapter_linear through the dispatcher's *unboxed* entry.
//
// What it saves, per adapted layer and decode step (batch 1, fp32, 2-core AMD EPYC, hidden 512,
// weights streamed from DRAM each step; docs/perf-notes.md): the Python body of the fast path
// and the boxed `torch.ops` call (schema-driven argument parsing of 10 arguments) cost ~10 us a
// layer when their code and data are cache-cold, as they are between layers of a decode step.
//
// A LinearPlan holds the arguments of one layer's fused forward (built by LoraLinear after a
// forward through the general path) plus what must still hold for them to be valid: no
// gradient needed; the layer's parameters and modules are the same objects (identity checks
// `container[key] is object` on the modules' _parameters/_modules dicts, ~20 ns each); the
// same storages (and versions, where the stacks are copies); the same backend choice. Calling it returns the layer's output, or None when any check fails (then
// the layer drops the plan and takes its general path, which raises the proper errors).
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

using OptTensor = std::optional<at::Tensor>;

// Bumped whenever the backend choice changes (fastpeft.ops.backends calls bump_epoch): a plan
// made under another choice must not run.
std::atomic<int64_t> g_epoch{0};

using AdapterLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                    const OptTensor&, const OptTensor&);

const c10::TypedOperatorHandle<AdapterLinearSig>& adapter_linear_op() {
  // fastpeft._C registers the operator; LinearPlan is only made after it is loaded
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fastpeft::native_adapter_linear", "")
                                 .typed<AdapterLinearSig>();
  return handle;
}

struct LinearPlan {
  std::vector<at::Tensor> grad_params;  // a gradient to any of these (or x) disables the plan
  std::vector<at::Tensor> ptr_ts;       // tensors whose storage must not have moved
  std::vector<const void*> ptrs;
  std::vector<at::Tensor> ver_ts;  // tensors that must not have been written to
  std::vector<int64_t> vers;
  // (dict, key, object): dict[key] must still be object (references held by the plan)
  std::vector<std::tuple<py::dict, py::object, py::object>> checks;
  int64_t K = 0, N = 0;
  at::Tensor weight;
  OptTensor bias, lora_a, lora_b, scales, slots, dora;
  int64_t epoch = 0;

  LinearPlan(std::vector<at::Tensor> grad_params_, std::vector<at::Tensor> ptr_ts_, std::vector<at::Tensor> ver_ts_,
             const py::list& identity_checks, int64_t K_, int64_t N_, at::Tensor weight_, OptTensor bias_, at::Tensor lora_a_, at::Tensor lora_b_,
             at::Tensor scales_, OptTensor slots_, OptTensor dora_)
      : grad_params(std::move(grad_params_)),
        ptr_ts(std::move(ptr_ts_)),
        ver_ts(std::move(ver_ts_)),
        K(K_),
        N(N_),
        weight(std::move(weight_)),
        bias(std::move(bias_)),
        lora_a(std::move(lora_a_)),
        lora_b(std::move(lora_b_)),
        scales(std::move(scales_)),
        slots(std::move(slots_)),
        dora(std::move(dora_)),
        epoch(g_epoch.load()) {
    (void)adapter_linear_op();  // fail here (at plan time), not in the forward, if _C is absent
    for (const auto& item : identity_checks) {
      auto t = item.cast<py::tuple>();
      if (t.size() != 3) throw py::value_error("identity checks are (dict, key, object) triples");
      checks.emplace_back(t[0].cast<py::dict>(), t[1], t[2]);
    }
    ptrs.reserve(ptr_ts.size());
    for (const auto& t : ptr_ts) ptrs.push_back(t.data_ptr());
    vers.reserve(ver_ts.size());
    for (const auto& t : ver_ts) vers.push_back(t._version());
  }

  bool valid_for(const at::Tensor& x) const {
    if (epoch != g_epoch.load(std::memory_order_relaxed)) return false;
    if (x.dim() == 0 || x.size(-1) != K) return false;  // the general path raises the error
    if (at::GradMode::is_enabled()) {
      if (x.requires_grad()) return false;
      for (const auto& p : grad_params)
        if (p.requires_grad()) return false;
    }
    for (size_t i = 0; i < ptr_ts.size(); ++i)
      if (ptr_ts[i].data_ptr() != ptrs[i]) return false;
    for (size_t i = 0; i < ver_ts.size(); ++i)
      if (ver_ts[i]._version() != vers[i]) return false;
    for (const auto& [dict, key, obj] : checks) {
      PyObject* now = PyDict_GetItemWithError(dict.ptr(), key.ptr());  // borrowed
      if (now != obj.ptr()) {
        PyErr_Clear();  // (a failed key comparison is only a failed check)
        return false;
      }
    }
    return true;
  }

  // x [..., K] -> [..., N]; slots: the token slots of this call (mixed batches), else the plan's
  // Only plain torch.Tensor inputs: subclasses (and anything else) take the general path,
  // which dispatches them as torch.ops would.
  py::object call(py::handle x_obj, const OptTensor& call_slots) const {
    if (!THPVariable_CheckExact(x_obj.ptr())) return py::none();
    const at::Tensor& x = THPVariable_Unpack(x_obj.ptr());
    if (!valid_for(x)) return py::none();
    const OptTensor& ts = call_slots.has_value() ? call_slots : slots;
    if (!ts.has_value()) return py::none();
    const at::Tensor x2 = x.reshape({-1, K});
    at::Tensor y;
    {
      at::AutoDispatchBelowAutograd guard;  // nothing needs a gradient (checked above)
      y = adapter_linear_op().call(x2, weight, bias, lora_a, lora_b, scales, ts, dora, std::nullopt, std::nullopt);
    }
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(N);
    return py::cast(y.view(shape));
  }
};

}  // namespace

PYBIND11_MODULE(_fastpath, m) {
  m.doc() = "fastpeft's eager decode fast path (see csrc/fastpath.cpp)";
  py::class_<LinearPlan>(m, "LinearPlan")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, const py::list&,
                    int64_t, int64_t, at::Tensor, OptTensor, at::Tensor, at::Tensor, at::Tensor, OptTensor, OptTensor>(),
           py::arg("grad_params"), py::arg("ptr_tensors"), py::arg("version_tensors"), py::arg("identity_checks"),
           py::arg("in_features"),
           py::arg("out_features"), py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"),
           py::arg("slot_scales"), py::arg("token_slots"), py::arg("dora_scale"))
      .def("__call__", &LinearPlan::call, py::arg("x"), py::arg("token_slots") = py::none(),
           "The layer's output for x [..., K], or None when the plan no longer applies");
  m.def("bump_epoch", [] { g_epoch.fetch_add(1); }, "Invalidate every plan (the backend choice changed)");
}
