"""The `triton` backend: fused Triton kernels (msfused.triton_kernels) behind the custom
operators of msfused.triton_ops. Nothing here imports triton: the check is
importlib.util.find_spec, and the ops module is imported on the first call."""
from __future__ import annotations

import importlib.util
import os

import torch

from .registry import Backend, register_backend


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _reason():
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if not _interpret() and not torch.cuda.is_available():
        return "no GPU visible (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return None


def _ops():
    from .. import triton_ops
    return triton_ops


def _forward(x, p, cfg):
    return _ops().triton_block(x, p, cfg)


def _opcheck_samples(x, p, cfg):
    return _ops().opcheck_samples(x, p, cfg)


register_backend(Backend(
    name="triton",
    forward=_forward,
    # under the interpreter "cpu" comes first: tests/conftest.backend_device picks the first
    # device type when no GPU is visible
    device_types=lambda: ("cpu", "cuda") if _interpret() else ("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    unavailable_reason=_reason,
    priority=5,
    description="fused Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)",
    opcheck_samples=_opcheck_samples,
))
