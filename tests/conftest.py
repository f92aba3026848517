"""Shared fixtures: which backends run here, and the devices they run on.

Every test that takes `backend` runs once per registered backend; a backend that cannot
run here is skipped with the reason available_backends() gives (e.g. "no GPU").
"""
import os

import pytest
import torch

import msfused
from msfused.backends import get_backend


def _float32_means_float32():
    """Reference comparisons on CUDA run with TF32 off: cuDNN's float32 convolutions (the
    reference's conv2d) and float32 matmuls default to TF32 (~1e-3 relative error), which
    would make the float32 tolerance meaningless there."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


_float32_means_float32()

ALL_BACKENDS = msfused.backend_names()
FUSED_BACKENDS = tuple(b for b in ALL_BACKENDS if b != "reference")


def backend_device(name: str) -> str:
    """The device a backend's tests run on: its first device type (cpu or cuda)."""
    types = get_backend(name).device_types
    if "cuda" in types and torch.cuda.is_available():
        return "cuda"
    return types[0]


def require(name: str) -> str:
    status = msfused.available_backends()[name]
    if not status.available:
        pytest.skip(f"backend {name!r} unavailable here: {status.reason}")
    return backend_device(name)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    require(request.param)
    return request.param


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    require(request.param)
    return request.param


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
    for name, st in msfused.available_backends().items():
        lines.append(f"msfused backend {name}: {st!r}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("TRITON_INTERPRET=1: triton kernels run on CPU tensors")
    return lines
