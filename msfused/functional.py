"""Functional form of the block: the configuration from its names, the backend, the run
(the backend's operator checks x and the weights)."""
from __future__ import annotations

from typing import Optional

import torch

from .backends.registry import check_backend_name, resolve_backend
from .config import make_config
from .params import BlockParams


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
    return resolve_backend(check_backend_name(backend), x).run(x, params, cfg)


def backend_for(x: torch.Tensor, backend: str = "auto") -> Optional[str]:
    """The name of the backend that would run x."""
    return resolve_backend(check_backend_name(backend), x).name
