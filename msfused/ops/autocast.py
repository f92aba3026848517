"""Autocast for the operators defined in Python (the Triton ones); the C++/CUDA operators
have theirs in C++ (csrc/autocast.cpp), with the same rule.

Under `torch.autocast(device, dtype)` eager PyTorch runs conv2d in the autocast dtype. The
fused block does the same: an Autocast kernel on each forward operator casts its
floating-point inputs (x and the weights; float64 excluded, as autocast does) to the
dtype the *current* autocast context names, then runs the op with autocast off. The
kernels accumulate in float32 whatever their input dtype, and keep every intermediate
(a, b1, b, the pointwise sums) in float32, where eager autocast rounds each of them to the
autocast dtype.

torch.library.register_autocast would fix one cast dtype per device at registration; an
autocast context may name bfloat16 or float16, so the kernel below reads it per call.
Like register_autocast, it registers the kernel with the dispatcher (eager) and as a
py_impl of the op (what torch.compile's tracing dispatches to).

The backward ops need no Autocast kernel: autograd calls them with the tensors the
forward saved, which are already in the autocast dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

_DEVICES = ("cpu", "cuda")
_LIBS = []  # keep the registrations alive


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype an autocast context would run the block in for x, or None (no autocast
    on x's device, or x is not an eligible floating-point tensor)."""
    dev = x.device.type
    if dev not in _DEVICES or not torch.is_autocast_enabled(dev):
        return None
    if not x.is_floating_point() or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(dev)


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = (value.is_floating_point() and value.device.type == device_type
                    and value.dtype != torch.float64)
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def register(qualname: str) -> None:
    """Autocast kernels (CPU and CUDA) for the operator `qualname` ("msfused::name")."""
    ns, name = qualname.split("::")
    op = getattr(getattr(torch.ops, ns), name).default
    lib = torch.library.Library(ns, "IMPL")
    _LIBS.append(lib)
    for dev in _DEVICES:
        if not torch._C._is_autocast_available(dev):
            continue
        key_name = "Autocast" + torch._C._dispatch_key_for_device(dev)
        key = getattr(torch._C.DispatchKey, key_name)

        def run(*args, _dev=dev, _key=key):
            dtype = torch.get_autocast_dtype(_dev)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*_cast(args, _dev, dtype))

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(run)

        def kernel(_keyset, *args, _run=run):
            return _run(*args)

        lib.impl(name, kernel, key_name, with_keyset=True)
