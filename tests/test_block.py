"""Every available backend against the reference (and the reference against an independent
float64 implementation): outputs, every gradient, layouts, odd shapes, every config.

Triton in the interpreter (TRITON_INTERPRET=1, no GPU) runs its kernels in numpy, one program
after another; there the parametrised tests below generate an explicit subset of their cases
for the triton backend (the *_INTERPRETER lists; conftest.interpreter_subset) that still
covers every merge, activation, residual, stride, layout, dtype and odd shape, and
test_interpreter_subsets_cover_every_pair checks the config subsets are pairwise complete.
MSFUSED_FULL_INTERPRETER=1 generates every case there too. reference and cpp, and triton or
cuda on a GPU, always run every case."""
import itertools

import pytest
import torch

import msfused
from blockutil import make_block, naive_block, rel_err, run_fwd_bwd
from conftest import (ALL_BACKENDS, FUSED_BACKENDS, backend_device, backend_params,
                      interpreter_subset, require)

MERGES = ("concat", "add")
ACTS = ("none", "relu", "relu6", "silu")
CONFIGS = list(itertools.product(MERGES, ACTS, (True, False), (1, 2)))
CONFIG_IDS = [f"{m}-{a}-{'res' if r else 'nores'}-s{s}" for m, a, r, s in CONFIGS]

# Triton in the interpreter: 8 of the 32 configs per test. Each is the full merge x residual x
# stride product (8 combinations), each activation on two of them that differ in all three,
# so every pair of values of any two of the four dimensions occurs. The two tests give the
# activations different combinations (16 distinct configs between them).
CONFIGS_INTERPRETER = {
    "concat-none-res-s1", "add-none-nores-s2", "concat-relu-nores-s2", "add-relu-res-s1",
    "add-relu6-res-s2", "concat-relu6-nores-s1", "add-silu-nores-s1", "concat-silu-res-s2"}
CHANNELS_LAST_INTERPRETER = {
    "concat-none-res-s2", "add-none-nores-s1", "concat-relu-nores-s1", "add-relu-res-s2",
    "add-relu6-res-s1", "concat-relu6-nores-s2", "add-silu-nores-s2", "concat-silu-res-s1"}

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


def test_interpreter_subsets_cover_every_pair():
    """The interpreter subsets above: every pair of values of (merge, activation, residual,
    stride) occurs in each; no config is in both."""
    by_id = dict(zip(CONFIG_IDS, CONFIGS))
    for subset in (CONFIGS_INTERPRETER, CHANNELS_LAST_INTERPRETER):
        rows = [by_id[i] for i in subset]
        for i, j in itertools.combinations(range(4), 2):
            want = {(c[i], c[j]) for c in CONFIGS}
            assert {(r[i], r[j]) for r in rows} == want, (subset, i, j)
    assert not CONFIGS_INTERPRETER & CHANNELS_LAST_INTERPRETER


@pytest.mark.parametrize("backend,merge,act,residual,stride",
                         backend_params(CONFIGS, CONFIG_IDS, CONFIGS_INTERPRETER),
                         indirect=["backend"])
def test_matches_reference_every_config(backend, merge, act, residual, stride):
    _compare_all(backend, 4, 3, 7, 5, merge=merge, act=act, residual=residual, stride=stride)


@pytest.mark.parametrize("backend,merge,act,residual,stride",
                         backend_params(CONFIGS, CONFIG_IDS, CHANNELS_LAST_INTERPRETER),
                         indirect=["backend"])
def test_channels_last_float32(backend, merge, act, residual, stride):
    _compare_all(backend, 6, 4, 6, 7, merge=merge, act=act, residual=residual, stride=stride,
                 dtype=torch.float32, channels_last=True)


# (C, N, H, W, merge, stride): 1x1, 7x5, C=1, N=1, stride 2 on odd sizes, identity
# shortcut (add with N == C), a wide row, a tall column, few channels in and many out (the
# CPU planar path's register blocks of output channels and their remainders).
SHAPES = [(1, 1, 1, 1, "concat", 1), (3, 2, 1, 1, "add", 2), (2, 3, 7, 5, "concat", 2),
          (1, 1, 7, 5, "add", 1), (1, 4, 5, 3, "concat", 2), (5, 1, 9, 7, "add", 2),
          (4, 4, 5, 5, "add", 1), (4, 2, 4, 4, "concat", 1), (3, 5, 2, 33, "add", 2),
          (2, 2, 31, 2, "concat", 1), (8, 8, 11, 13, "concat", 2), (3, 37, 5, 7, "concat", 1)]


SHAPE_IDS = [f"C{c}N{n}_{h}x{w}_{m}_s{s}" for c, n, h, w, m, s in SHAPES]
SHAPE_CASES = [(cl, *shape) for cl in (False, True) for shape in SHAPES]
SHAPE_CASE_IDS = [f"{'nhwc' if cl else 'nchw'}-{i}" for cl in (False, True) for i in SHAPE_IDS]
# Triton in the interpreter: every shape once, in one layout; each layout gets a 1x1 image,
# stride 2 on odd sizes, C = 1, an identity shortcut and both merges (11 of the 22 cases);
# the wide row runs channels_last, the tall column NCHW.
SHAPES_INTERPRETER = {
    "nchw-C1N1_1x1_concat_s1", "nhwc-C3N2_1x1_add_s2", "nchw-C2N3_7x5_concat_s2",
    "nhwc-C1N1_7x5_add_s1", "nchw-C1N4_5x3_concat_s2", "nhwc-C5N1_9x7_add_s2",
    "nchw-C4N4_5x5_add_s1", "nhwc-C4N2_4x4_concat_s1", "nhwc-C3N5_2x33_add_s2",
    "nchw-C2N2_31x2_concat_s1", "nhwc-C8N8_11x13_concat_s2"}


@pytest.mark.parametrize("backend,channels_last,c,n,h,w,merge,stride",
                         backend_params(SHAPE_CASES, SHAPE_CASE_IDS, SHAPES_INTERPRETER),
                         indirect=["backend"])
def test_odd_shapes(backend, c, n, h, w, merge, stride, channels_last):
    _compare_all(backend, c, n, h, w, merge=merge, act="relu", residual=True, stride=stride,
                 channels_last=channels_last, batch=1 if h * w > 40 else 3)


# Widths at which the fused GPU kernels take their multi-block paths (on the CPU, wide
# channel loops): several 32-channel chunks and 64-channel GEMM blocks with partial ones
# (C = 256, C_out = 280), weight-gradient rows split over row blocks that share out the data
# gradients (2 with an identity shortcut at C = N = 512; 3 with a projection, concat N =
# 280), in the backend's exact dtype and in float32 channels_last. Triton in the interpreter:
# the first case, float32 only.
WIDE = [(256, 140, 4, 3, "concat", 1), (512, 512, 3, 4, "add", 1), (96, 280, 3, 5, "concat", 2)]
WIDE_CASES = [(shape, f32) for shape in WIDE for f32 in (False, True)]
WIDE_IDS = [f"C{c}N{n}_{h}x{w}_{m}_s{s}-{'fp32-nhwc' if f32 else 'exact'}"
            for (c, n, h, w, m, s), f32 in WIDE_CASES]


@pytest.mark.parametrize("backend,shape,f32", backend_params(WIDE_CASES, WIDE_IDS, {WIDE_IDS[1]}),
                         indirect=["backend"])
def test_wide_blocks(backend, shape, f32):
    c, n, h, w, merge, stride = shape
    _compare_all(backend, c, n, h, w, merge=merge, act="relu6", residual=True, stride=stride,
                 batch=1, dtype=torch.float32 if f32 else None, channels_last=f32)


@pytest.mark.parametrize("act", ACTS)
def test_no_bias(backend, act):
    _compare_all(backend, 4, 3, 6, 5, merge="add", act=act, residual=True, stride=2, bias=False)


def test_batch_larger_than_one_tile(backend):
    """Enough rows and images that the fused kernels split work across tiles and threads.
    Triton in the interpreter runs the first of the two (six strips by two column blocks of
    three images: 80 s there for both); its add / stride-2 / NCHW side is in
    test_image_by_image_batches' interpreter subset."""
    _compare_all(backend, 16, 8, 23, 19, merge="concat", act="silu", residual=True, stride=1,
                 batch=3, channels_last=True)
    if interpreter_subset(backend):
        return
    _compare_all(backend, 16, 16, 23, 19, merge="add", act="relu6", residual=True, stride=2,
                 batch=3)


# (C, N, H, W, merge, act, residual, stride, batch, channels_last)
IMAGE_CASES = [(13, 5, 9, 7, "concat", "relu", True, 1, 5, True),
               (10, 6, 9, 7, "add", "silu", True, 2, 4, False),
               (10, 10, 6, 11, "add", "relu6", True, 1, 4, False),
               (9, 4, 5, 5, "concat", "none", False, 2, 4, True),
               # images tall enough to be cut into two bands each (the CPU plan)
               (8, 4, 260, 5, "add", "relu", True, 1, 4, True),
               (9, 3, 520, 5, "concat", "relu6", False, 2, 4, False)]
# Triton in the interpreter: the two tall images with 13 and 26 rows instead of 260 and 520
# (each 4 strips of the strip kernels, the last one row; 260 rows took 2 minutes there).
# The bands they are tall for are the cpp backend's. And only four of the six cases
# (every merge, activation, stride and layout once; 100 s there for all six).
IMAGE_HEIGHT_INTERPRETER = {260: 13, 520: 26}
IMAGE_CASES_INTERPRETER = (0, 1, 3, 5)


def _image_params():
    out = []
    for b in ALL_BACKENDS:
        for i, (c, n, h, w, merge, act, res, s, batch, cl) in enumerate(IMAGE_CASES):
            if interpreter_subset(b):
                if i not in IMAGE_CASES_INTERPRETER:
                    continue
                h = IMAGE_HEIGHT_INTERPRETER.get(h, h)
            out.append(pytest.param(b, c, n, h, w, merge, act, res, s, batch, cl,
                                    id=f"{b}-C{c}N{n}_{h}x{w}_{merge}_s{s}_b{batch}"))
    return out


@pytest.mark.parametrize("backend,c,n,h,w,merge,act,residual,stride,batch,channels_last",
                         _image_params(), indirect=["backend"])
def test_image_by_image_batches(backend, c, n, h, w, merge, act, residual, stride, batch,
                                channels_last):
    """Four or more images with eight or more channels: the CPU backward's per-image plan
    (several bands per image), both strides, channel counts that leave a vector remainder."""
    _compare_all(backend, c, n, h, w, merge=merge, act=act, residual=residual, stride=stride,
                 batch=batch, channels_last=channels_last)


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
    # triton in the interpreter: 2 images of 9 rows (4 strip programs with their partials,
    # still reduced in a fixed order) instead of 4 of 17 (41 s there)
    b, h = (2, 9) if interpreter_subset(fused_backend) else (4, 17)
    x = torch.randn(b, 16, h, 15, device=dev)
    gy = torch.randn(m(x).shape, device=dev)
    _, dx1, g1 = run_fwd_bwd(m, x, gy)
    _, dx2, g2 = run_fwd_bwd(m, x, gy)
    assert torch.equal(dx1, dx2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"{k} differs between two identical backward runs"


@pytest.mark.parametrize("c", [8, 3], ids=["pixel-major", "planar"])
@pytest.mark.parametrize("merge", ["add", "concat"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpp_output_bias_gradient_of_cancelling_terms(c, merge, channels_last):
    """An output bias's gradient is one sum over every output pixel of the batch, and its terms
    often nearly cancel. Here they do by construction (act none, no shortcut: the gradient is
    the sum of gy over 32768 pixels, about 800 times smaller than the sum of their magnitudes),
    and float64 gives the exact sum of those float32 terms. A float chain down each tile's
    pixels was 5e-6 and 8e-6 off in channels_last; sums of 16 pixels carried on in double are
    within 7e-7 (benchmarks/NOTES.md entry 67)."""
    require("cpp")
    torch.manual_seed(0)
    n = 4
    m = make_block(c, n, merge=merge, activation="none", residual=False, backend="cpp")
    x = torch.randn(8, c, 64, 64)
    gy = torch.randn(8, m.out_channels, 64, 64, dtype=torch.float64)
    gy = (gy - gy.mean(dim=(0, 2, 3), keepdim=True) + 1e-3).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        gy = gy.contiguous(memory_format=torch.channels_last)
    m(x).backward(gy)
    want = gy.double().sum(dim=(0, 2, 3))
    got = torch.cat([m.pw_a.bias.grad, m.pw_b.bias.grad]).double()
    if merge == "add":  # both biases get the whole sum
        want = torch.cat([want, want])
    assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("c", [3, 64], ids=["planar", "pixel-major"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpp_forward_same_bits_for_any_thread_count(c, channels_last, dtype):
    """The forward's tiles follow the thread count (4 a thread, at most 32: an image of one
    is cut into 4, 14 or 28 row bands here), which is only sound because each output is
    computed the same way in any tile: the same bits for 1, 2, 3 and 8 threads."""
    require("cpp")
    torch.manual_seed(0)
    m = make_block(c, 32, merge="add", backend="cpp", dtype=dtype)
    x = torch.randn(1, c, 28, 28, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    ys = []
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            with torch.no_grad():
                ys.append(m(x))
    finally:
        torch.set_num_threads(threads)
    for y in ys[1:]:
        assert torch.equal(y, ys[0])


LOWP_CASES = [("concat", "silu", True, 1), ("add", "relu6", True, 2)]
LOWP_PARAMS = [(cl, *case, dtype) for cl in (False, True) for case in LOWP_CASES
               for dtype in (torch.float16, torch.bfloat16)]
LOWP_IDS = [f"{'nhwc' if cl else 'nchw'}-{m}-{a}-s{s}-{'fp16' if d == torch.float16 else 'bf16'}"
            for cl, m, a, r, s, d in LOWP_PARAMS]
# Triton in the interpreter: 4 of the 8, every pair of (layout, case, dtype) values once.
LOWP_INTERPRETER = {"nchw-concat-silu-s1-fp16", "nhwc-add-relu6-s2-fp16",
                    "nhwc-concat-silu-s1-bf16", "nchw-add-relu6-s2-bf16"}


@pytest.mark.parametrize("fused_backend,channels_last,merge,act,residual,stride,dtype",
                         backend_params(LOWP_PARAMS, LOWP_IDS, LOWP_INTERPRETER,
                                        backends=FUSED_BACKENDS),
                         indirect=["fused_backend"])
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
