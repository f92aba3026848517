"""The backend registry: a backend is added by registering one Backend object; the module,
the tests and the benchmarks find it here by name."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from ..autocast import autocast_dtype
from ..config import BlockConfig
from ..params import BlockParams


def run_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the block runs in for x: the autocast dtype inside an autocast context
    on x's device, else x's."""
    return autocast_dtype(x) or x.dtype


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here (not built, no GPU, Triton missing...)."""


@dataclass
class Backend:
    name: str
    # forward(x, params, cfg) -> y, differentiable through the backend's own autograd
    forward: Callable[[torch.Tensor, BlockParams, BlockConfig], torch.Tensor]
    # device types this backend runs on when available (may depend on the environment)
    device_types: Callable[[], Tuple[str, ...]]
    dtypes: Tuple[torch.dtype, ...]
    # None when usable here, else the reason it is not
    unavailable_reason: Callable[[], Optional[str]]
    # auto picks the highest priority backend that can run the input
    priority: int = 0
    description: str = ""
    # For torch.library.opcheck in the tests: opcheck_samples(x, params, cfg) returns
    # [(op, args)] covering every custom operator the backend's forward and backward call.
    opcheck_samples: Optional[Callable[..., list]] = None

    def can_run(self, x: torch.Tensor) -> Optional[str]:
        """None if this backend can run x, else why not. Under autocast the dtype that
        counts is the autocast dtype, which the op casts x to."""
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if x.device.type not in self.device_types():
            return (f"it runs on {'/'.join(self.device_types())} tensors, "
                    f"x is on {x.device}")
        dtype = run_dtype(x)
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


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


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
    out = {}
    for name, b in _BACKENDS.items():
        reason = b.unavailable_reason()
        out[name] = BackendStatus(reason is None, reason or "", b.device_types() if reason is None else ())
    return out


def check_backend_name(name: str) -> str:
    if name != "auto":
        get_backend(name)
    return name


def resolve_backend(name: str, x: torch.Tensor) -> Backend:
    """The backend that runs x. A named backend that cannot run x raises; only 'auto'
    chooses (and MSFUSED_BACKEND, when set, overrides 'auto' with a name)."""
    if name == "auto":
        env = os.environ.get("MSFUSED_BACKEND", "").strip()
        if env and env != "auto":
            name = env
    if name != "auto":
        backend = get_backend(name)
        why = backend.can_run(x)
        if why is not None:
            if run_dtype(x) not in backend.dtypes and backend.unavailable_reason() is None \
                    and x.device.type in backend.device_types():
                raise TypeError(f"x: backend {name!r} cannot run dtype {run_dtype(x)}: {why}")
            if backend.unavailable_reason() is None:
                raise ValueError(f"x: backend {name!r} cannot run this input: {why}")
            raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
        return backend
    best = None
    for b in _BACKENDS.values():
        if b.can_run(x) is None and (best is None or b.priority > best.priority):
            best = b
    assert best is not None, "the reference backend runs everything"
    return best
