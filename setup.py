"""Build script: the Python package, plus the compiled extension when a compiler is there.

The extension part is added in ``_extensions()``; ``FASTPEFT_SKIP_EXT=1`` skips it.
"""
from setuptools import setup


def _extensions():
    """``fastpeft._C`` (the ``torch.ops.fastpeft.native_*`` operators), and ``fastpeft._fastpath``
    (the eager decode fast path of the LoRA layers, ``csrc/fastpath.cpp``), when they can be built.

    * C++ compiler present: a CppExtension with the CPU kernels (one translation unit).
    * torch built with CUDA and nvcc found (``CUDA_HOME``): a CUDAExtension that adds the CUDA
      kernels (``csrc/cuda/*.cu``) and their binding (``csrc/cuda_ops.cpp``).
    * ``FASTPEFT_SKIP_EXT=1``: nothing; ``FASTPEFT_NO_CUDA=1``: CPU kernels only.

    A failed extension build prints a warning and leaves a working pure-Python package
    (``fastpeft.available_backends(verbose=True)`` then says why "cpp" is missing), unless
    ``FASTPEFT_REQUIRE_EXT=1`` is set (CI and wheel builds set it): then any reason not to build
    (no torch in the build environment, no compiler, a compile or link error) fails the install.
    Build in place for development: ``pip install --no-build-isolation -e .`` (torch must
    already be installed, the extension compiles against it).
    """
    import glob
    import os
    import shutil
    import sys
    import sysconfig

    def flag(name):
        return os.environ.get(name, "0").strip() not in ("", "0")

    required = flag("FASTPEFT_REQUIRE_EXT")

    def warn(msg):
        if required:
            raise RuntimeError(f"fastpeft: {msg}; FASTPEFT_REQUIRE_EXT=1 asks for the compiled extension, "
                               "so the install fails (unset it to install the pure-Python package)")
        print(f"WARNING: fastpeft: {msg}; installing without the compiled extension", file=sys.stderr)

    if flag("FASTPEFT_SKIP_EXT"):
        if required:
            raise RuntimeError("fastpeft: FASTPEFT_SKIP_EXT=1 and FASTPEFT_REQUIRE_EXT=1 contradict each other")
        print("fastpeft: FASTPEFT_SKIP_EXT set, not building fastpeft._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # torch missing from the build environment (use --no-build-isolation)
        warn(f"torch is not importable in the build environment ({e}); use pip install --no-build-isolation")
        return [], {}

    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if not shutil.which(cxx.split()[0]):
        warn(f"no C++ compiler ({cxx!r} not found)")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    rel = lambda p: os.path.relpath(p, here)  # noqa: E731  (setuptools wants relative sources)
    sources = [rel(os.path.join(here, "csrc", "fastpeft_ops.cpp"))]
    cxx_flags = ["-O3", "-fopenmp"]  # torch adds -std=c++20
    # torch's own OpenMP runtime (torch/lib/libgomp.so.1) is already loaded when _C is, and has
    # the same soname as the system one we link against, so one runtime serves both.
    link_flags = ["-fopenmp"]
    define_macros = []  # (py_limited_api=True makes torch add -DPy_LIMITED_API)

    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = (
        torch.version.cuda is not None
        and cuda_home is not None
        and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
        and os.environ.get("FASTPEFT_NO_CUDA", "0") in ("", "0")
    )
    if with_cuda:
        sources += [rel(os.path.join(here, "csrc", "cuda_ops.cpp"))]
        sources += sorted(rel(p) for p in glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))
        define_macros.append(("FASTPEFT_WITH_CUDA", "1"))
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        if not archs:  # no GPU at build time either: sm_80 (A100) and sm_90 (H100/H200) + PTX
            nvcc_flags += [
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90",
            ]
        ext = cpp_extension.CUDAExtension(
            "fastpeft._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastpeft._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """BuildExtension that turns a failed build into a warning (the package still installs),
        or, with ``FASTPEFT_REQUIRE_EXT=1``, lets the failure fail the install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                if required:
                    raise
                warn(f"building the extension failed: {type(e).__name__}: {e}")

        def initialize_options(self):
            super().initialize_options()
            self.failed = set()  # names of extensions whose build failed

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                if required:
                    raise
                self.failed.add(ext.name)
                warn(f"building {ext.name} failed: {type(e).__name__}: {e}")

        def copy_extensions_to_source(self):
            # editable installs copy the built library into the tree; skip what failed to build
            kept = self.extensions
            self.extensions = [e for e in kept if e.name not in self.failed]
            try:
                super().copy_extensions_to_source()
            except Exception as e:  # noqa: BLE001
                if required:
                    raise
                warn(f"placing the extension failed: {type(e).__name__}: {e}")
            finally:
                self.extensions = kept

        def get_outputs(self):
            return [p for p in super().get_outputs() if os.path.exists(p)]

    # pybind11 module on libtorch_python (so not in _C, which C++ programs load without Python)
    fastpath = cpp_extension.CppExtension(
        "fastpeft._fastpath",
        [rel(os.path.join(here, "csrc", "fastpath.cpp"))],
        extra_compile_args={"cxx": ["-O2"]},
    )
    return [ext, fastpath], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
