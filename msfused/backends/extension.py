"""The `cpp` (CPU) and `cuda` backends: the same msfused:: operators of the compiled
extension (msfused.ops.extension), kernels per device, picked by PyTorch's dispatcher."""
from __future__ import annotations

import torch

from ..ops import extension
from .registry import Backend, register_backend


def _cpp_reason():
    if extension.load_error():
        return extension.load_error()
    if not extension.has_kernel("CPU"):
        return "msfused._C has no CPU kernels registered"
    return None


def _cuda_reason():
    if extension.load_error():
        return extension.load_error()
    if not extension.has_kernel("CUDA"):
        return ("msfused._C was built without CUDA kernels (needs a CUDA build of PyTorch and "
                "nvcc at build time; MSFUSED_BUILD_CUDA=1 forces it)")
    if not torch.cuda.is_available():
        return "CUDA kernels are built but no GPU is visible"
    return None


_ALL_FLOAT = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# (name, device type, why not here, priority, description). cpp computes bfloat16/float16
# in float32, widened at the op boundary (csrc/cpu/block_cpu.cpp).
for name, device, reason, priority, description in (
        ("cpp", "cpu", _cpp_reason(), 10, "fused C++ kernels (CPU)"),
        ("cuda", "cuda", _cuda_reason(), 20, "fused CUDA kernels")):
    register_backend(Backend(
        name=name, run=extension.OPS.run if extension.OPS else None, device_types=(device,),
        dtypes=_ALL_FLOAT, unavailable_reason=reason, priority=priority,
        description=description, ops=extension.OPS))
