"""The `triton` backend: fused Triton kernels (msfused.ops.triton_kernels) behind the
custom operators of msfused.ops.triton_ops, which are defined here, at import, whenever
Triton imports."""
from __future__ import annotations

import importlib.util
import os

import torch

from .registry import Backend, register_backend

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_problem():
    """Why Triton's interpreter cannot run the kernels in this environment, or None.

    Triton 3.6's interpreter turns a loop bound held in a block of shape [1] into a Python
    int with int(ndarray), which NumPy 2.4 made a TypeError (triton-lang/triton#9171, fixed
    in later Triton by a squeeze). Every kernel here loops over channel chunks up to a run-time
    C, so each launch would fail deep inside the interpreter. One tiny interpreted launch with
    such a loop tells, whatever the version numbers say."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, n):
        acc = tl.zeros([1], dtype=tl.int32)
        for _ in range(0, n, 1):
            acc += 1
        tl.store(out_ptr + tl.arange(0, 1), acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](out, 3)
    except Exception as e:
        import numpy
        return (f"Triton {triton.__version__}'s interpreter fails under NumPy {numpy.__version__} "
                f"({type(e).__name__}: {e}; triton-lang/triton#9171): install numpy<2.4 or a "
                "Triton whose interpreter has the fix (3.8 has it)")
    if int(out.item()) != 3:
        return f"Triton {triton.__version__}'s interpreter ran a 3-step loop {int(out.item())} times"
    return None


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
    if _INTERPRET and not torch.cuda.is_available():
        return triton_ops, _interpreter_problem()
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
