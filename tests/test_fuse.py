"""msfused.fuse_model and msfused.convert: hand-written blocks from nn.Conv2d are found
with torch.fx and swapped for MultiScaleSeparableBlock with the same weights; look-alikes
are left alone; the fused model compiles (fullgraph) and exports."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msfused
from conftest import require


def _dw(c, stride=1, **kw):
    return nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, **kw)


class HandBlock(nn.Module):
    """The block written by hand; `style` picks how activations and merges are spelled."""

    def __init__(self, c, n, merge="concat", stride=1, act="relu", residual=True,
                 bias=True, bn=False, style="module"):
        super().__init__()
        self.merge, self.residual, self.style, self.act_name = merge, residual, style, act
        c_out = 2 * n if merge == "concat" else n
        self.dw_a, self.dw_b, self.dw_c = _dw(c, stride, bias=bias), _dw(c, stride, bias=bias), _dw(c, bias=bias)
        self.pw_a, self.pw_b = nn.Conv2d(c, n, 1, bias=bias), nn.Conv2d(c, n, 1, bias=bias)
        self.proj = (nn.Conv2d(c, c_out, 1, stride=stride, bias=bias)
                     if residual and (stride != 1 or c_out != c) else None)
        self.bn = nn.ModuleDict({k: nn.BatchNorm2d(c if k.startswith("dw") else n)
                                 for k in ("dw_a", "dw_b", "dw_c", "pw_a", "pw_b")}) if bn else None
        self.act = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "silu": nn.SiLU(), "none": nn.Identity()}[act]

    def f(self, t):
        if self.act_name == "none":
            return t
        if self.style == "module":
            return self.act(t)
        return {"relu": F.relu, "relu6": F.relu6, "silu": F.silu}[self.act_name](t)

    def conv(self, name, t):
        t = getattr(self, name)(t)
        return self.bn[name](t) if self.bn is not None else t

    def forward(self, x):
        a = self.f(self.conv("dw_a", x))
        b = self.f(self.conv("dw_c", self.f(self.conv("dw_b", x))))
        pa, pb = self.conv("pw_a", a), self.conv("pw_b", b)
        m = torch.cat([pa, pb], dim=1) if self.merge == "concat" else pa + pb
        if self.residual:
            m = m + (x if self.proj is None else self.proj(x))
        return self.f(m)


class HandNet(nn.Module):
    """The acceptance model: stem conv, two hand-written blocks with identity shortcuts and
    concat merge, pooling, a linear head."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block1 = HandBlock(c, c // 2)
        self.block2 = HandBlock(c, c // 2, style="functional")
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.block2(self.block1(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InlineNet(nn.Module):
    """A block written inline in a larger forward (tensor-method relu, + merge, projection)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.d1, self.d2, self.d3 = _dw(6, 2), _dw(6, 2), _dw(6)
        self.p1, self.p2 = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)
        self.sc = nn.Conv2d(6, 4, 1, stride=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.p1(self.d1(x).relu()) + self.p2(self.d3(self.d2(x).relu()).relu())
        y = (y + self.sc(x)).relu()
        return self.head(y)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class _Fused:
    """fuse_model's (model, report) on a copy, with the report's fields at hand."""

    def __init__(self, model, report):
        self.model, self.report = model, report
        self.swaps, self.untraceable = report.swaps, report.untraceable

    def __str__(self):
        return str(self.report)


def _fused_copy(model, **kw):
    return _Fused(*msfused.fuse_model(copy.deepcopy(model), report=True, **kw))


def test_fuse_model_returns_the_model_and_logs_the_swaps(caplog):
    """`model = msfused.fuse_model(model)` is the line users write first: it returns the
    model (modified in place), and the swaps are in the log."""
    require("cpp")
    torch.manual_seed(0)
    model = HandNet().eval()
    x = torch.randn(2, 3, 11, 9)
    y0 = model(x)
    with caplog.at_level("INFO", logger="msfused.fuse"):
        fused = msfused.fuse_model(model, backend="cpp")
    assert fused is model and _rel(fused(x), y0) < 1e-5
    assert "2 block(s) swapped" in caplog.text and "block1" in caplog.text
    with pytest.raises(TypeError, match="report"):
        msfused.fuse_model(model, report="yes")


def test_acceptance_model_fused_compiled_exported():
    require("cpp")
    torch.manual_seed(0)
    model = HandNet().eval()
    x = torch.randn(2, 3, 11, 9)
    y0 = model(x)
    res = _fused_copy(model, backend="cpp")
    fused = res.model
    assert type(fused) is HandNet, "the root keeps its class"
    assert [s.path for s in res.swaps] == ["block1", "block2"], str(res)
    for name in ("block1", "block2"):
        blk = getattr(fused, name)
        assert isinstance(blk, msfused.MultiScaleSeparableBlock)
        assert (blk.merge, blk.residual, blk.shortcut, blk.backend) == ("concat", True, None, "cpp")
    y1 = fused(x)
    assert _rel(y1, y0) < 1e-4
    torch._dynamo.reset()
    yc = torch.compile(fused, fullgraph=True)(x)
    assert _rel(yc, y0) < 1e-4
    ep = torch.export.export(fused, (x,))
    ye = ep.module()(x)
    assert _rel(ye, y0) < 1e-4
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("msfused.block_forward" in o for o in ops), ops


@pytest.mark.parametrize("merge", ["concat", "add"])
@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "none"])
@pytest.mark.parametrize("stride,residual", [(1, True), (2, True), (1, False)])
@pytest.mark.parametrize("style", ["module", "functional"])
def test_every_config_is_found(merge, act, stride, residual, style):
    torch.manual_seed(1)
    c, n = 6, (3 if merge == "concat" else 6)  # identity shortcut at stride 1
    model = HandBlock(c, n, merge=merge, stride=stride, act=act, residual=residual, style=style)
    x = torch.randn(2, c, 7, 5, dtype=torch.float64)
    model = model.double()
    y0 = model(x)
    res = _fused_copy(model, backend="reference")
    blk = res.model
    assert isinstance(blk, msfused.MultiScaleSeparableBlock), str(res)
    assert (blk.merge, blk.stride, blk.activation, blk.residual) == (merge, stride, act, residual)
    assert (blk.shortcut is not None) == (residual and stride == 2)
    assert _rel(blk(x), y0) < 1e-12
    # and the gradients agree too: it computes the same function
    y0.sum().backward()
    blk(x).sum().backward()
    assert _rel(blk.dw_b.weight.grad, model.dw_b.weight.grad) < 1e-10


def test_inline_fragment_becomes_graph_module():
    torch.manual_seed(2)
    model = InlineNet()
    x = torch.randn(2, 3, 9, 7)
    y0 = model(x)
    res = _fused_copy(model)
    assert len(res.swaps) == 1, str(res)
    s = res.swaps[0]
    assert set(s.replaced) >= {"d1", "d2", "d3", "p1", "p2", "sc"}
    fused = res.model
    blocks = [m for m in fused.modules() if isinstance(m, msfused.MultiScaleSeparableBlock)]
    assert len(blocks) == 1 and blocks[0].merge == "add" and blocks[0].stride == 2
    assert blocks[0].shortcut is not None
    assert fused.stem is res.model.get_submodule("stem") and hasattr(fused, "head")
    assert _rel(fused(x), y0) < 1e-5


def test_batchnorm_folded_in_eval_left_in_training():
    torch.manual_seed(3)
    model = HandBlock(6, 3, bn=True)
    with torch.no_grad():  # non-trivial running statistics
        for bn in model.bn.values():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 6, 8, 8)
    model.eval()
    y0 = model(x)
    res = _fused_copy(model)
    assert isinstance(res.model, msfused.MultiScaleSeparableBlock), str(res)
    assert len(res.swaps[0].folded_batchnorm) == 5
    assert _rel(res.model(x), y0) < 1e-5
    assert not _fused_copy(model, fold_batchnorm=False).swaps
    model.train()
    assert not _fused_copy(model).swaps  # training-mode BatchNorm: not foldable


def test_bias_free_convs_give_bias_free_block():
    model = HandBlock(4, 2, bias=False)
    res = _fused_copy(model)
    assert res.model.bias is False and res.model.dw_a.bias is None


class _LookAlike(HandBlock):
    def __init__(self, change):
        super().__init__(6, 3)
        if change == "kernel5":
            self.dw_a = nn.Conv2d(6, 6, 5, padding=2, groups=6)
        elif change == "dilation":
            self.dw_b = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6)
        elif change == "groups":
            self.dw_c = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        elif change == "padding":
            self.dw_a = nn.Conv2d(6, 6, 3, padding=0, groups=6)
        elif change == "padding_mode":
            self.dw_b = nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect")
        elif change == "pw_kernel3":
            self.pw_a = nn.Conv2d(6, 3, 3, padding=1)
        elif change == "hook":
            self.pw_b.register_forward_hook(lambda m, i, o: None)
        self.change = change

    def forward(self, x):
        if self.change != "mixed_act":
            return super().forward(x)
        # relu inside the branches, relu6 at the end: not one activation
        a = F.relu(self.dw_a(x))
        b = F.relu(self.dw_c(F.relu(self.dw_b(x))))
        return F.relu6(torch.cat([self.pw_a(a), self.pw_b(b)], 1) + x)


@pytest.mark.parametrize("change", ["kernel5", "dilation", "groups", "padding", "padding_mode",
                                    "pw_kernel3", "hook", "mixed_act"])
def test_look_alikes_left_alone(change):
    model = _LookAlike(change)
    res = _fused_copy(model)
    assert res.swaps == [], str(res)
    assert res.model is not None and not any(
        isinstance(m, msfused.MultiScaleSeparableBlock) for m in res.model.modules())


class _Leaky(HandBlock):
    """The branch output is used outside the block too: it cannot be fused away."""

    def forward(self, x):
        a = F.relu(self.dw_a(x))
        b = F.relu(self.dw_c(F.relu(self.dw_b(x))))
        y = F.relu(torch.cat([self.pw_a(a), self.pw_b(b)], 1) + x)
        return y, a


def test_intermediate_used_elsewhere_left_alone():
    assert _fused_copy(_Leaky(6, 3)).swaps == []


def test_swapped_order_concat_left_alone():
    class Swapped(HandBlock):
        def forward(self, x):
            a = F.relu(self.dw_a(x))
            b = F.relu(self.dw_c(F.relu(self.dw_b(x))))
            return F.relu(torch.cat([self.pw_b(b), self.pw_a(a)], 1) + x)

    # cat([long, short]) orders channels differently from the block (pa first)
    assert _fused_copy(Swapped(6, 3)).swaps == []


def test_untraceable_module_reported_and_untouched():
    class Dynamic(HandBlock):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return super().forward(x)
            return x

    res = _fused_copy(nn.Sequential(Dynamic(6, 3)))
    assert res.swaps == [] and res.untraceable and res.untraceable[0][0] == "0"


def test_fuse_model_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        msfused.fuse_model("not a model")
    with pytest.raises(ValueError, match="backend"):
        msfused.fuse_model(nn.Identity(), backend="nope")


def test_convert_moves_every_block_and_keeps_weights():
    require("cpp")
    torch.manual_seed(4)
    model = nn.Sequential(msfused.MultiScaleSeparableBlock(4, 2, backend="reference"),
                          msfused.MultiScaleSeparableBlock(4, 2, merge="add", stride=2,
                                                           backend="reference"))
    x = torch.randn(2, 4, 7, 7)
    y0 = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = msfused.convert(model, "cpp")
    assert out is model and all(m.backend == "cpp" for m in model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    assert _rel(model(x), y0) < 1e-5
    with pytest.raises(ValueError, match="backend"):
        msfused.convert(model, "nope")
    if not msfused.available_backends()["cuda"].available:
        with pytest.raises(msfused.BackendUnavailableError, match="cuda"):
            msfused.convert(model, "cuda")
    assert all(m.backend == "cpp" for m in model)


class SeqStyleBlock(nn.Module):
    """torchvision style: each conv in an nn.Sequential with its BatchNorm and an in-place
    ReLU; add merge, stride 2, projection shortcut with its own BatchNorm."""

    def __init__(self, c=6, n=5):
        super().__init__()

        def cba(conv, act=True):
            layers = [conv, nn.BatchNorm2d(conv.out_channels)]
            return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if act else []))

        self.a = cba(nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False))
        self.b1 = cba(nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False))
        self.b2 = cba(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False))
        self.pa = cba(nn.Conv2d(c, n, 1, bias=False), act=False)
        self.pb = cba(nn.Conv2d(c, n, 1, bias=False), act=False)
        self.short = cba(nn.Conv2d(c, n, 1, 2, bias=False), act=False)
        self.out = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.out(self.pa(self.a(x)) + self.pb(self.b2(self.b1(x))) + self.short(x))


def test_sequential_conv_bn_act_style():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), SeqStyleBlock(), nn.Flatten())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(2, 3, 9, 8)
    y0 = model(x)
    res = _fused_copy(model)
    assert type(res.model) is nn.Sequential and [s.path for s in res.swaps] == ["1"], str(res)
    blk = res.model[1]
    assert isinstance(blk, msfused.MultiScaleSeparableBlock)
    assert (blk.merge, blk.stride, blk.bias) == ("add", 2, True) and blk.shortcut is not None
    assert len(res.swaps[0].folded_batchnorm) == 6
    assert _rel(res.model(x), y0) < 1e-5
