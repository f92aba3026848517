"""The block's activations: one row each, for every Python part of msfused.

A row holds the activation's name and integer code (the operators' `act` argument), the
function as torch.nn.functional computes it, its gradient, what the fused backward saves to
compute that gradient, and the spellings `fuse_model` recognises in a traced model. The
C++ and CUDA kernels read the same codes from csrc/activations.h (one X-macro row each);
the Triton kernels implement them in msfused/ops/triton_kernels.py (`_act`, `_act_grad`);
tests/test_activations.py checks that all three agree. Adding an activation is one row
here, one row (and an ActOp) there, and one branch in each Triton helper.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# What the fused backward reads to differentiate the final activation; the index is the
# C++ ActSaves code.
SAVES = ("nothing", "output", "preact")

ArgCheck = Optional[Callable[[tuple, dict], bool]]


@dataclass(frozen=True)
class Activation:
    name: str
    # torch.nn.functional's form
    fn: Callable[[Tensor], Tensor]
    # g * act'(v), where v is what `saves` names: the pre-activation, or the output (for
    # relu and relu6 both give the same value). PyTorch's select forms (threshold_backward,
    # hardtanh_backward): 0 where the unit is off (relu's 0, relu6's 0 and 6 included), g
    # elsewhere (also where v is NaN).
    grad: Callable[[Tensor, Tensor], Tensor]
    saves: str
    # fuse_model: the module types that apply it (with a check of their settings), the
    # functions (each with an optional check of its positional and keyword arguments) and
    # the Tensor methods.
    modules: Tuple[type, ...] = ()
    module_check: Callable[[nn.Module], bool] = field(default=lambda m: True)
    functions: Dict[Callable, ArgCheck] = field(default_factory=dict)
    methods: Tuple[str, ...] = ()

    @property
    def code(self) -> int:
        return ACTIVATIONS.index(self.name)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _clamps_0_6(args: tuple, kwargs: dict) -> bool:
    """F.hardtanh(x, 0, 6) is relu6."""
    return _arg(args, kwargs, 1, "min_val", -1.0) == 0.0 and _arg(args, kwargs, 2, "max_val", 1.0) == 6.0


def _silu_grad(g: Tensor, v: Tensor) -> Tensor:
    s = torch.sigmoid(v)
    return g * (s * (1 + v * (1 - s)))


TABLE: Tuple[Activation, ...] = (
    Activation("none", fn=lambda t: t, grad=lambda g, v: g, saves="nothing"),
    Activation("relu", fn=F.relu, grad=lambda g, v: torch.where(v <= 0, torch.zeros_like(g), g),
               saves="output", modules=(nn.ReLU,),
               functions={F.relu: None, torch.relu: None, F.relu_: None, torch.relu_: None},
               methods=("relu", "relu_")),
    Activation("relu6", fn=F.relu6,
               grad=lambda g, v: torch.where((v <= 0) | (v >= 6), torch.zeros_like(g), g),
               saves="output", modules=(nn.ReLU6, nn.Hardtanh),
               module_check=lambda m: m.min_val == 0.0 and m.max_val == 6.0,
               functions={F.relu6: None, F.hardtanh: _clamps_0_6}),
    Activation("silu", fn=F.silu, grad=_silu_grad, saves="preact", modules=(nn.SiLU,),
               functions={F.silu: None}),
)

ACTIVATIONS: Tuple[str, ...] = tuple(a.name for a in TABLE)  # code = index
BY_NAME: Dict[str, Activation] = {a.name: a for a in TABLE}


def by_code(code: int) -> Activation:
    return TABLE[code]


def act_code(activation) -> int:
    """The code of an activation name, or a ValueError/TypeError naming `activation`."""
    if not isinstance(activation, str):
        raise TypeError(
            f"activation: expected one of {ACTIVATIONS}, got {type(activation).__name__} {activation!r}")
    a = BY_NAME.get(activation)
    if a is None:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return a.code


def apply_act(t: Tensor, act: int) -> Tensor:
    """The block's activation by code, as torch.nn.functional computes it."""
    return TABLE[act].fn(t)


def saves(act: int) -> str:
    """What the fused backward reads for activation `act`: 'nothing', 'output' or 'preact'."""
    return TABLE[act].saves


def saved_for_backward(act: int, y: Tensor, pre: Tensor) -> Optional[Tensor]:
    """The tensor the fused backward reads for activation `act` (None when it reads none)."""
    kind = TABLE[act].saves
    return y if kind == "output" else (pre if kind == "preact" else None)


def grad_from_saved(act: int, g: Tensor, saved: Optional[Tensor]) -> Tensor:
    """g * act'(z), computed from what the forward saved (as the fused kernels do)."""
    if TABLE[act].saves == "nothing":
        return g
    return TABLE[act].grad(g, saved)
