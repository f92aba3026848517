"""Autocast: inside torch.autocast the fused ops run in the autocast dtype (float32
accumulation) and match eager autocast under the tolerance policy: the error against a
float64 reference at most 2x eager autocast's (plus eps/10), output and every gradient.
CPU bfloat16 everywhere; CUDA bfloat16 and float16 where a GPU is visible."""
import pytest
import torch

import msfused  # noqa: F401 - registers torch.ops.msfused

from blockutil import make_block, rel_err
from conftest import backend_device, require

CASES = [("concat", "relu", True, 1), ("add", "silu", True, 2), ("concat", "relu6", False, 2)]


def _autocast_dtypes(dev):
    return [torch.bfloat16] if dev == "cpu" else [torch.bfloat16, torch.float16]


def _run(m, x, gy, dev, dtype):
    x = x.detach().clone().requires_grad_(True)
    for p in m.parameters():
        p.grad = None
    if dtype is None:
        y = m(x)
    else:
        with torch.autocast(dev, dtype=dtype):
            y = m(x)
    y.backward(gy.to(y.dtype))  # backward outside the context, as in a training loop
    return y, {"dx": x.grad, **{k: p.grad for k, p in m.named_parameters()}}


@pytest.mark.parametrize("merge,act,residual,stride", CASES,
                         ids=[f"{m}-{a}-{'res' if r else 'nores'}-s{s}" for m, a, r, s in CASES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_autocast_policy(fused_backend, merge, act, residual, stride, channels_last):
    dev = backend_device(fused_backend)
    kw = dict(merge=merge, stride=stride, activation=act, residual=residual)
    c, n = 16, 8
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(2, c, 7, 6, generator=g, dtype=torch.float64)
    ref64 = make_block(c, n, dtype=torch.float64, **kw)
    gy64 = torch.randn(ref64(x64).shape, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.float().to(dev).contiguous(memory_format=fmt)
    gy = gy64.float().to(dev).contiguous(memory_format=fmt)
    y64, g64 = _run(ref64, x64, gy64, "cpu", None)
    for dtype in _autocast_dtypes(dev):
        eager = make_block(c, n, device=dev, **kw)  # float32 weights, as autocast expects
        fused = make_block(c, n, backend=fused_backend, device=dev, **kw)
        ye, ge = _run(eager, x, gy, dev, dtype)
        yf, gf = _run(fused, x, gy, dev, dtype)
        # the op ran in the autocast dtype (eager's output is float32 when the identity
        # residual adds the float32 x after the convolutions; the fused op's is not)
        assert yf.dtype == dtype, yf.dtype
        assert yf.is_contiguous(memory_format=fmt)
        floor = torch.finfo(dtype).eps / 10
        # the policy compares errors in one dtype: eager's output as the op returns it
        err_e, err_f = rel_err(ye.to(dtype), y64), rel_err(yf, y64)
        assert err_f <= 2 * err_e + floor, f"y {dtype}: fused {err_f:.3g} vs eager {err_e:.3g}"
        for k, r in g64.items():
            assert gf[k].dtype == torch.float32, k  # gradients reach the float32 weights
            err_e, err_f = rel_err(ge[k], r), rel_err(gf[k], r)
            assert err_f <= 2 * err_e + floor, f"{k} {dtype}: fused {err_f:.3g} vs eager {err_e:.3g}"


def test_autocast_accepts_lower_precision_input_with_float32_weights(fused_backend):
    """Inside a model under autocast the previous layer hands over a bfloat16 tensor while
    the block's weights are float32; like conv2d, the block takes it."""
    dev = backend_device(fused_backend)
    m = make_block(8, 4, backend=fused_backend, device=dev)
    x = torch.randn(2, 8, 5, 5, device=dev).bfloat16()
    with pytest.raises(TypeError, match="dtype"):
        m(x)  # outside autocast: a dtype mismatch is an error (SPEC section 4)
    with torch.autocast(dev, dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    with torch.autocast(dev, dtype=torch.bfloat16):
        y32 = m(x.float())
    assert torch.equal(y, y32)


def test_autocast_kernel_on_the_op():
    """The Autocast kernel is on the operator itself, so direct torch.ops calls autocast too."""
    require("cpp")
    m = make_block(4, 2)
    x = torch.randn(1, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = torch.ops.msfused.block_forward(x, *m.params(), 1, 0, 1, True, False)
    assert y.dtype == torch.bfloat16
    x64 = x.double()  # float64 is never autocast, as for conv2d
    m64 = make_block(4, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = torch.ops.msfused.block_forward(x64, *m64.params(), 1, 0, 1, True, False)
    assert y.dtype == torch.float64


def test_autocast_under_torch_compile(fused_backend):
    """The Autocast kernel is also what torch.compile traces (its py_impl): same dtype and
    values as eager autocast, no graph break."""
    dev = backend_device(fused_backend)
    m = torch.nn.Sequential(make_block(8, 4, backend=fused_backend, device=dev), torch.nn.ReLU())
    x = torch.randn(2, 8, 7, 7, device=dev)

    def f(x):
        with torch.autocast(dev, dtype=torch.bfloat16):
            return m(x)

    y0 = f(x)
    torch._dynamo.reset()
    compiler = "aot_eager" if (fused_backend == "triton" and dev == "cpu") else "inductor"
    y1 = torch.compile(f, fullgraph=True, backend=compiler)(x)
    assert y0.dtype == y1.dtype == torch.bfloat16
    if dev == "cpu":
        assert torch.equal(y1, y0)  # the same kernels; relu is exact in any precision
    else:  # autotuning may pick another tile, another summation order: within one bf16 ulp
        assert rel_err(y1, y0) < torch.finfo(torch.bfloat16).eps
