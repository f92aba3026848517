"""The block's configuration: names, integer codes shared with the kernels, and helpers.

The integer codes below are part of the operator schemas (`merge`, `act` arguments of the
`msfused::*` ops), so C++, CUDA and Triton kernels all read the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MERGES = ("concat", "add")  # code = index
ACTIVATIONS = ("none", "relu", "relu6", "silu")  # code = index

MERGE_CONCAT, MERGE_ADD = 0, 1
ACT_NONE, ACT_RELU, ACT_RELU6, ACT_SILU = 0, 1, 2, 3


def merge_code(merge: str) -> int:
    if not isinstance(merge, str):
        raise TypeError(f"merge: expected one of {MERGES}, got {type(merge).__name__} {merge!r}")
    if merge not in MERGES:
        raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
    return MERGES.index(merge)


def act_code(activation: str) -> int:
    if not isinstance(activation, str):
        raise TypeError(
            f"activation: expected one of {ACTIVATIONS}, got {type(activation).__name__} {activation!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return ACTIVATIONS.index(activation)


def apply_act(t: torch.Tensor, act: int) -> torch.Tensor:
    """The block's activation by code, as torch.nn.functional computes it."""
    if act == ACT_RELU:
        return F.relu(t)
    if act == ACT_RELU6:
        return F.relu6(t)
    if act == ACT_SILU:
        return F.silu(t)
    return t


def out_size(size: int, stride: int) -> int:
    """Output size of a 3x3 conv with padding 1 (and of the 1x1 projection with the same stride)."""
    return (size - 1) // stride + 1


def out_channels(n: int, merge: int) -> int:
    return 2 * n if merge == MERGE_CONCAT else n


def needs_projection(c_in: int, c_out: int, stride: int) -> bool:
    return stride != 1 or c_out != c_in


@dataclass(frozen=True)
class BlockConfig:
    """Static (non-tensor) arguments of one block call, validated."""

    stride: int
    merge: int  # MERGE_* code
    act: int  # ACT_* code
    residual: bool

    @property
    def merge_name(self) -> str:
        return MERGES[self.merge]

    @property
    def act_name(self) -> str:
        return ACTIVATIONS[self.act]
