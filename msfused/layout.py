"""Memory-format helpers: the output keeps the input's memory format (SPEC section 2)."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is laid out NHWC. A tensor that is contiguous both ways (C == 1, or
    H == W == 1) counts as NCHW unless its strides say channels are innermost."""
    if x.is_contiguous():
        return x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1
    return x.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and is_channels_last(x):
        return torch.channels_last
    if x.dim() == 4 and not x.is_contiguous() and x.stride(1) == 1:
        return torch.channels_last  # a non-contiguous NHWC view (e.g. sliced)
    return torch.contiguous_format


def as_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return x.contiguous(memory_format=fmt)
