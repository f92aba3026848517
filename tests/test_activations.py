"""The activation tables agree: Python's (msfused.activations), the C++/CUDA one
(csrc/activations.h, read through the extension's _activation_table/_activation_eval
operators) and the Triton kernels' (_act, _act_grad); and every one of them computes what
torch.nn.functional and its autograd compute, NaN, inf and PyTorch's conventions at the kinks
included."""
import pytest
import torch

import msfused
from msfused import activations as A
from conftest import require


def _points():
    special = [-float("inf"), -7.0, -6.0, -1.0, -1e-3, -0.0, 0.0, 1e-3, 1.0, 5.999, 6.0,
               6.001, 7.0, float("inf"), float("nan")]
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.tensor(special, dtype=torch.float64),
                   torch.randn(64, generator=g, dtype=torch.float64) * 4])
    return v, torch.randn(v.shape, generator=g, dtype=torch.float64)


def _autograd(act, v, g):
    vv = v.clone().requires_grad_(True)
    y = act.fn(vv)
    (d,) = torch.autograd.grad(y, vv, g) if y.requires_grad else (g.clone(),)
    return y.detach(), d


def _defined(v, a, name):
    """a where PyTorch itself is consistent: its CPU hardtanh_backward (relu6) gives 0 or g
    at a NaN input depending on whether the element falls in a vector or the scalar tail,
    so relu6's gradient at NaN (ours: g, as for relu) is not compared with autograd's."""
    return torch.where(v.isnan(), torch.zeros_like(a), a) if name == "relu6" else a


def _same(a, b, exact=True):
    if exact:
        return torch.equal(torch.nan_to_num(a, nan=1234.5), torch.nan_to_num(b, nan=1234.5))
    return torch.allclose(a, b, rtol=1e-12, atol=1e-300, equal_nan=True)


def test_codes_are_table_positions():
    assert A.ACTIVATIONS == tuple(a.name for a in A.TABLE)
    for i, a in enumerate(A.TABLE):
        assert a.code == i and A.act_code(a.name) == i and A.by_code(i) is a
        assert a.saves in A.SAVES


@pytest.mark.parametrize("name", A.ACTIVATIONS)
def test_python_row_matches_torch_autograd(name):
    """fn is torch.nn.functional's; grad(g, v) is its autograd's, from the pre-activation
    and (for activations that save the output) equally from the output."""
    act = A.BY_NAME[name]
    v, g = _points()
    y, d = _autograd(act, v, g)
    d = _defined(v, d, name)
    exact = name != "silu"  # silu's derivative: the same formula, another rounding order
    assert _same(_defined(v, act.grad(g, v), name), d, exact)
    if act.saves == "output":
        assert _same(_defined(v, act.grad(g, y), name), d, exact)
    got = A.grad_from_saved(act.code, g, A.saved_for_backward(act.code, y, v))
    assert _same(_defined(v, got, name), d, exact)


def test_cpp_table_matches_python():
    require("cpp")
    rows = [r.split(":") for r in torch.ops.msfused._activation_table().split(";") if r]
    assert [(n, int(c), int(s)) for n, c, s in rows] == \
        [(a.name, a.code, A.SAVES.index(a.saves)) for a in A.TABLE]


@pytest.mark.parametrize("name", A.ACTIVATIONS)
def test_cpp_values_and_gradients_match_python(name):
    require("cpp")
    act = A.BY_NAME[name]
    v, g = _points()
    f, d = torch.ops.msfused._activation_eval(v, g, act.code)
    assert _same(d, act.grad(g, v), name != "silu")  # NaN included
    y, dref = _autograd(act, v, g)
    exact = name != "silu"
    assert _same(f, y, exact) and _same(_defined(v, d, name), _defined(v, dref, name), exact)
    if act.saves == "output":  # the kernels differentiate these from the saved output
        _, d_out = torch.ops.msfused._activation_eval(y, g, act.code)
        assert _same(d_out, d)


def test_cpp_refuses_an_unknown_code():
    require("cpp")
    v = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="act: expected one of 0 none, 1 relu"):
        torch.ops.msfused._activation_eval(v, v, len(A.TABLE))


if msfused.available_backends()["triton"].available:
    import triton
    import triton.language as tl

    from msfused.ops.triton_kernels import _act, _act_grad

    @triton.jit
    def _triton_eval(v_ptr, g_ptr, f_ptr, d_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(v_ptr + offs, mask=m)
        g = tl.load(g_ptr + offs, mask=m)
        tl.store(f_ptr + offs, _act(v, ACT), mask=m)
        tl.store(d_ptr + offs, _act_grad(g, v, ACT), mask=m)
else:
    _triton_eval = None  # require("triton") skips the test first


@pytest.mark.parametrize("name", A.ACTIVATIONS)
def test_triton_helpers_match_python(name):
    dev = require("triton")
    act = A.BY_NAME[name]
    v, g = _points()
    v32, g32 = v.float().to(dev), g.float().to(dev)
    f, d = torch.empty_like(v32), torch.empty_like(v32)
    _triton_eval[(1,)](v32, g32, f, d, v32.numel(), ACT=act.code, BLOCK=128)
    vd, gd = v32.cpu().double(), g32.cpu().double()
    tol = dict(rtol=1e-6, atol=1e-30, equal_nan=True)
    assert torch.allclose(f.cpu().double(), act.fn(vd), **tol)
    assert torch.allclose(d.cpu().double(), act.grad(gd, vd), **tol)  # NaN included
