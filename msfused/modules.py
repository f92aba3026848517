"""The drop-in module: nn.Conv2d submodules hold the parameters (so state_dicts are those
of plain convolutions and move freely between backends); forward runs one fused op."""
from __future__ import annotations

import torch
from torch import nn

from .backends.registry import check_backend_name, resolve_backend
from .config import check_bool, make_config, needs_projection, out_channels
from .params import BlockParams
from .validation import check_positive_int


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
        """The weights as the operators take them (nn.Conv2d shapes)."""
        mods = self._modules
        try:
            # the parameters' own dicts: what nn.Module.__getattr__ would find, without its
            # cost (~1 us a lookup; this is on every forward's path)
            da, db, dc = (mods["dw_a"]._parameters, mods["dw_b"]._parameters,
                          mods["dw_c"]._parameters)
            pa, pb = mods["pw_a"]._parameters, mods["pw_b"]._parameters
            sc = mods.get("shortcut")
            sp = None if sc is None else sc._parameters
            return BlockParams(da["weight"], da["bias"], db["weight"], db["bias"], dc["weight"],
                               dc["bias"], pa["weight"], pa["bias"], pb["weight"], pb["bias"],
                               None if sp is None else sp["weight"],
                               None if sp is None else sp["bias"])
        except KeyError:  # a parametrized or otherwise rebuilt conv: ordinary attributes
            return self._params_by_attribute()

    def _params_by_attribute(self) -> BlockParams:
        sc = self.shortcut
        return BlockParams(self.dw_a.weight, self.dw_a.bias, self.dw_b.weight, self.dw_b.bias,
                           self.dw_c.weight, self.dw_c.bias, self.pw_a.weight, self.pw_a.bias,
                           self.pw_b.weight, self.pw_b.bias,
                           None if sc is None else sc.weight, None if sc is None else sc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x and the weights are checked once, by the backend's operator (C++ for cpp/cuda)
        return resolve_backend(self.backend, x).run(x, self.params(), self.config)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, n={self.n}, out_channels={self.out_channels}, "
                f"merge={self.merge!r}, stride={self.stride}, activation={self.activation!r}, "
                f"residual={self.residual}, bias={self.bias}, backend={self.backend!r}")
