"""The backend registry: a backend is one registered Backend object; the module, the
functional form, the tests and the benchmarks find it here by name.

Availability is decided once per process, when the backend registers (whether the
extension loaded, a GPU is visible, Triton imports; MSFUSED_BACKEND is read at import too).
Choosing the backend for an input is then a dictionary lookup on (name, device type,
dtype), filled on first use by plain Python that torch.compile traces without a graph
break.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from ..config import BlockConfig
from ..ops.autocast import autocast_dtype
from ..ops.registration import BlockOps
from ..params import BlockParams


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here (not built, no GPU, Triton missing...)."""


@dataclass(frozen=True)
class Backend:
    name: str
    # run(x, params, cfg) -> y, differentiable through the backend's own autograd. It gets
    # x as the caller passed it: the backend's operators check every argument themselves.
    run: Callable[[torch.Tensor, BlockParams, BlockConfig], torch.Tensor]
    # device types this backend runs on when available
    device_types: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    # None when usable here, else why not: decided once, at registration
    unavailable_reason: Optional[str]
    # auto picks the highest priority backend that can run the input
    priority: int = 0
    description: str = ""
    # The backend's forward and backward operators (msfused.ops.registration.BlockOps),
    # None for the reference. ops.opcheck_samples(x, params, cfg) returns the (op, args)
    # calls torch.library.opcheck checks in the tests.
    ops: Optional[BlockOps] = None

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def can_run(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run a tensor of this device type and (run) dtype, else
        why not."""
        if self.unavailable_reason is not None:
            return self.unavailable_reason
        if device_type not in self.device_types:
            return f"it runs on {'/'.join(self.device_types)} tensors, x is on {device_type}"
        if dtype not in self.dtypes:
            return f"it supports {', '.join(str(d) for d in self.dtypes)}; x is {dtype}"
        return None


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str = ""
    device_types: Tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        if self.available:
            return f"available on {'/'.join(self.device_types)}"
        return f"unavailable: {self.reason}"


_BACKENDS: Dict[str, Backend] = {}
# (name, device type, run dtype) -> Backend, for names and inputs that resolve
_RESOLVED: Dict[Tuple[str, str, torch.dtype], Backend] = {}
# MSFUSED_BACKEND overrides "auto" (read once, at import)
_ENV_BACKEND = os.environ.get("MSFUSED_BACKEND", "").strip() or "auto"


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _RESOLVED.clear()


def backend_names() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, got {type(name).__name__}")
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + backend_names()}, got {name!r}")
    return _BACKENDS[name]


def available_backends() -> Dict[str, BackendStatus]:
    """Every registered backend and whether it is usable here; if not, why."""
    return {name: BackendStatus(b.available, b.unavailable_reason or "",
                                b.device_types if b.available else ())
            for name, b in _BACKENDS.items()}


def check_backend_name(name: str) -> str:
    if name != "auto":
        get_backend(name)
    return name


def run_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the block runs in for x: the autocast dtype inside an autocast context
    on x's device, else x's."""
    return autocast_dtype(x) or x.dtype


def _resolve(name: str, device_type: str, dtype: torch.dtype) -> Backend:
    if name == "auto":
        name = _ENV_BACKEND
    if name != "auto":
        backend = get_backend(name)
        why = backend.can_run(device_type, dtype)
        if why is None:
            return backend
        if not backend.available:
            raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
        if device_type in backend.device_types:
            raise TypeError(f"x: backend {name!r} cannot run dtype {dtype}: {why}")
        raise ValueError(f"x: backend {name!r} cannot run this input: {why}")
    best = None
    for b in _BACKENDS.values():
        if b.can_run(device_type, dtype) is None and (best is None or b.priority > best.priority):
            best = b
    if best is None:  # no backend claims it (an integer dtype, say): the reference checks
        best = _BACKENDS["reference"]
    return best


_MODULES = sys.modules
_compiling = torch.compiler.is_dynamo_compiling


def _in_torchscript_onnx_export() -> bool:
    """The TorchScript ONNX exporter (torch.onnx.export(..., dynamo=False)) is tracing: it
    knows no custom operator, so the block is traced as the reference's standard
    convolutions. (The dynamo exporter lowers the fused operators instead:
    msfused.ops.lowering.) Read off the exporter's flag without importing torch.onnx."""
    for name in ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals"):
        mod = _MODULES.get(name)
        if mod is not None:
            return bool(mod.GLOBALS.in_onnx_export)
    return False


def resolve_backend(name: str, x) -> Backend:
    """The backend that runs x. A named backend that cannot run x raises; only 'auto'
    chooses (and MSFUSED_BACKEND, when set, overrides 'auto' with a name)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    # "torch.onnx" is in sys.modules only once something imported the exporter
    if "torch.onnx" in _MODULES and not _compiling() and _in_torchscript_onnx_export():
        return _BACKENDS["reference"]
    # x.is_cpu first: x.device builds a device object (~0.3 us on a ~8 us path)
    dtype = run_dtype(x) if torch._C._is_any_autocast_enabled() else x.dtype
    key = (name, "cpu" if x.is_cpu else x.device.type, dtype)
    backend = _RESOLVED.get(key)
    if backend is None:
        backend = _RESOLVED[key] = _resolve(*key)
    return backend
