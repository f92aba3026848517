"""fuse_model on blocks written with model libraries' conv-norm-activation layers
(torchvision's Conv2dNormActivation, timm's ConvNormAct with BatchNormAct2d), and on
library models that have no such block (they come out untouched). Needs the `models`
extra (timm, which brings torchvision)."""
import copy

import pytest
import torch
from torch import nn

import msfused
from conftest import require

tv_ops = pytest.importorskip("torchvision.ops")
timm = pytest.importorskip("timm")
from timm.layers import ConvNormAct  # noqa: E402


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randomise_norms(model):
    """Running statistics and affine parameters away from their defaults, so that folding
    them is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model.eval()


class TorchvisionBlock(nn.Module):
    """The block from torchvision's Conv2dNormActivation layers (conv, BatchNorm2d, act)."""

    def __init__(self, c, n, act=nn.ReLU, stride=1):
        super().__init__()
        dw = lambda s, a: tv_ops.Conv2dNormActivation(  # noqa: E731
            c, c, 3, stride=s, groups=c, activation_layer=a)
        pw = lambda co: tv_ops.Conv2dNormActivation(c, co, 1, activation_layer=None)  # noqa: E731
        self.a, self.b1, self.b2 = dw(stride, act), dw(stride, act), dw(1, act)
        self.pa, self.pb = pw(n), pw(n)
        self.proj = pw(2 * n) if stride != 1 or 2 * n != c else None
        if self.proj is not None:
            self.proj[0].stride = (stride, stride)
        self.act = act()

    def forward(self, x):
        m = torch.cat([self.pa(self.a(x)), self.pb(self.b2(self.b1(x)))], dim=1)
        return self.act(m + (x if self.proj is None else self.proj(x)))


class TimmBlock(nn.Module):
    """The block from timm's ConvNormAct layers (the activation inside BatchNormAct2d),
    merge add, a ReLU6 module at the end."""

    def __init__(self, c, n, act="relu6"):
        super().__init__()
        dw = lambda: ConvNormAct(c, c, 3, padding=1, groups=c, act_layer=act)  # noqa: E731
        pw = lambda: ConvNormAct(c, n, 1, apply_act=False)  # noqa: E731
        self.a, self.b1, self.b2, self.pa, self.pb = dw(), dw(), dw(), pw(), pw()
        self.out = nn.ReLU6()

    def forward(self, x):
        return self.out(self.pa(self.a(x)) + self.pb(self.b2(self.b1(x))) + x)


@pytest.mark.parametrize("act,stride", [(nn.ReLU, 1), (nn.SiLU, 2), (nn.ReLU6, 1)])
def test_torchvision_conv_norm_activation_block(act, stride):
    require("cpp")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), TorchvisionBlock(8, 4, act, stride))
    model = _randomise_norms(model)
    x = torch.randn(2, 3, 9, 7)
    y0 = model(x)
    fused, report = msfused.fuse_model(copy.deepcopy(model), backend="cpp", report=True)
    assert [s.path for s in report.swaps] == ["1"], str(report)
    n_convs = 5 if model[1].proj is None else 6  # and the projection, where there is one
    assert len(report.swaps[0].folded_batchnorm) == n_convs
    assert isinstance(fused[1], msfused.MultiScaleSeparableBlock)
    assert _rel(fused(x), y0) < 1e-5


@pytest.mark.parametrize("act", ["relu6", "relu", "silu"])
def test_timm_conv_norm_act_block(act):
    require("cpp")
    torch.manual_seed(0)
    blk = TimmBlock(6, 6, act)
    blk.out = {"relu6": nn.ReLU6, "relu": nn.ReLU, "silu": nn.SiLU}[act]()
    model = _randomise_norms(nn.Sequential(blk, nn.AdaptiveAvgPool2d(1)))
    x = torch.randn(2, 6, 8, 8)
    y0 = model(x)
    fused, report = msfused.fuse_model(copy.deepcopy(model), backend="cpp", report=True)
    assert [s.path for s in report.swaps] == ["0"], str(report)
    b = fused[0]
    assert isinstance(b, msfused.MultiScaleSeparableBlock) and b.activation == act
    assert b.merge == "add" and b.residual
    assert _rel(fused(x), y0) < 1e-5


def test_timm_block_in_training_mode_is_left_alone():
    model = TimmBlock(6, 6).train()
    fused, report = msfused.fuse_model(copy.deepcopy(model), report=True)
    assert report.swaps == [] and type(fused) is TimmBlock


def test_timm_block_with_another_activation_inside_is_left_alone():
    """The norms' activation must be the block's: GELU is not one of them."""
    model = _randomise_norms(TimmBlock(6, 6, act="gelu"))
    fused, report = msfused.fuse_model(copy.deepcopy(model), report=True)
    assert report.swaps == []


@pytest.mark.parametrize("name", ["mobilenetv2_050", "efficientnet_b0", "ghostnet_050",
                                  "mixnet_s"])
def test_library_models_without_the_block_are_untouched(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    y0 = model(x)
    keys = list(model.state_dict())
    types = [type(m) for m in model.modules()]
    fused, report = msfused.fuse_model(model, report=True)
    assert report.swaps == [] and fused is model
    assert list(fused.state_dict()) == keys and [type(m) for m in fused.modules()] == types
    assert torch.equal(fused(x), y0)


def test_torchvision_model_without_the_block_is_untouched():
    tvm = pytest.importorskip("torchvision.models")
    model = tvm.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    y0 = model(x)
    fused, report = msfused.fuse_model(model, report=True)
    assert report.swaps == [] and fused is model and torch.equal(fused(x), y0)
