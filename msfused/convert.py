"""msfused.convert: move every MultiScaleSeparableBlock of a model to another backend."""
from __future__ import annotations

from torch import nn

from .backends.registry import BackendUnavailableError, check_backend_name, get_backend
from .modules import MultiScaleSeparableBlock


def convert(model: nn.Module, backend: str) -> nn.Module:
    """Set the backend of every MultiScaleSeparableBlock in `model` (in place) and return
    the model. Weights, devices and dtypes are not touched: the parameters are the
    blocks' nn.Conv2d weights whatever the backend (move the model with .to() yourself).

    A named backend that is not available here raises BackendUnavailableError now, with
    the reason, rather than at the first forward; "auto" is always accepted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    if backend != "auto":
        why = get_backend(backend).unavailable_reason
        if why is not None:
            raise BackendUnavailableError(f"backend {backend!r} is not available: {why}")
    for m in model.modules():
        if isinstance(m, MultiScaleSeparableBlock):
            m.backend = backend
    return model
