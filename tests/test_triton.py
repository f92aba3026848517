"""The triton backend beyond the shared suite: torch.compile(fullgraph=True), and torch.library.opcheck of its operators.

Runs on CUDA when a GPU is visible, else on CPU tensors under TRITON_INTERPRET=1 (small
shapes; the interpreter is slow), else skips."""
import pytest
import torch

import msfused
from blockutil import make_block, rel_err, run_fwd_bwd
from conftest import require

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

def _dev():
    return require("triton")


def _model(dev):
    return torch.nn.Sequential(
        make_block(4, 3, merge="add", stride=1, activation="silu", backend="triton", device=dev),
        torch.nn.ReLU(),
        make_block(3, 2, merge="concat", stride=2, activation="relu6", backend="triton",
                   device=dev, seed=1))


def test_compile_fullgraph_matches_eager():
    """No graph break (fullgraph=True raises on one), output and gradients match eager.
    On a GPU with Inductor (which sees the kernels through wrap_triton); under the
    interpreter with aot_eager (the ops are opaque there, see msfused.triton_ops)."""
    dev = _dev()
    backend = "inductor" if dev == "cuda" else "aot_eager"
    m = _model(dev)
    x = torch.randn(2, 4, 6, 5, device=dev)
    y0, dx0, g0 = run_fwd_bwd(m, x, torch.ones(2, 4, 3, 3, device=dev))
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend=backend)
    xr = x.clone().requires_grad_(True)
    for p in m.parameters():
        p.grad = None
    y = cm(xr)
    y.backward(torch.ones_like(y))
    assert rel_err(y.detach(), y0) < 2e-5
    assert rel_err(xr.grad, dx0) < 2e-5
    for k, p in m.named_parameters():
        assert rel_err(p.grad, g0[k]) < 2e-5, k


def test_compile_no_graph_break_explain():
    dev = _dev()
    m = _model(dev)
    x = torch.randn(1, 4, 5, 5, device=dev)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(m)(x)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


# two cases: opcheck runs each op several times, slow under the interpreter
OPCHECK_CASES = [("concat", "silu", True, 2, True), ("add", "relu", True, 1, False)]


@pytest.mark.parametrize("merge,act,residual,stride,bias", OPCHECK_CASES,
                         ids=[f"{m}-{a}-{'res' if r else 'nores'}-s{s}-{'bias' if b else 'nobias'}"
                              for m, a, r, s, b in OPCHECK_CASES])
def test_opcheck(merge, act, residual, stride, bias):
    dev = _dev()
    m = make_block(4, 3, merge=merge, stride=stride, activation=act, residual=residual,
                   bias=bias, backend="triton", device=dev)
    x = torch.randn(2, 4, 5, 6, device=dev)
    samples = msfused.backends.get_backend("triton").ops.opcheck_samples(x, m.params(), m.config)
    assert len(samples) == 3
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_channels_last_lowp_keeps_format():
    dev = _dev()
    m = make_block(8, 4, backend="triton", dtype=torch.bfloat16, device=dev)
    x = torch.randn(2, 8, 5, 6, device=dev, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


def test_refuses_float64():
    dev = _dev()
    m = make_block(4, 3, backend="triton", dtype=torch.float64, device=dev)
    with pytest.raises(TypeError, match="x:"):
        m(torch.randn(1, 4, 5, 5, device=dev, dtype=torch.float64))


def test_op_overhead_measurable():
    """The per-call overhead helper runs (numbers: see TRITON_NOTES.md)."""
    from msfused.ops import triton_ops
    dev = _dev()
    m = make_block(4, 3, backend="triton", device=dev)
    r = triton_ops.measure_overhead(torch.randn(1, 4, 4, 4, device=dev), m.params(), m.config,
                                    iters=3)
    assert r["op_us"] > 0 and r["direct_us"] > 0
