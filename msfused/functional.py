"""Functional form of the block: validate once, pick the backend, run it."""
from __future__ import annotations

from typing import Optional

import torch

from .backends import resolve_backend
from .backends.registry import check_backend_name
from .params import BlockParams
from .validation import check_block_inputs, make_config


def multiscale_separable_block(
    x: torch.Tensor,
    params: BlockParams,
    *,
    stride: int = 1,
    merge: str = "concat",
    activation: str = "relu",
    residual: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """y = block(x) of SPEC section 1 with the given weights (nn.Conv2d shapes).

    `params` is a BlockParams (or a tuple in its order); `backend` is a name from
    msfused.available_backends() or "auto".
    """
    cfg = make_config(stride, merge, activation, residual)
    if not isinstance(params, BlockParams):
        params = BlockParams(*params)
    check_block_inputs(x, params, cfg)
    return resolve_backend(check_backend_name(backend), x).forward(x, params, cfg)


def backend_for(x: torch.Tensor, backend: str = "auto") -> Optional[str]:
    """The name of the backend that would run x."""
    return resolve_backend(check_backend_name(backend), x).name
