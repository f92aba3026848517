"""Every available backend against the reference (and the reference against an independent
float64 implementation): outputs, every gradient, layouts, odd shapes, every config."""
import itertools

import pytest
import torch

import msfused
from blockutil import make_block, naive_block, rel_err, run_fwd_bwd
from conftest import backend_device

MERGES = ("concat", "add")
ACTS = ("none", "relu", "relu6", "silu")
CONFIGS = list(itertools.product(MERGES, ACTS, (True, False), (1, 2)))
CONFIG_IDS = [f"{m}-{a}-{'res' if r else 'nores'}-s{s}" for m, a, r, s in CONFIGS]

# float64 / float32 tolerances on relative (norm-wise) error; see README "Tolerances".
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _dtype_for(backend):
    """float64 where the backend has it (exact comparisons), else float32."""
    dtypes = msfused.backends.get_backend(backend).dtypes
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _compare_all(backend, c, n, h, w, *, merge, act, residual, stride, bias=True, batch=2,
                 dtype=None, channels_last=False, seed=0):
    dev = backend_device(backend)
    dtype = dtype or _dtype_for(backend)
    m = make_block(c, n, merge=merge, stride=stride, activation=act, residual=residual,
                   bias=bias, backend=backend, dtype=dtype, device=dev, seed=seed)
    ref = make_block(c, n, merge=merge, stride=stride, activation=act, residual=residual,
                     bias=bias, backend="reference", dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x64 = torch.randn(batch, c, h, w, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y_shape = ref(x64).shape
    gy64 = torch.randn(y_shape, generator=g, dtype=torch.float64)
    y_ref, dx_ref, gr_ref = run_fwd_bwd(ref, x64, gy64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.to(dev, dtype).contiguous(memory_format=fmt)
    gy = gy64.to(dev, dtype).contiguous(memory_format=fmt)
    y, dx, gr = run_fwd_bwd(m, x, gy)
    tol = TOL[dtype]
    assert y.shape == y_ref.shape and y.dtype == dtype and y.device.type == dev
    if channels_last and c > 1:
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last in, not out"
        assert dx.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, y_ref) <= tol, f"output rel err {rel_err(y, y_ref):.3g} > {tol}"
    assert rel_err(dx, dx_ref) <= tol, f"dx rel err {rel_err(dx, dx_ref):.3g} > {tol}"
    assert gr.keys() == gr_ref.keys()
    for k in gr_ref:
        e = rel_err(gr[k], gr_ref[k])
        assert e <= tol, f"grad {k} rel err {e:.3g} > {tol}"


@pytest.mark.parametrize("merge,act,residual,stride", CONFIGS, ids=CONFIG_IDS)
def test_reference_matches_independent_implementation(merge, act, residual, stride):
    m = make_block(5, 3, merge=merge, stride=stride, activation=act, residual=residual,
                   dtype=torch.float64)
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    y = m(x)
    y2 = naive_block(x, m.params(), stride=stride, merge=merge, activation=act,
                     residual=residual)
    assert rel_err(y, y2) < 1e-12


@pytest.mark.parametrize("merge,act,residual,stride", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference_every_config(backend, merge, act, residual, stride):
    _compare_all(backend, 4, 3, 7, 5, merge=merge, act=act, residual=residual, stride=stride)


@pytest.mark.parametrize("merge,act,residual,stride", CONFIGS, ids=CONFIG_IDS)
def test_channels_last_float32(backend, merge, act, residual, stride):
    _compare_all(backend, 6, 4, 6, 7, merge=merge, act=act, residual=residual, stride=stride,
                 dtype=torch.float32, channels_last=True)


# (C, N, H, W, merge, stride): 1x1, 7x5, C=1, N=1, stride 2 on odd sizes, identity
# shortcut (add with N == C), a wide row, a tall column.
SHAPES = [(1, 1, 1, 1, "concat", 1), (3, 2, 1, 1, "add", 2), (2, 3, 7, 5, "concat", 2),
          (1, 1, 7, 5, "add", 1), (1, 4, 5, 3, "concat", 2), (5, 1, 9, 7, "add", 2),
          (4, 4, 5, 5, "add", 1), (4, 2, 4, 4, "concat", 1), (3, 5, 2, 33, "add", 2),
          (2, 2, 31, 2, "concat", 1), (8, 8, 11, 13, "concat", 2)]


@pytest.mark.parametrize("c,n,h,w,merge,stride", SHAPES,
                         ids=[f"C{c}N{n}_{h}x{w}_{m}_s{s}" for c, n, h, w, m, s in SHAPES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_odd_shapes(backend, c, n, h, w, merge, stride, channels_last):
    _compare_all(backend, c, n, h, w, merge=merge, act="relu", residual=True, stride=stride,
                 channels_last=channels_last, batch=1 if h * w > 40 else 3)


@pytest.mark.parametrize("act", ACTS)
def test_no_bias(backend, act):
    _compare_all(backend, 4, 3, 6, 5, merge="add", act=act, residual=True, stride=2, bias=False)


def test_batch_larger_than_one_tile(backend):
    """Enough rows and images that the fused kernels split work across tiles and threads."""
    _compare_all(backend, 16, 8, 23, 19, merge="concat", act="silu", residual=True, stride=1,
                 batch=3, channels_last=True)
    _compare_all(backend, 16, 16, 23, 19, merge="add", act="relu6", residual=True, stride=2,
                 batch=3)


def test_image_by_image_batches(backend):
    """Four or more images with eight or more channels: the CPU backward's per-image plan
    (several bands per image), both strides, channel counts that leave a vector remainder."""
    _compare_all(backend, 13, 5, 9, 7, merge="concat", act="relu", residual=True, stride=1,
                 batch=5, channels_last=True)
    _compare_all(backend, 10, 6, 9, 7, merge="add", act="silu", residual=True, stride=2,
                 batch=4)
    _compare_all(backend, 10, 10, 6, 11, merge="add", act="relu6", residual=True, stride=1,
                 batch=4)
    _compare_all(backend, 9, 4, 5, 5, merge="concat", act="none", residual=False, stride=2,
                 batch=4, channels_last=True)
    # images tall enough to be cut into two bands each
    _compare_all(backend, 8, 4, 260, 5, merge="add", act="relu", residual=True, stride=1,
                 batch=4, channels_last=True)
    _compare_all(backend, 9, 3, 520, 5, merge="concat", act="relu6", residual=False, stride=2,
                 batch=4)


def test_output_keeps_memory_format(backend):
    dev = backend_device(backend)
    m = make_block(8, 4, backend=backend, device=dev)
    x = torch.randn(2, 8, 6, 6, device=dev)
    assert m(x).is_contiguous()
    assert m(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)


def test_noncontiguous_input(backend):
    dev = backend_device(backend)
    m = make_block(4, 3, backend=backend, device=dev)
    ref = make_block(4, 3, backend="reference", device=dev)
    x = torch.randn(2, 4, 9, 12, device=dev)[:, :, 1:8, ::2]
    assert rel_err(m(x), ref(x)) < 2e-5


def test_nan_and_inf_propagate(backend):
    dev = backend_device(backend)
    m = make_block(3, 2, activation="none", residual=False, backend=backend, device=dev)
    ref = make_block(3, 2, activation="none", residual=False, backend="reference", device=dev)
    x = torch.randn(1, 3, 6, 6, device=dev)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 4, 4] = float("inf")
    y, yr = m(x), ref(x)
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.equal(torch.isinf(y), torch.isinf(yr))


def test_backward_is_deterministic(fused_backend):
    dev = backend_device(fused_backend)
    m = make_block(16, 8, merge="add", stride=2, backend=fused_backend, device=dev)
    x = torch.randn(4, 16, 17, 15, device=dev)
    gy = torch.randn(m(x).shape, device=dev)
    _, dx1, g1 = run_fwd_bwd(m, x, gy)
    _, dx2, g2 = run_fwd_bwd(m, x, gy)
    assert torch.equal(dx1, dx2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"{k} differs between two identical backward runs"


LOWP_CASES = [("concat", "silu", True, 1), ("add", "relu6", True, 2)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("merge,act,residual,stride", LOWP_CASES,
                         ids=[f"{m}-{a}-s{s}" for m, a, r, s in LOWP_CASES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_low_precision_policy(fused_backend, dtype, merge, act, residual, stride,
                              channels_last):
    """float16/bfloat16 judged like flash-attention: the error against a float64 reference
    at most 2x the error of eager PyTorch in the same dtype (plus eps/10 in relative-norm
    units), for the output and every gradient."""
    if dtype not in msfused.backends.get_backend(fused_backend).dtypes:
        pytest.skip(f"backend {fused_backend!r} has no {dtype} kernels (it refuses them)")
    dev = backend_device(fused_backend)
    kw = dict(merge=merge, stride=stride, activation=act, residual=residual)
    c, n, h, w = 16, 8, 7, 6
    ref64 = make_block(c, n, backend="reference", dtype=torch.float64, **kw)
    eager = make_block(c, n, backend="reference", dtype=dtype, device=dev, **kw)
    fused = make_block(c, n, backend=fused_backend, dtype=dtype, device=dev, **kw)
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
    gy64 = torch.randn(ref64(x64).shape, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.to(dev, dtype).contiguous(memory_format=fmt)
    gy = gy64.to(dev, dtype).contiguous(memory_format=fmt)
    runs = {}
    for name, m, xx, gg in (("ref", ref64, x64, gy64), ("eager", eager, x, gy),
                            ("fused", fused, x, gy)):
        y, dx, grads = run_fwd_bwd(m, xx, gg)
        runs[name] = {"y": y, "dx": dx, **grads}
    floor = torch.finfo(dtype).eps / 10
    for k, r in runs["ref"].items():
        err_e, err_f = rel_err(runs["eager"][k], r), rel_err(runs["fused"][k], r)
        assert runs["fused"][k].dtype == dtype
        assert err_f <= 2 * err_e + floor, f"{k}: {fused_backend} {err_f:.3g} vs eager {err_e:.3g}"
