"""The triton backend beyond the shared suite: torch.compile(fullgraph=True), and torch.library.opcheck of its operators.

Runs on CUDA when a GPU is visible, else on CPU tensors under TRITON_INTERPRET=1 (small
shapes; the interpreter is slow: there test_opcheck generates its bias-free case only,
MSFUSED_FULL_INTERPRETER=1 both), else skips."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import msfused
from blockutil import make_block, rel_err, run_fwd_bwd
from conftest import interpreter_subset, require

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


# two cases: opcheck runs each op several times, slow under the interpreter. There (and not
# under MSFUSED_FULL_INTERPRETER=1) only the bias-free one is generated: tests/test_ops.py's
# interpreter opchecks already run concat at stride 2 and silu with biases, bias=False (None
# arguments to the ops) is this file's alone.
OPCHECK_CASES = [("concat", "silu", True, 2, True), ("add", "relu", True, 1, False)]
if interpreter_subset("triton"):
    OPCHECK_CASES = [c for c in OPCHECK_CASES if not c[4]]


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


# Shapes that cross every tile boundary of the strip kernels (4 output rows x BW columns,
# BW = 8 for Wo <= 8 else 16; BLOCK_C = 16 input channels per chunk; BLOCK_N output channels
# per program, at most 64 for concat and 128 for add): a last strip of 1 row, a last column
# block of 5, three channel chunks with a remainder, two N tiles with a remainder, the
# projection and the identity shortcut, both strides.
TILE_CASES = [
    (40, 70, 9, 21, "concat", 1),    # projection; N tiles 64 + 6
    (16, 130, 6, 7, "add", 2),       # projection; N tiles 128 + 2; BW = 8
    (33, 33, 13, 17, "add", 1),      # identity shortcut; chunks 16 + 16 + 1
    (20, 10, 17, 9, "concat", 2),    # projection at stride 2; Wo = 5 with BW = 8
]


@pytest.mark.parametrize("c,n,h,w,merge,stride", TILE_CASES,
                         ids=[f"C{c}N{n}_{h}x{w}_{m}_s{s}" for c, n, h, w, m, s in TILE_CASES])
def test_strip_tile_boundaries(c, n, h, w, merge, stride):
    dev = _dev()
    kw = dict(merge=merge, stride=stride, activation="relu", residual=True)
    m = make_block(c, n, backend="triton", device=dev, **kw)
    ref = make_block(c, n, backend="reference", dtype=torch.float64, **kw)
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(1, c, h, w, generator=g, dtype=torch.float64)
    gy64 = torch.randn(ref(x64).shape, generator=g, dtype=torch.float64)
    y_ref, dx_ref, gr_ref = run_fwd_bwd(ref, x64, gy64)
    x = x64.to(dev, torch.float32).contiguous(memory_format=torch.channels_last)
    y, dx, gr = run_fwd_bwd(m, x, gy64.to(dev, torch.float32))
    assert rel_err(y, y_ref) <= 2e-5 and rel_err(dx, dx_ref) <= 2e-5
    for k in gr_ref:
        assert rel_err(gr[k], gr_ref[k]) <= 2e-5, k


def test_verbose_prints_the_autotuner_choice():
    """MSFUSED_TRITON_VERBOSE=1 prints each kernel's chosen config once per tuning key."""
    _dev()
    code = """
import sys, torch
sys.path.insert(0, %r)
from blockutil import make_block
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = make_block(4, 3, backend="triton", device=dev)
x = torch.randn(1, 4, 5, 5, device=dev, requires_grad=True)
m(x).sum().backward()
m(x).sum().backward()
""" % os.path.dirname(__file__)
    env = dict(os.environ, MSFUSED_TRITON_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("msfused triton: ")]
    names = [ln.split()[2] for ln in lines]
    for k in ("_fwd_kernel", "_gz_kernel", "_bwd_branch_kernel", "_bwd_b1_kernel",
              "_bwd_dx_kernel", "_pw_grad_kernel"):
        assert k in names, out.stderr
    assert len(names) == len(set(lines)), "a choice was printed twice for the same key"


def test_kernels_compile_for_sm90_without_spills():
    """Offline: every kernel variant the benchmark shapes launch, with every autotune config
    it would try, compiles for sm_90 (the compiled frontend accepts what the interpreter
    runs), uses tensor cores where it has dots (HMMA or Hopper's HGMMA) in bfloat16, and has
    no local-memory spills (tools/triton_sass.py; no GPU needed)."""
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("this Triton has no NVIDIA backend (ptxas) to compile for sm_90")
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "triton_sass.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        out_json = os.path.join(d, "rows.json")
        r = subprocess.run([sys.executable, tool, "--shapes", "paper-u3,mnet-14",
                            "--json", out_json], env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        with open(out_json) as f:
            rows = json.load(f)
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_fwd_kernel", "_gz_kernel", "_bwd_branch_kernel", "_bwd_b1_kernel",
                       "_bwd_dx_kernel", "_pw_grad_kernel"}, kernels
    for row in rows:
        where = f"{row['shape']} {row['kernel']} {row['config']}"
        assert row["ldl"] == 0 and row["stl"] == 0, f"local-memory spills in {where}"
        if row["kernel"] in ("_fwd_kernel", "_bwd_branch_kernel", "_pw_grad_kernel"):
            assert row["hmma"] + row["hgmma"] > 0, f"no tensor-core instruction in {where}"
