"""The block's configuration: merge names and codes, the validated static arguments of one
call (BlockConfig), and shape helpers.

The integer codes are part of the operator schemas (`merge`, `act` arguments of the
`msfused::*` ops), so the C++, CUDA and Triton kernels all read the same numbers:
merges here (csrc/block_desc.h enum Merge), activations in msfused/activations.py.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field

from .activations import ACTIVATIONS, act_code, apply_act  # noqa: F401  (re-exported)

MERGES = ("concat", "add")  # code = index
MERGE_CONCAT, MERGE_ADD = 0, 1


def merge_code(merge) -> int:
    if not isinstance(merge, str):
        raise TypeError(f"merge: expected one of {MERGES}, got {type(merge).__name__} {merge!r}")
    if merge not in MERGES:
        raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
    return MERGES.index(merge)


def check_stride(stride) -> int:
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral):
        raise TypeError(f"stride: expected int 1 or 2, got {type(stride).__name__} {stride!r}")
    if stride not in (1, 2):
        raise ValueError(f"stride: expected 1 or 2, got {stride!r}")
    return int(stride)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected bool, got {type(value).__name__} {value!r}")
    return value


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
    act: int  # activation code (msfused.activations)
    residual: bool
    # the schemas' trailing (stride, merge, act, residual) arguments, built once
    op_args: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "op_args", (self.stride, self.merge, self.act, self.residual))

    @property
    def merge_name(self) -> str:
        return MERGES[self.merge]

    @property
    def act_name(self) -> str:
        return ACTIVATIONS[self.act]


def _make_config(stride, merge, activation, residual) -> BlockConfig:
    return BlockConfig(stride=check_stride(stride), merge=merge_code(merge),
                       act=act_code(activation), residual=check_bool("residual", residual))


_cached_config = functools.lru_cache(maxsize=256, typed=True)(_make_config)


def make_config(stride, merge, activation, residual) -> BlockConfig:
    """BlockConfig from the user-facing names, or a ValueError/TypeError naming the
    argument. Cached by value and type (1 and 1.0 and True are different keys)."""
    try:
        return _cached_config(stride, merge, activation, residual)
    except TypeError:  # an unhashable argument (or a wrong type): the checks say which
        return _make_config(stride, merge, activation, residual)
