"""The `triton` backend: fused Triton kernels (msfused.ops.triton_kernels) behind the
custom operators of msfused.ops.triton_ops, which are defined here, at import, whenever
Triton imports."""
from __future__ import annotations

import importlib.util
import os

import torch

from .registry import Backend, register_backend

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _load():
    """(the ops module, None) or (None, why the backend cannot run here)."""
    if importlib.util.find_spec("triton") is None:
        return None, "Triton is not installed (pip install triton)"
    try:
        from ..ops import triton_ops
    except Exception as e:  # a Triton that does not import with this PyTorch
        return None, f"the Triton operators failed to load ({type(e).__name__}: {e})"
    if not _INTERPRET and not torch.cuda.is_available():
        return triton_ops, "no GPU visible (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return triton_ops, None


_ops_module, _reason = _load()
_OPS = _ops_module.OPS if _ops_module is not None else None

register_backend(Backend(
    name="triton",
    run=_OPS.run if _OPS else None,
    # under the interpreter "cpu" comes first: tests/conftest.backend_device picks the first
    # device type when no GPU is visible
    device_types=("cpu", "cuda") if _INTERPRET else ("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    unavailable_reason=_reason,
    priority=5,
    description="fused Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)",
    ops=_OPS,
))
