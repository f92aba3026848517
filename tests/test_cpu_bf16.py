"""bfloat16 on the cpp backend at sizes that reach every part of the native kernels (on CPUs
with AVX512-BF16; elsewhere the same tests cover the widening path): channel counts with a
vector remainder, widths that are not multiples of the 4-pixel blocks, branch widths that
are not multiples of the GEMM's 16 columns, odd C and the planar path (C < 8: float32
kernels reading and writing bfloat16), both layouts, and the thread interplay with eager
PyTorch's own AMX kernels."""
import os
import subprocess
import sys

import pytest
import torch

from blockutil import make_block, rel_err, run_fwd_bwd
from conftest import require

# (c, n, h, w, merge, stride, activation, residual)
CASES = [
    (24, 40, 9, 13, "add", 1, "relu", True),      # 16 + 8 channels, N padded to 48 columns
    (24, 12, 8, 11, "concat", 2, "silu", True),   # projection at stride 2
    (10, 10, 5, 17, "add", 1, "relu6", True),     # identity residual, C below one vector
    (32, 16, 16, 16, "concat", 1, "none", False),
    (64, 32, 14, 14, "add", 2, "relu", True),
    (20, 12, 7, 19, "concat", 1, "relu", True),   # partial 16 x 16 blocks both ways (NCHW)
    (9, 5, 6, 7, "add", 1, "relu", True),         # odd C: float32 kernels, bfloat16 storage
    # the planar path (C < 8): float32 kernels on bfloat16 storage, the fused pointwise
    (3, 40, 9, 11, "concat", 1, "silu", True),    # projection, 2 x 40 outputs: vector tails
    (4, 4, 7, 9, "add", 1, "relu", True),         # identity residual
    (5, 70, 8, 7, "add", 2, "none", True),        # stride-2 projection, 70 outputs
]
IDS = [f"c{c}-n{n}-{h}x{w}-{m}-s{s}-{a}" for c, n, h, w, m, s, a, r in CASES]


@pytest.mark.parametrize("c,n,h,w,merge,stride,act,residual", CASES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("batch", [3, 5], ids=["tile-plan", "per-image-plan"])
def test_bf16_policy_native_sizes(c, n, h, w, merge, stride, act, residual, channels_last,
                                  batch):
    """The tolerance policy of test_low_precision_policy (at most 2x eager bfloat16's error
    against float64, plus eps/10) for the output and every gradient. Batch 3 takes the
    backward's tile plan (dx summed in one float32 buffer), batch 5 its per-image plan
    (csrc/cpu/tiling.h; dx summed per image in a thread-local buffer)."""
    require("cpp")
    kw = dict(merge=merge, stride=stride, activation=act, residual=residual)
    ref64 = make_block(c, n, backend="reference", dtype=torch.float64, **kw)
    eager = make_block(c, n, backend="reference", dtype=torch.bfloat16, **kw)
    fused = make_block(c, n, backend="cpp", dtype=torch.bfloat16, **kw)
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(batch, c, h, w, generator=g, dtype=torch.float64)
    gy64 = torch.randn(ref64(x64).shape, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.bfloat16().contiguous(memory_format=fmt)
    gy = gy64.bfloat16().contiguous(memory_format=fmt)
    runs = {}
    for name, m, xx, gg in (("ref", ref64, x.double(), gy.double()), ("eager", eager, x, gy),
                            ("fused", fused, x, gy)):
        y, dx, grads = run_fwd_bwd(m, xx, gg)
        runs[name] = {"y": y, "dx": dx, **grads}
    assert runs["fused"]["y"].is_contiguous(memory_format=fmt)
    floor = torch.finfo(torch.bfloat16).eps / 10
    for k, r in runs["ref"].items():
        err_e, err_f = rel_err(runs["eager"][k], r), rel_err(runs["fused"][k], r)
        assert runs["fused"][k].dtype == torch.bfloat16
        assert err_f <= 2 * err_e + floor, f"{k}: cpp {err_f:.3g} vs eager {err_e:.3g}"


def test_bf16_alternating_with_eager_amx_kernels():
    """The same fused call twice with an eager bfloat16 convolution (oneDNN, AMX tiles where
    the CPU has them) in between, on two threads: oneDNN releases the tiles after its own
    kernels on every thread, so a fused kernel that assumed its tile configuration survived
    from the first call would stop the process with SIGILL in the second."""
    require("cpp")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for c, n, merge, stride in [(16, 8, "concat", 1), (16, 8, "add", 2)]:
            fused = make_block(c, n, merge=merge, stride=stride, backend="cpp",
                               dtype=torch.bfloat16)
            eager = make_block(c, n, merge=merge, stride=stride, backend="reference",
                               dtype=torch.bfloat16)
            x = torch.randn(3, c, 13, 11).bfloat16()
            with torch.no_grad():
                y0 = fused(x)
                ye = eager(x)
                y1 = fused(x)
            assert torch.equal(y0, y1)
            assert rel_err(y1, ye) < 0.05
    finally:
        torch.set_num_threads(threads)


def test_bf16_nan_propagates_like_conv2d():
    require("cpp")
    m = make_block(16, 16, merge="add", activation="none", backend="cpp", dtype=torch.bfloat16)
    ref = make_block(16, 16, merge="add", activation="none", dtype=torch.float64)
    x = torch.randn(2, 16, 6, 6).bfloat16()
    x[1, 3, 2, 4] = float("nan")
    x[0, 5, 0, 0] = float("inf")
    with torch.no_grad():
        y, yr = m(x), ref(x.double())
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.equal(torch.isinf(y), torch.isinf(yr))



def test_bf16_weight_gradients_are_deterministic():
    """The same bits from two runs and from one and two threads (fixed chunking, fixed-order
    reduction of the float32 partials, bfloat16 GEMM or not)."""
    require("cpp")
    m = make_block(32, 16, merge="concat", stride=1, backend="cpp", dtype=torch.bfloat16)
    x = torch.randn(6, 32, 12, 10).bfloat16()
    gy = torch.randn(6, 32, 12, 10).bfloat16()
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            runs.append(run_fwd_bwd(m, x, gy))
    finally:
        torch.set_num_threads(threads)
    for y, dx, grads in runs[1:]:
        assert torch.equal(dx, runs[0][1])
        for k in grads:
            assert torch.equal(grads[k], runs[0][2][k]), f"{k} differs between runs"


@pytest.mark.parametrize("env", [{"MSFUSED_CPU_BF16": "widen"},
                                 {"MSFUSED_CPU_BF16": "widen", "MSFUSED_CPU_ISA": "base"}],
                         ids=["avx2-build", "baseline-build"])
def test_bf16_backward_without_native_bf16(env):
    """The bfloat16 backward as a CPU without AVX512-BF16 runs it (bfloat16 tensors read and
    written by the AVX2 or baseline build, float32 GEMMs), in a subprocess because the
    choice is made once per process: the tolerance policy on a planar, a tile-plan and a
    per-image-plan case, both layouts."""
    require("cpp")
    code = """
import sys, torch
sys.path.insert(0, %r)
from blockutil import make_block, rel_err, run_fwd_bwd
for c, n, b, merge, stride, act in ((5, 4, 3, "concat", 2, "silu"), (24, 12, 3, "add", 1, "relu"),
                                    (24, 40, 5, "concat", 1, "relu6")):
    kw = dict(merge=merge, stride=stride, activation=act)
    ref = make_block(c, n, backend="reference", dtype=torch.float64, **kw)
    eager = make_block(c, n, backend="reference", dtype=torch.bfloat16, **kw)
    fused = make_block(c, n, backend="cpp", dtype=torch.bfloat16, **kw)
    x = torch.randn(b, c, 9, 10, dtype=torch.float64).bfloat16()
    gy = torch.randn(ref(x.double()).shape, dtype=torch.float64).bfloat16()
    for fmt in (torch.contiguous_format, torch.channels_last):
        xx, gg = x.contiguous(memory_format=fmt), gy.contiguous(memory_format=fmt)
        runs = [run_fwd_bwd(m, xx.to(dt), gg.to(dt)) for m, dt in
                ((ref, torch.float64), (eager, torch.bfloat16), (fused, torch.bfloat16))]
        flat = [{"y": y, "dx": dx, **g} for y, dx, g in runs]
        for k in flat[0]:
            e, f = rel_err(flat[1][k], flat[0][k]), rel_err(flat[2][k], flat[0][k])
            assert flat[2][k].dtype == torch.bfloat16, k
            assert f <= 2 * e + torch.finfo(torch.bfloat16).eps / 10, (c, k, f, e)
print("ok")
""" % os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("c", [16, 18], ids=["vectors", "vector-and-tail"])
def test_bf16_tiny_outputs_round_alike(c):
    """y = x through the identity residual (every weight and bias zero): bfloat16
    values are returned exactly down to the smallest normal; below it (denormals, under
    1.2e-38) the kernels built for AVX512-BF16 (its vcvtneps2bf16) give zeros of the
    input's sign, the others (and MSFUSED_CPU_BF16=widen) the values themselves. Either way
    every channel alike: the scalar rounding of a row's last channels (C = 18: 16 in a
    vector, 2 after it) follows the vector instruction's rule."""
    require("cpp")
    blk = make_block(c, c, backend="cpp", dtype=torch.bfloat16, merge="add", activation="none")
    with torch.no_grad():
        for p in blk.parameters():
            p.zero_()
    fmt = torch.channels_last
    normal = torch.tensor([1e-30, -(2.0 ** -126), 3.5, -1e30, 0.0]).bfloat16()
    denormal = torch.tensor([5e-39, -(2.0 ** -133), 1e-39, -3e-39]).bfloat16()
    assert (denormal.float().abs() < torch.finfo(torch.float32).tiny).all()
    for vals, exact in ((normal, True), (denormal, False)):
        x = vals.repeat(c * 5 * 9 // len(vals) + 1)[: c * 5 * 9].reshape(1, 5, 9, c)
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=fmt)
        with torch.no_grad():
            y = blk(x)
        if exact or torch.equal(y, x):
            assert torch.equal(y, x)
        else:
            assert (y == 0).all(), "denormals flushed in some channels and kept in others"
            assert torch.equal(torch.signbit(y), torch.signbit(x))
