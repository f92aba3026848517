"""The block's parameters as one named tuple, in the order every operator schema uses."""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class BlockParams(NamedTuple):
    """Weights in nn.Conv2d shapes: depthwise (C,1,3,3), pointwise (N,C,1,1),
    projection (C_out,C,1,1). Biases are None when the block has bias=False; ws/bs are None
    when there is no projection shortcut."""

    wa: Tensor
    ba: Optional[Tensor]
    wb: Tensor
    bb: Optional[Tensor]
    wc: Tensor
    bc: Optional[Tensor]
    pa: Tensor
    qa: Optional[Tensor]
    pb: Tensor
    qb: Optional[Tensor]
    ws: Optional[Tensor] = None
    bs: Optional[Tensor] = None


# state_dict names of each field: (submodule, attribute)
PARAM_SOURCES = {
    "wa": ("dw_a", "weight"), "ba": ("dw_a", "bias"),
    "wb": ("dw_b", "weight"), "bb": ("dw_b", "bias"),
    "wc": ("dw_c", "weight"), "bc": ("dw_c", "bias"),
    "pa": ("pw_a", "weight"), "qa": ("pw_a", "bias"),
    "pb": ("pw_b", "weight"), "qb": ("pw_b", "bias"),
    "ws": ("shortcut", "weight"), "bs": ("shortcut", "bias"),
}
