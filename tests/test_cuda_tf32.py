"""float32 on the CUDA backend with TF32 allowed (torch.backends.cudnn.allow_tf32, eager's
convolutions' flag, on by default in PyTorch; the suite turns it off for its float32
comparisons): the forward and the backward run their pointwise GEMMs on TF32 tensor cores.
Checked against float64 at TF32's precision (the backward: every gradient at most twice eager
PyTorch's TF32 error) and against the same call with TF32 off (FMA kernels), which must
differ: otherwise the TF32 path did not run. Needs a GPU (the CPU emulator's version of these
checks: tests/test_cuda_emu.py::test_tf32_forward, ::test_tf32_backward)."""
import pytest
import torch

import msfused
from conftest import require

TF32_TOL = 3e-3  # a few units of TF32's 10-bit mantissa; indexing errors are O(1)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture
def tf32_on():
    require("cuda")  # a GPU but no CUDA kernels built (no nvcc at install): skip with why
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("c,n,h,w,merge,stride,cl", [
    (64, 64, 28, 28, "add", 1, True), (20, 70, 11, 10, "concat", 2, True),
    (32, 32, 16, 16, "concat", 1, False), (256, 128, 7, 7, "add", 2, True)])
def test_tf32_forward(tf32_on, c, n, h, w, merge, stride, cl):
    torch.manual_seed(0)
    m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride, backend="cuda",
                                         device="cuda")
    ref = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride,
                                           backend="reference", device="cuda",
                                           dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(2, c, h, w, device="cuda")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = m(x)
        y64 = ref(x.double())
        torch.backends.cudnn.allow_tf32 = False
        y_fma = m(x)
        torch.backends.cudnn.allow_tf32 = True
    err = ((y.double() - y64).norm() / y64.norm()).item()
    assert err < TF32_TOL, err
    assert not torch.equal(y, y_fma), "TF32 allowed but the FMA kernel's result came back"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("c,n,h,w,merge,stride,cl", [
    (64, 64, 28, 28, "add", 1, True), (20, 70, 11, 10, "concat", 2, True),
    (32, 32, 16, 16, "concat", 1, False)])
def test_tf32_backward(tf32_on, c, n, h, w, merge, stride, cl):
    """activation none: no relu masks that TF32's rounding of y can flip, so every gradient is
    comparable element for element."""
    torch.manual_seed(0)
    kw = dict(merge=merge, stride=stride, activation="none", device="cuda")
    m = msfused.MultiScaleSeparableBlock(c, n, backend="cuda", **kw)
    eager = msfused.MultiScaleSeparableBlock(c, n, backend="reference", **kw)
    ref = msfused.MultiScaleSeparableBlock(c, n, backend="reference", dtype=torch.float64, **kw)
    eager.load_state_dict(m.state_dict())
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(2, c, h, w, device="cuda")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)

    def grads(mod, xx, gy):
        xx = xx.detach().requires_grad_(True)
        mod.zero_grad(set_to_none=True)
        mod(xx).backward(gy)
        return [xx.grad] + [p.grad for p in mod.parameters()]

    gy = torch.randn_like(m(x))
    g = grads(m, x, gy)
    ge = grads(eager, x, gy)
    g64 = grads(ref, x.double(), gy.double())
    torch.backends.cudnn.allow_tf32 = False
    g_fma = grads(m, x, gy)
    torch.backends.cudnn.allow_tf32 = True
    floor = 2.0 ** -10 / 10
    for i, (a, e, r) in enumerate(zip(g, ge, g64)):
        assert _rel(a, r) <= 2 * _rel(e, r) + floor, (i, _rel(a, r), _rel(e, r))
    assert any(not torch.equal(a, b) for a, b in zip(g, g_fma)), \
        "TF32 allowed but the FMA backward's gradients came back"
