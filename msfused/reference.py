"""The oracle: SPEC section 1 written with torch.nn.functional, nothing fused.

Works on any device and dtype torch.nn.functional.conv2d supports (float64 included), and
is differentiable by ordinary autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import MERGE_CONCAT, BlockConfig, apply_act
from .layout import memory_format_of
from .params import BlockParams


def block_preactivation(x: torch.Tensor, p: BlockParams, cfg: BlockConfig) -> torch.Tensor:
    """The block up to its final activation (m, plus the shortcut with a residual): what
    the kernels save for silu, and what the CUDA tools differentiate with their own act'."""
    c = x.shape[1]
    s, act = cfg.stride, cfg.act
    a = apply_act(F.conv2d(x, p.wa, p.ba, stride=s, padding=1, groups=c), act)
    b1 = apply_act(F.conv2d(x, p.wb, p.bb, stride=s, padding=1, groups=c), act)
    b = apply_act(F.conv2d(b1, p.wc, p.bc, stride=1, padding=1, groups=c), act)
    pa = F.conv2d(a, p.pa, p.qa)
    pb = F.conv2d(b, p.pb, p.qb)
    m = torch.cat([pa, pb], dim=1) if cfg.merge == MERGE_CONCAT else pa + pb
    if cfg.residual:
        m = m + (x if p.ws is None else F.conv2d(x, p.ws, p.bs, stride=s))
    return m


def block_reference(x: torch.Tensor, p: BlockParams, cfg: BlockConfig) -> torch.Tensor:
    y = apply_act(block_preactivation(x, p, cfg), cfg.act)
    return y.contiguous(memory_format=memory_format_of(x))
