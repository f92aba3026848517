"""Builds msfused._C: the C++ CPU kernels always, the CUDA kernels when this machine can
compile them (a CUDA build of PyTorch and nvcc), whether or not a GPU is present.

Environment:
  MSFUSED_BUILD_CUDA=1|0   force the CUDA kernels on or off (default: auto-detect)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;8.6;8.9;9.0+PTX"; CI uses "9.0")
  MAX_JOBS                 parallel compile jobs (ninja)
  MSFUSED_DEBUG_INFO=1     keep the host compiler's debug info (-g; off by default)
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

# PyTorch guesses CUDA_HOME when it is unset; point it at the toolkit that has nvcc first.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    for cand in ("/usr/local/cuda", os.path.dirname(os.path.dirname(shutil.which("nvcc") or "/x/x"))):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            break

import torch  # noqa: E402
from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,  # noqa: E402
                                       CUDAExtension)

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_cuda() -> bool:
    flag = os.environ.get("MSFUSED_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    # torch.cuda.is_available() is deliberately not consulted: build machines have no GPU.
    can = (torch.version.cuda is not None and CUDA_HOME is not None
           and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if flag in ("1", "true", "yes", "on") and not can:
        raise RuntimeError("MSFUSED_BUILD_CUDA=1 but no CUDA build of PyTorch or no nvcc "
                           f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    return can


def nvidia_wheel_includes():
    """ATen's CUDA headers include cuBLAS/cuSPARSE headers that PyTorch's pip wheels ship
    under site-packages/nvidia/cu*/include rather than in the toolkit."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in list(nvidia.__path__):
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def extension():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template that only runs in parallel when the
    # calling translation unit is compiled with OpenMP (PyTorch's CPU builds use OpenMP).
    cxx = ["-O3", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"]
    # Python's own CFLAGS carry -g; the debug info of ATen's and the dispatcher's templates
    # doubles the compile time of every file that includes them (autocast.cpp 47 s -> 23 s).
    if os.environ.get("MSFUSED_DEBUG_INFO", "") != "1":
        cxx.append("-g0")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not build_cuda():
        return CppExtension("msfused._C", cpu_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                            libraries=["dl"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
            "--threads", os.environ.get("MSFUSED_NVCC_THREADS", "2")]
    return CUDAExtension("msfused._C", cpu_sources + cuda_sources,
                         include_dirs=include_dirs + nvidia_wheel_includes(),
                         define_macros=[("MSFUSED_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx + ["-DMSFUSED_WITH_CUDA=1"], "nvcc": nvcc},
                         extra_link_args=["-fopenmp"], libraries=["dl"])


setup(
    packages=find_packages(include=["msfused", "msfused.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
