"""Input checking of SPEC section 4 for the paths written in Python: the reference
backend and the Triton operators (the C++/CUDA operators check their own arguments, once,
in csrc/block_args.cpp, with the same rules and messages), and the module's constructor
arguments.

Every failure is a ValueError (wrong value or shape) or TypeError (wrong type or dtype)
whose message names the argument, what was expected and what was given. Under autocast
on x's device, x and the weights may differ in floating dtype (the op casts them, as
autocast does for conv2d).
"""
from __future__ import annotations

import math
import numbers

import torch

from .activations import ACTIVATIONS, saves
from .config import BlockConfig, needs_projection, out_channels, out_size
from .layout import memory_format_of
from .ops.autocast import autocast_dtype
from .params import BlockParams

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(name: str, value) -> int:
    """A size argument (channels, n): an int >= 1; bools, floats, inf and NaN are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite positive int, got {value!r}")
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int (>= 1), got {value!r}")
    return int(value)


def _check_tensor(name: str, t, x: torch.Tensor, shape: tuple, autocast: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if autocast:  # the op's Autocast kernel casts x and the weights to one dtype
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype in {FLOAT_DTYPES}, got {t.dtype}")
    elif t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {t.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def check_block_inputs(x, p: BlockParams, cfg: BlockConfig) -> None:
    """Raise ValueError/TypeError for anything SPEC section 4 calls malformed."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor (B, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if any(s < 1 for s in x.shape):
        raise ValueError(f"x: expected every dimension >= 1 (B, C, H, W), got shape {tuple(x.shape)}")
    if not isinstance(p.wa, torch.Tensor) or p.wa.dim() != 4:
        raise ValueError("wa: expected a (C, 1, 3, 3) depthwise weight tensor, got "
                         f"{tuple(p.wa.shape) if isinstance(p.wa, torch.Tensor) else type(p.wa).__name__}")
    c = p.wa.shape[0]
    if x.shape[1] != c:
        raise ValueError(f"x: expected {c} channels (the weights' in_channels), got {x.shape[1]} "
                         f"in shape {tuple(x.shape)}")
    autocast = autocast_dtype(x) is not None
    if not isinstance(p.pa, torch.Tensor) or p.pa.dim() != 4:
        raise ValueError("pa: expected a (N, C, 1, 1) pointwise weight tensor")
    n = p.pa.shape[0]
    if n < 1:
        raise ValueError(f"pa: expected at least one output channel (N >= 1), got shape {tuple(p.pa.shape)}")
    c_out = out_channels(n, cfg.merge)
    for name in ("wa", "wb", "wc"):
        _check_tensor(name, getattr(p, name), x, (c, 1, 3, 3), autocast)
    for name in ("pa", "pb"):
        _check_tensor(name, getattr(p, name), x, (n, c, 1, 1), autocast)
    for name, size in (("ba", c), ("bb", c), ("bc", c), ("qa", n), ("qb", n)):
        if getattr(p, name) is not None:
            _check_tensor(name, getattr(p, name), x, (size,), autocast)
    projection = cfg.residual and needs_projection(c, c_out, cfg.stride)
    if projection:
        if p.ws is None:
            raise ValueError(f"ws: a residual block with stride {cfg.stride}, {c} in and {c_out} out "
                             f"channels needs a ({c_out}, {c}, 1, 1) projection weight, got None")
        _check_tensor("ws", p.ws, x, (c_out, c, 1, 1), autocast)
        if p.bs is not None:
            _check_tensor("bs", p.bs, x, (c_out,), autocast)
    elif p.ws is not None or p.bs is not None:
        why = "residual is off" if not cfg.residual else "the shortcut is the identity"
        raise ValueError(f"ws: expected None ({why}), got a tensor")


def check_op_config(stride, merge, act, residual) -> BlockConfig:
    """The schemas' integer arguments as a direct operator call passes them (codes, not
    names): the rules of csrc/block_args.cpp."""
    if stride not in (1, 2):
        raise ValueError(f"stride: expected 1 or 2, got {stride!r}")
    if merge not in (0, 1):
        raise ValueError(f"merge: expected 0 (concat) or 1 (add), got {merge!r}")
    if not (0 <= act < len(ACTIVATIONS)):
        codes = ", ".join(f"{i} {a}" for i, a in enumerate(ACTIVATIONS))
        raise ValueError(f"act: expected one of {codes}, got {act!r}")
    return BlockConfig(stride, merge, act, bool(residual))


def check_op_call(x, p: BlockParams, stride, merge, act, residual) -> BlockConfig:
    """Every argument of a direct call of a Python-defined operator (the Triton ones)."""
    cfg = check_op_config(stride, merge, act, residual)
    check_block_inputs(x, p, cfg)
    return cfg


def check_backward_inputs(grad_y, x, saved, p: BlockParams, stride, merge, act, residual):
    """grad_y (the output's shape, dtype, device) and saved (what the final activation's
    gradient reads: y, the pre-activation, or anything when it reads nothing), returned
    contiguous in x's memory format."""
    shape = (x.shape[0], out_channels(p.pa.shape[0], merge), out_size(x.shape[2], stride),
             out_size(x.shape[3], stride))
    fmt = memory_format_of(x)
    for name, t, need in (("grad_y", grad_y, True), ("saved", saved, saves(act) != "nothing")):
        if not need:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {t.device}")
    grad_y = grad_y.contiguous(memory_format=fmt)
    if saves(act) != "nothing":
        saved = saved.contiguous(memory_format=fmt)
    return grad_y, saved
