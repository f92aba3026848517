"""The normalisation layers fuse_model folds into the conv before them, in the spellings of
common model libraries, each reduced to one affine map per channel (scale, shift) and the
activation the layer applies after it, if any:

| layer | library | activation inside |
|---|---|---|
| `nn.BatchNorm2d` (eval mode, running statistics) | PyTorch | none |
| `BatchNormAct2d`, `FrozenBatchNormAct2d` (eval mode; drop layer an Identity) | timm | its `act` |
| `FrozenBatchNorm2d` | torchvision (detection backbones) | none |

torchvision's `Conv2dNormActivation` and timm's `ConvNormAct` need nothing of their own:
the first is a Sequential of a conv, a norm and an activation module, the second a module
whose forward calls its conv and then its norm, and the fx tracer sees those calls. The
norms listed here are leaves of that trace, recognised by class (library and name), so
a look-alike class of another library is never folded by accident.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .activations import TABLE as ACTIVATION_TABLE


@dataclass(frozen=True)
class NormInfo:
    """y = act(x * scale + shift), per channel (float64), for a norm of `num_features`."""

    num_features: int
    scale: torch.Tensor
    shift: torch.Tensor
    activation: str  # "none" when the layer applies none


# (module path prefix, class name) of the library norm layers with an activation inside
_TIMM_NORM_ACT = {("timm.", "BatchNormAct2d"), ("timm.", "FrozenBatchNormAct2d")}
_TORCHVISION_FROZEN = ("torchvision.", "FrozenBatchNorm2d")


def _is(m: nn.Module, spec: Tuple[str, str]) -> bool:
    cls = type(m)
    return cls.__name__ == spec[1] and cls.__module__.startswith(spec[0])


def is_norm_leaf(m: nn.Module) -> bool:
    """A library norm layer that the fx tracer should keep as one call (not trace into)."""
    return any(_is(m, s) for s in _TIMM_NORM_ACT) or _is(m, _TORCHVISION_FROZEN)


def _affine(weight, bias, mean, var, eps) -> Tuple[torch.Tensor, torch.Tensor]:
    scale = torch.rsqrt(var.detach().double() + eps)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -mean.detach().double() * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def _activation_name(m: nn.Module) -> Optional[str]:
    if type(m) is nn.Identity:
        return "none"
    for act in ACTIVATION_TABLE:
        if type(m) in act.modules and act.module_check(m):
            return act.name
    return None


def norm_info(m: nn.Module) -> Optional[NormInfo]:
    """What the norm computes, or None when it is not a layer fuse_model folds (another
    class, training mode, no running statistics, hooks, an activation or drop layer
    outside the block's)."""
    if m._forward_hooks or m._forward_pre_hooks:
        return None
    if type(m) is nn.BatchNorm2d or any(_is(m, s) for s in _TIMM_NORM_ACT):
        frozen = type(m).__name__.startswith("Frozen")
        if (m.training and not frozen) or m.running_mean is None or m.running_var is None:
            return None
        act = "none"
        if type(m) is not nn.BatchNorm2d:
            act = _activation_name(getattr(m, "act", nn.Identity()))
            if act is None or type(getattr(m, "drop", nn.Identity())) is not nn.Identity:
                return None
        scale, shift = _affine(m.weight, m.bias, m.running_mean, m.running_var, m.eps)
        return NormInfo(m.running_mean.numel(), scale, shift, act)
    if _is(m, _TORCHVISION_FROZEN):
        scale, shift = _affine(m.weight, m.bias, m.running_mean, m.running_var, m.eps)
        return NormInfo(scale.numel(), scale, shift, "none")
    return None
