// Calling fastpeft's compiled operators from C++, without Python.
//
// The operators live in the PyTorch dispatcher once the library is loaded (its static
// initialisers register them), so a C++ program needs only libtorch and the library file:
//
//   TORCH=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -std=c++20 call_native_adapter_linear.cpp -o call_native \
//       -I$TORCH/include -I$TORCH/include/torch/csrc/api/include \
//       -L$TORCH/lib -ltorch_cpu -lc10 -Wl,-rpath,$TORCH/lib
//   ./call_native /path/to/fastpeft/_C.abi3.so [in_dir]
//
// (Linking the library instead of dlopen-ing it works too: add
//  -Wl,--no-as-needed /path/to/fastpeft/_C.abi3.so so the linker keeps it.)
//
// Without in_dir the program runs a self-check on random inputs against the same formula
// written with ATen ops. With in_dir (used by tests/test_cpp_ext.py) it reads raw
// little-endian inputs written by Python (x, weight, bias, lora_a, lora_b: float32;
// slot_scales: float32; token_slots: int32; dims.txt: "M K N S R J"), and writes
// in_dir/out.bin (float32 [M, N]) for Python to compare with fastpeft's reference.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <dlfcn.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

using at::Tensor;
using OptTensor = std::optional<Tensor>;

static Tensor read_raw(const std::string& path, at::IntArrayRef shape, at::ScalarType dtype) {
  Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  if (!f) throw std::runtime_error("short read: " + path);
  return t;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " path/to/fastpeft/_C.abi3.so [in_dir]\n";
    return 2;
  }
  // 1. Load the library: this registers fastpeft::native_* with the dispatcher.
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "dlopen failed: " << dlerror() << "\n";
    return 1;
  }
  // 2. Find the operator and give it its C++ signature (the schema is printed for reference).
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("fastpeft::native_adapter_linear", "");
  std::cout << "schema: " << handle.schema() << "\n";
  const auto op = handle.typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                      const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                      const OptTensor&, const OptTensor&)>();

  int64_t M = 5, K = 123, N = 77, S = 3, R = 16, J = 1;
  Tensor x, w, b, a, bt, sc, slots;
  const bool from_files = argc >= 3;
  if (from_files) {
    const std::string dir = argv[2];
    std::ifstream dims(dir + "/dims.txt");
    dims >> M >> K >> N >> S >> R >> J;
    x = read_raw(dir + "/x.bin", {M, K}, at::kFloat);
    w = read_raw(dir + "/weight.bin", {N, K}, at::kFloat);
    b = read_raw(dir + "/bias.bin", {N}, at::kFloat);
    a = read_raw(dir + "/lora_a.bin", {S, R, K}, at::kFloat);
    bt = read_raw(dir + "/lora_b.bin", {S, R, N}, at::kFloat);
    sc = read_raw(dir + "/slot_scales.bin", {S}, at::kFloat);
    slots = read_raw(dir + "/token_slots.bin", {M, J}, at::kInt);
  } else {
    at::manual_seed(0);
    x = at::randn({M, K});
    w = at::randn({N, K});
    b = at::randn({N});
    a = at::randn({S, R, K});
    bt = at::randn({S, R, N});
    sc = at::rand({S});
    slots = at::tensor(std::vector<int32_t>{0, 2, -1, 1, 2}).reshape({M, 1});
  }

  // 3. Call it: a mixed batch, row m uses adapter slot token_slots[m] (-1: base model only).
  const Tensor y = op.call(x, w, b, a, bt, sc, slots, std::nullopt, std::nullopt, std::nullopt);
  std::cout << "output: [" << y.size(0) << ", " << y.size(1) << "] " << y.scalar_type() << "\n";

  if (from_files) {
    const Tensor yc = y.contiguous();
    std::ofstream out(std::string(argv[2]) + "/out.bin", std::ios::binary);
    out.write(static_cast<const char*>(yc.data_ptr()), static_cast<std::streamsize>(yc.nbytes()));
    return out ? 0 : 1;
  }
  // self-check against the formula of fastpeft/ops/reference.py written with ATen ops
  Tensor expect = at::linear(x, w, b);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t s = slots[m][0].item<int32_t>();
    if (s < 0) continue;
    expect[m] += at::matmul(at::matmul(x[m], a[s].t()), bt[s]) * sc[s];
  }
  const double err = (y - expect).abs().max().item<double>();
  std::cout << "max |native - reference| = " << err << "\n";
  return err < 1e-3 ? 0 : 1;
}
