"""Builds the fused margin kernels as ``angular.ops._C`` (ninja), or installs the pure-Python
package.

- CPU kernels (``CppExtension``) whenever a C++ compiler is there.
- CPU + CUDA kernels (``CUDAExtension``) when CUDA is available, or when ``ANGULAR_BUILD_CUDA=1``
  forces it (for example to compile-check the CUDA sources on a machine without a GPU).
- ``ANGULAR_BUILD_EXTENSION=0`` skips the extension. A failed build also falls back to the
  pure-Python package (the ops then run the reference and say so once), unless
  ``ANGULAR_REQUIRE_EXTENSION=1``, which makes the failure fatal (CI sets it).
"""

import glob
import os

from setuptools import find_packages, setup


def _flag(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def extension_modules():
    if _flag("ANGULAR_BUILD_EXTENSION", "1") in ("0", "false", "no"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("angular: torch is not importable at build time; installing without the extension")
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return [], {}
    force_cuda = _flag("ANGULAR_BUILD_CUDA") in ("1", "true", "yes")
    use_cuda = force_cuda or (torch.cuda.is_available() and _flag("ANGULAR_BUILD_CUDA") != "0")
    # -Wno-psabi: GCC's note that AVX vector arguments changed ABI in GCC 4.6, for the AVX2/AVX512
    # kernel files (csrc/cpu/kernels_*.cpp), which only call each other.
    cxx_flags = (
        ["-O3", "-fopenmp", "-Wno-psabi", "-Wno-unknown-pragmas"] if os.name != "nt" else ["/O2"]
    )
    define_macros = []
    extension_class = CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    if use_cuda:
        # The .cu files hold the kernels only (lean includes, fast nvcc); csrc/cuda/*.cpp, compiled
        # by the C++ compiler, allocates tensors and registers the CUDA implementations.
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        extension_class = CUDAExtension
        define_macros.append(("ANGULAR_WITH_CUDA", None))
        # No --use_fast_math: the margin needs accurate acos/cos; the kernels call __expf themselves.
        # (The language standard, C++20 for torch >= 2.10, comes from torch.utils.cpp_extension.)
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]

    class TolerantBuildExtension(BuildExtension):
        """A failed build leaves a working pure-Python package unless the extension is required."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler missing, CUDA headers missing, ...
                if _flag("ANGULAR_REQUIRE_EXTENSION") in ("1", "true", "yes"):
                    raise
                print(
                    f"angular: building the extension failed ({error}); the ops will use the "
                    "pure-PyTorch reference"
                )

        def copy_extensions_to_source(self):
            # Unlink the old library rather than overwrite it: a process that has it loaded keeps
            # its (now nameless) copy instead of crashing on a truncated file.
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
                if os.path.exists(inplace_file):
                    os.unlink(inplace_file)
            # Builds before the extension moved into angular/ops/ left it at the package root.
            for stale in glob.glob("angular/_C.*.so") + glob.glob("angular/_C.*.pyd"):
                os.unlink(stale)
            super().copy_extensions_to_source()

    link_args = []
    if os.name != "nt":
        # rpath to torch's libraries, so that `import angular.ops._C` works before `import torch`.
        from torch.utils.cpp_extension import library_paths

        link_args = ["-fopenmp"] + [f"-Wl,-rpath,{path}" for path in library_paths()]
    module = extension_class(
        "angular.ops._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=link_args,
        py_limited_api=False,
    )
    return [module], {"build_ext": TolerantBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["angular", "angular.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
