"""The drop-in module: nn.Conv2d submodules hold the parameters (so state_dicts are those
of plain convolutions and move freely between backends); forward runs one fused op."""
from __future__ import annotations

import torch
from torch import nn

from .backends import resolve_backend
from .backends.registry import check_backend_name
from .config import needs_projection, out_channels
from .params import BlockParams
from .validation import check_block_inputs, check_bool, check_positive_int, make_config


class MultiScaleSeparableBlock(nn.Module):
    """Depthwise 3x3 || two stacked depthwise 3x3, each followed by a pointwise 1x1 to `n`
    channels, merged by concat (paper's method 1) or add (method 2), with an optional
    residual (identity, or a 1x1 projection when the shape changes). See SPEC section 1."""

    def __init__(self, in_channels: int, n: int, *, merge: str = "concat", stride: int = 1,
                 activation: str = "relu", residual: bool = True, bias: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        c = check_positive_int("in_channels", in_channels)
        n = check_positive_int("n", n)
        self.config = make_config(stride, merge, activation, residual)
        bias = check_bool("bias", bias)
        self.backend = check_backend_name(backend)
        self.in_channels, self.n = c, n
        self.merge, self.stride, self.activation = merge, stride, activation
        self.residual, self.bias = residual, bias
        self.out_channels = out_channels(n, self.config.merge)
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.dw_a = nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, **kw)
        self.dw_b = nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, **kw)
        self.dw_c = nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, **kw)
        self.pw_a = nn.Conv2d(c, n, 1, **kw)
        self.pw_b = nn.Conv2d(c, n, 1, **kw)
        if residual and needs_projection(c, self.out_channels, stride):
            self.shortcut = nn.Conv2d(c, self.out_channels, 1, stride=stride, **kw)
        else:
            self.shortcut = None

    def params(self) -> BlockParams:
        sc = self.shortcut
        return BlockParams(self.dw_a.weight, self.dw_a.bias, self.dw_b.weight, self.dw_b.bias,
                           self.dw_c.weight, self.dw_c.bias, self.pw_a.weight, self.pw_a.bias,
                           self.pw_b.weight, self.pw_b.bias,
                           None if sc is None else sc.weight, None if sc is None else sc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params()
        check_block_inputs(x, p, self.config)
        return resolve_backend(self.backend, x).forward(x, p, self.config)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, n={self.n}, out_channels={self.out_channels}, "
                f"merge={self.merge!r}, stride={self.stride}, activation={self.activation!r}, "
                f"residual={self.residual}, bias={self.bias}, backend={self.backend!r}")
