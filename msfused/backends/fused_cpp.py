"""The `cpp` (CPU) and `cuda` backends: the same msfused:: operators, kernels per device."""
from __future__ import annotations

import torch

from .. import fused_ops
from .registry import Backend, register_backend


def _cpp_reason():
    if fused_ops.load_error():
        return fused_ops.load_error()
    if not fused_ops.has_kernel("CPU"):
        return "msfused._C has no CPU kernels registered"
    return None


def _cuda_reason():
    if fused_ops.load_error():
        return fused_ops.load_error()
    if not fused_ops.has_kernel("CUDA"):
        return ("msfused._C was built without CUDA kernels (needs a CUDA build of PyTorch and "
                "nvcc at build time; MSFUSED_BUILD_CUDA=1 forces it)")
    if not torch.cuda.is_available():
        return "CUDA kernels are built but no GPU is visible"
    return None


register_backend(Backend(
    name="cpp",
    forward=fused_ops.fused_block,
    device_types=lambda: ("cpu",),
    # bfloat16/float16 are widened to float32 at the op boundary (csrc/cpu/block_cpu.cpp)
    dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
    unavailable_reason=_cpp_reason,
    priority=10,
    description="fused C++ kernels (CPU)",
    opcheck_samples=fused_ops.opcheck_samples,
))

register_backend(Backend(
    name="cuda",
    forward=fused_ops.fused_block,
    device_types=lambda: ("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    unavailable_reason=_cuda_reason,
    priority=20,
    description="fused CUDA kernels",
    opcheck_samples=fused_ops.opcheck_samples,
))
