"""Builds segops._C: the C++ CPU kernels always, the CUDA kernels when possible.

SEGOPS_BUILD_CUDA=auto (default) builds csrc/cuda only when torch is a CUDA build and
nvcc is found; 1 forces it (and fails loudly if impossible); 0 skips it.
SEGOPS_BUILD_CPP=0 skips the extension entirely (pure-Python install, reference backend).
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda(torch_cuda_version):
    flag = os.environ.get("SEGOPS_BUILD_CUDA", "auto").lower()
    if flag not in ("auto", "0", "1"):
        raise SystemExit(f"SEGOPS_BUILD_CUDA must be auto, 0 or 1, got {flag!r}")
    has_nvcc = shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    possible = torch_cuda_version is not None and has_nvcc
    if flag == "1" and not possible:
        raise SystemExit("SEGOPS_BUILD_CUDA=1 but torch is not a CUDA build or nvcc is missing "
                         f"(torch.version.cuda={torch_cuda_version}, nvcc found={has_nvcc})")
    return possible if flag == "auto" else flag == "1"


def _cuda_objects_apart(build_ext_class):
    """build_ext whose .cu objects are named <stem>.cuda.o: csrc/cuda/<op>.cu and its torch binding
    csrc/cuda/<op>.cpp share a stem, and distutils would name both objects <op>.o."""

    class BuildExt(build_ext_class):
        def build_extensions(self):
            object_filenames = self.compiler.object_filenames

            def apart(sources, strip_dir=0, output_dir=""):
                objects = object_filenames(sources, strip_dir=strip_dir, output_dir=output_dir)
                return [os.path.splitext(o)[0] + ".cuda" + os.path.splitext(o)[1]
                        if s.endswith(".cu") else o for s, o in zip(sources, objects)]

            self.compiler.object_filenames = apart
            super().build_extensions()

    return BuildExt


def _extensions():
    if os.environ.get("SEGOPS_BUILD_CPP", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # -fno-trapping-math (as torch's own build): no kernel reads FP exception flags, and with
    # trapping math GCC keeps branches in the vectorised exponentials where AVX2 has no masks.
    # -fno-math-errno: no kernel reads errno, and with it set GCC calls sqrt element by element.
    cxx = ["-O3", "-std=c++17", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-Wall",
           "-Wno-unused-function"]
    if os.environ.get("SEGOPS_NATIVE", "0") == "1":
        cxx.append("-march=native")
    sources = _rel([os.path.join(ROOT, "csrc", "register.cpp"),
                    os.path.join(ROOT, "csrc", "python_module.cpp")]
                   + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    define_macros = []
    if _want_cuda(torch.version.cuda):
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        define_macros.append(("SEGOPS_WITH_CUDA", "1"))
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("segops._C", sources, include_dirs=include_dirs,
                            define_macros=define_macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("segops._C", sources, include_dirs=include_dirs,
                           define_macros=define_macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": _cuda_objects_apart(BuildExtension).with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
