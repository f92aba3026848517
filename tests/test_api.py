"""The module and the functional API: construction, backend selection, state_dicts moving
between backends, and every malformed input of SPEC section 4."""
import os
import subprocess
import sys

import pytest
import torch

import msfused
from blockutil import make_block, rel_err
from conftest import ALL_BACKENDS, backend_device, require
from msfused.backends import get_backend
from msfused.params import BlockParams


def test_out_channels_and_state_dict_keys():
    m = msfused.MultiScaleSeparableBlock(8, 5, merge="concat", stride=2)
    assert m.out_channels == 10
    keys = set(m.state_dict())
    expect = {f"{s}.{a}" for s in ("dw_a", "dw_b", "dw_c", "pw_a", "pw_b", "shortcut")
              for a in ("weight", "bias")}
    assert keys == expect
    assert m.state_dict()["dw_b.weight"].shape == (8, 1, 3, 3)
    assert m.state_dict()["pw_a.weight"].shape == (5, 8, 1, 1)
    assert m.state_dict()["shortcut.weight"].shape == (10, 8, 1, 1)
    m2 = msfused.MultiScaleSeparableBlock(8, 8, merge="add", bias=False)
    assert m2.out_channels == 8 and m2.shortcut is None
    assert set(m2.state_dict()) == {f"{s}.weight" for s in ("dw_a", "dw_b", "dw_c", "pw_a", "pw_b")}
    m3 = msfused.MultiScaleSeparableBlock(8, 4, merge="add", residual=False)
    assert m3.shortcut is None


def test_default_init_is_conv2d():
    torch.manual_seed(0)
    m = msfused.MultiScaleSeparableBlock(16, 8)
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
    assert torch.equal(m.dw_a.weight, ref.weight) and torch.equal(m.dw_a.bias, ref.bias)


@pytest.mark.parametrize("src", ALL_BACKENDS)
@pytest.mark.parametrize("dst", ALL_BACKENDS)
def test_state_dict_moves_between_backends(src, dst):
    dev_s, dev_d = require(src), require(dst)
    a = make_block(6, 4, merge="add", stride=2, backend=src, device=dev_s)
    b = msfused.MultiScaleSeparableBlock(6, 4, merge="add", stride=2, backend=dst, device=dev_d)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 7, 9)
    assert rel_err(a(x.to(dev_s)), b(x.to(dev_d))) < 2e-5


def test_auto_picks_cpp_on_cpu():
    x = torch.randn(1, 4, 5, 5)
    if msfused.available_backends()["cpp"].available:
        assert msfused.backend_for(x) == "cpp"
        assert msfused.backend_for(x.double()) == "cpp"
        # bfloat16/float16 run in float32 inside the op (csrc/cpu/block_cpu.cpp)
        assert msfused.backend_for(x.half()) == "cpp"
        assert msfused.backend_for(x.bfloat16()) == "cpp"
    assert msfused.backend_for(x, "reference") == "reference"


def test_auto_on_gpu_picks_a_gpu_backend():
    if not torch.cuda.is_available():
        pytest.skip("no GPU on this machine")
    x = torch.randn(1, 4, 5, 5, device="cuda")
    assert msfused.backend_for(x) in ("cuda", "triton")


def test_env_overrides_auto():
    code = ("import torch, msfused; x = torch.randn(1, 4, 5, 5); "
            "print(msfused.backend_for(x), msfused.backend_for(x, 'cpp') if "
            "msfused.available_backends()['cpp'].available else 'cpp')")
    env = dict(os.environ, MSFUSED_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "cpp"]


def test_named_backend_never_falls_back():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        make_block(4, 2, backend="cuda")(x)
    if msfused.available_backends()["triton"].available and not torch.cuda.is_available():
        # triton has no float64 kernels: a named backend refuses, it does not fall back
        with pytest.raises(TypeError, match="float64"):
            make_block(4, 2, backend="triton", dtype=torch.float64)(x.double())


def test_available_backends_says_why():
    st = msfused.available_backends()
    assert set(st) >= {"reference", "cpp", "cuda"}
    assert st["reference"].available
    for name, s in st.items():
        assert s.available or s.reason, f"{name} unavailable without a reason"
    if not torch.cuda.is_available():
        assert not st["cuda"].available and st["cuda"].reason


def test_cpu_kernels_baseline_isa_and_blas_fallback():
    """The baseline (non-AVX2) build of the kernels and the at::mm GEMM fallback agree."""
    require("cpp")
    code = """
import torch, msfused, sys
sys.path.insert(0, %r)
from blockutil import make_block, rel_err, run_fwd_bwd
for merge, stride in (("concat", 2), ("add", 1)):
    m = make_block(5, 3, merge=merge, stride=stride, activation="silu", backend="cpp", dtype=torch.float64)
    r = make_block(5, 3, merge=merge, stride=stride, activation="silu", dtype=torch.float64)
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    gy = torch.randn(r(x).shape, dtype=torch.float64)
    y, dx, g = run_fwd_bwd(m, x, gy)
    y2, dx2, g2 = run_fwd_bwd(r, x, gy)
    assert rel_err(y, y2) < 1e-12 and rel_err(dx, dx2) < 1e-12
    assert all(rel_err(g[k], g2[k]) < 1e-12 for k in g)
print("ok")
""" % os.path.dirname(__file__)
    env = dict(os.environ, MSFUSED_CPU_ISA="base", MSFUSED_NO_BLAS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_cpu_kernels_float32_per_isa(isa):
    """float32 in the build a CPU gets: MSFUSED_CPU_ISA=avx2 caps the kernels at AVX2 (what a
    CPU without AVX-512 runs), the default picks AVX-512 where the CPU has it. Each in a
    subprocess (the choice is made once per process), against the float64 reference, on a
    planar, a tile-plan and a per-image-plan case, both layouts."""
    require("cpp")
    code = """
import torch, sys
sys.path.insert(0, %r)
from blockutil import make_block, check_float32_against_float64
for c, n, b, merge, stride, act in ((5, 37, 3, "concat", 1, "silu"), (24, 12, 3, "add", 2, "relu"),
                                    (40, 24, 5, "concat", 1, "relu6")):
    kw = dict(merge=merge, stride=stride, activation=act)
    ref = make_block(c, n, dtype=torch.float64, **kw)
    fused = make_block(c, n, backend="cpp", dtype=torch.float32, **kw)
    x = torch.randn(b, c, 9, 10, dtype=torch.float64)
    gy = torch.randn(ref(x).shape, dtype=torch.float64)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xx, gg = x.contiguous(memory_format=fmt), gy.contiguous(memory_format=fmt)
        check_float32_against_float64(ref, fused, xx, gg, tag=(c, fmt))
print("ok")
""" % os.path.dirname(__file__)
    env = dict(os.environ)
    env.pop("MSFUSED_CPU_ISA", None)
    if isa != "default":
        env["MSFUSED_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_depthwise_weight_grads_wide_rows(stride, channels_last):
    """The AVX-512 build sums the depthwise weight gradients in registers over strips of at
    most 16 pixels of a row (csrc/cpu/kernel_pixel_major.h, dw_grad_strips): rows 37 and
    19 pixels wide (three and two strips of unequal length), C = 24 (one channel vector
    plus an 8-channel tail), every gradient against the float64 reference."""
    require("cpp")
    from blockutil import make_block, check_float32_against_float64
    kw = dict(merge="add", stride=stride, activation="relu6")
    torch.manual_seed(3)
    ref = make_block(24, 24, dtype=torch.float64, **kw)
    fused = make_block(24, 24, backend="cpp", dtype=torch.float32, **kw)
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 24, 11, 37, dtype=torch.float64).contiguous(memory_format=fmt)
    gy = torch.randn(ref(x).shape, dtype=torch.float64).contiguous(memory_format=fmt)
    check_float32_against_float64(ref, fused, x, gy)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch", [3, 5], ids=["tile-plan", "per-image-plan"])
def test_cpu_nchw_transposes(stride, batch):
    """NCHW input on the pixel-major path goes through in-register transposes of 16 x 16
    (AVX-512; 8 x 8 AVX2) blocks: the x band, the forward's epilogue, pass 2's dx rows and,
    at stride 1, the projection's dx (csrc/cpu/kernel_tiles.h transpose_ld, add_transposed;
    kernel_pixel_major.h load_x_band_pm). C = 20 and W = 19 leave a partial block in both
    directions (the overlapping last block of transpose_ld, the narrow path of
    add_transposed), Cout = 24 a channel tail in the epilogue, and concat a projection;
    every gradient against the float64 reference, both backward plans."""
    require("cpp")
    from blockutil import make_block, check_float32_against_float64
    kw = dict(merge="concat", stride=stride, activation="relu")
    torch.manual_seed(4)
    ref = make_block(20, 12, dtype=torch.float64, **kw)
    fused = make_block(20, 12, backend="cpp", dtype=torch.float32, **kw)
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(batch, 20, 7, 19, dtype=torch.float64)
    gy = torch.randn(ref(x).shape, dtype=torch.float64)
    check_float32_against_float64(ref, fused, x, gy)


def test_cpu_backward_tiles_by_l2_size(tmp_path):
    """The pixel-major backward cuts images into bands by the CPU's L2 size (csrc/cpu/
    tiling.h, backward_tile_elems): 32768-element tiles below 1 MiB, 262144 from 1 MiB. Both
    plans, forced with MSFUSED_CPU_L2_KB in subprocesses, against the float64 reference, at
    shapes where they differ (two or three bands per image against one; stride 1 and 2,
    both layouts). That the override took effect shows in the weight gradients' bits: the
    pointwise GEMMs then sum an image's pixels in different groups."""
    require("cpp")
    code = """
import torch, sys
sys.path.insert(0, %r)
from blockutil import make_block, check_float32_against_float64
out = {}
for c, n, hw, merge, stride in ((64, 32, 16, "add", 1), (48, 48, 44, "concat", 2)):
    kw = dict(merge=merge, stride=stride, activation="relu")
    torch.manual_seed(0)
    ref = make_block(c, n, dtype=torch.float64, **kw)
    fused = make_block(c, n, backend="cpp", dtype=torch.float32, **kw)
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(4, c, hw, hw, dtype=torch.float64)
    gy = torch.randn(ref(x).shape, dtype=torch.float64)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xx, gg = x.contiguous(memory_format=fmt), gy.contiguous(memory_format=fmt)
        got = check_float32_against_float64(ref, fused, xx, gg, tag=(c, fmt))
        out[(c, str(fmt))] = got[2]
torch.save(out, sys.argv[1])
""" % os.path.dirname(__file__)
    runs = {}
    for kb in ("512", "1024"):
        path = str(tmp_path / f"g{kb}.pt")
        out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                             env=dict(os.environ, MSFUSED_CPU_L2_KB=kb), timeout=300)
        assert out.returncode == 0, out.stderr
        runs[kb] = torch.load(path)
    for key, grads in runs["512"].items():
        assert any(not torch.equal(g, runs["1024"][key][k]) for k, g in grads.items()), key


def _output_cache_run(tmp_path, name, **env):
    path = str(tmp_path / f"{name}.pt")
    here = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, os.path.join(here, "cpu_output_cache_probe.py"), path],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             [here, os.environ.get("PYTHONPATH", "")]), **env))
    assert out.returncode == 0, out.stderr
    return torch.load(path)


def test_cpu_output_cache(tmp_path):
    """Outputs of 32 MiB and more (y, the pre-activation, dx) come from the CPU op's cache of
    mapped blocks (csrc/cpu/output_cache.h): a freed block is handed to the next output of
    its size, also when freed on another thread; a forked child can use it; the storage
    stays resizable and takes copy-on-write clones; torch.profiler's memory profile counts
    it; the cache keeps at most MSFUSED_CPU_OUTPUT_CACHE_MB idle (a malformed value warns
    and keeps the default) and msfused.empty_cpu_cache() empties it. The values
    match the reference and are the same bits with the cache and the huge-page advice off
    (each run a subprocess: both settings are read once per process)."""
    require("cpp")
    mib = 1 << 20
    on = _output_cache_run(tmp_path, "on")
    off = _output_cache_run(tmp_path, "off", MSFUSED_CPU_OUTPUT_CACHE_MB="0",
                            MSFUSED_CPU_HUGEPAGE="0")
    capped = _output_cache_run(tmp_path, "capped", MSFUSED_CPU_OUTPUT_CACHE_MB="40")
    o = on["obs"]
    y_bytes = on["first"].nbytes
    assert o["idle_while_used"] == 0
    assert o["idle_after_free"] >= y_bytes
    assert o["reused"] and o["same_after_reuse"] and o["idle_after_reuse"] == 0
    assert o["lazy_clone_shares"] and o["lazy_clone_copies_on_write"]
    assert o["fork_child"] == 0 and off["obs"]["fork_child"] == 5
    assert o["profiled_bytes"] >= y_bytes and off["obs"]["profiled_bytes"] >= y_bytes
    assert o["grown_keeps_values"] and o["shrunk_keeps_values"]
    assert o["idle_after_thread_free"] >= y_bytes
    assert o["idle_after_training"] >= 2 * y_bytes
    assert o["released"] == o["idle_after_training"] and o["idle_after_release"] == 0
    assert o["idle_after_training"] <= 128 * mib
    c = capped["obs"]
    assert c["reused"] and c["idle_after_training"] <= 40 * mib
    assert all(v == 0 for k, v in off["obs"].items() if k.startswith("idle") or k == "released")
    for run in (off, capped):
        assert torch.equal(run["first"], on["first"])
        for k, g in on["grads"].items():
            assert torch.equal(run["grads"][k], g), k
    ref = make_block(3, 32, merge="concat", dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in on["state"].items()})
    with torch.no_grad():
        assert rel_err(on["first"], ref(on["x"].double())) < 2e-5
    # A malformed cap is named in a warning (PyTorch's C++ warning, on stderr: the operator
    # call does not turn it into a Python warning), and the default applies.
    code = """
import sys, torch
sys.path.insert(0, %r)
from blockutil import make_block
m = make_block(3, 32, merge="concat", backend="cpp")
with torch.no_grad():
    y = m(torch.randn(8, 3, 128, 130))
del y
print(torch.ops.msfused._cpu_cache_idle_bytes())
""" % os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, MSFUSED_CPU_OUTPUT_CACHE_MB="64MB"))
    assert out.returncode == 0, out.stderr
    assert "MSFUSED_CPU_OUTPUT_CACHE_MB='64MB' is not a whole number of MiB" in out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) >= y_bytes
    ref = make_block(64, 32, merge="concat", activation="silu", dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in on["state_t"].items()})
    xt = on["xt"].double().requires_grad_(True)
    yt = ref(xt)
    yt.backward(torch.ones_like(yt))
    assert rel_err(on["grads"]["y"], yt.detach()) < 2e-5
    assert rel_err(on["grads"]["x"], xt.grad) < 2e-5
    for k, p in ref.named_parameters():
        assert rel_err(on["grads"][k], p.grad) < 2e-5, k


# ---- SPEC section 4: malformed input raises ValueError/TypeError naming the argument ----

def _ok_args(c=4, n=3, merge="concat", stride=1, dtype=torch.float32, device="cpu"):
    m = make_block(c, n, merge=merge, stride=stride, dtype=dtype, device=device)
    return torch.randn(2, c, 6, 5, dtype=dtype, device=device), m.params()


BAD_CALLS = {
    "rank3": (lambda x, p: (x[0], p, {}), ValueError, "x"),
    "rank5": (lambda x, p: (x[None], p, {}), ValueError, "x"),
    "channels": (lambda x, p: (torch.randn(2, 5, 6, 5), p, {}), ValueError, "channels"),
    "zero_batch": (lambda x, p: (x[:0], p, {}), ValueError, "x"),
    "zero_width": (lambda x, p: (x[..., :0], p, {}), ValueError, "x"),
    "int_input": (lambda x, p: (x.long(), p, {}), TypeError, "x"),
    "not_tensor": (lambda x, p: (x.tolist(), p, {}), TypeError, "x"),
    "weight_dtype": (lambda x, p: (x, p._replace(pa=p.pa.double()), {}), TypeError, "pa"),
    "bias_dtype": (lambda x, p: (x, p._replace(ba=p.ba.half()), {}), TypeError, "ba"),
    "weight_shape": (lambda x, p: (x, p._replace(wc=p.wc[:, :, :2]), {}), ValueError, "wc"),
    "pointwise_mismatch": (lambda x, p: (x, p._replace(pb=p.pb[:2]), {}), ValueError, "pb"),
    "bias_shape": (lambda x, p: (x, p._replace(qa=p.qa[:1]), {}), ValueError, "qa"),
    "missing_projection": (lambda x, p: (x, p._replace(ws=None, bs=None), {}), ValueError, "ws"),
    "stride3": (lambda x, p: (x, p, {"stride": 3}), ValueError, "stride"),
    "stride_float": (lambda x, p: (x, p, {"stride": 1.0}), TypeError, "stride"),
    "merge_name": (lambda x, p: (x, p, {"merge": "mul"}), ValueError, "merge"),
    "act_name": (lambda x, p: (x, p, {"activation": "gelu"}), ValueError, "activation"),
    "act_type": (lambda x, p: (x, p, {"activation": 1}), TypeError, "activation"),
    "residual_type": (lambda x, p: (x, p, {"residual": "yes"}), TypeError, "residual"),
    "backend_name": (lambda x, p: (x, p, {"backend": "fpga"}), ValueError, "backend"),
    "zero_n": (lambda x, p: (x, p._replace(pa=p.pa[:0], pb=p.pb[:0], qa=p.qa[:0], qb=p.qb[:0],
                                           ws=p.ws[:0], bs=p.bs[:0]), {}), ValueError, "pa"),
    "unexpected_projection": (lambda x, p: (x, p, {"residual": False}), ValueError, "ws"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_functional(backend, case):
    dev = backend_device(backend)
    make, exc, name = BAD_CALLS[case]
    x, p = _ok_args(device=dev)
    x, p, kw = make(x, p)
    kw.setdefault("backend", backend)
    with pytest.raises(exc, match=name):
        msfused.multiscale_separable_block(x, p, **kw)


def test_bad_device_mix():
    if not torch.cuda.is_available():
        pytest.skip("no GPU: devices cannot be mixed on this machine")
    x, p = _ok_args()
    with pytest.raises(ValueError, match="pa"):
        msfused.multiscale_separable_block(x, p._replace(pa=p.pa.cuda()))


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(in_channels=0, n=4), ValueError, "in_channels"),
    (dict(in_channels=4, n=-1), ValueError, "n"),
    (dict(in_channels=4.5, n=4), TypeError, "in_channels"),
    (dict(in_channels=float("inf"), n=4), ValueError, "in_channels"),
    (dict(in_channels=4, n=float("nan")), ValueError, "n"),
    (dict(in_channels=True, n=4), TypeError, "in_channels"),
    (dict(in_channels=4, n=4, stride=0), ValueError, "stride"),
    (dict(in_channels=4, n=4, merge="sum"), ValueError, "merge"),
    (dict(in_channels=4, n=4, activation="tanh"), ValueError, "activation"),
    (dict(in_channels=4, n=4, backend="tpu"), ValueError, "backend"),
    (dict(in_channels=4, n=4, bias="no"), TypeError, "bias"),
])
def test_bad_module_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        msfused.MultiScaleSeparableBlock(**kwargs)


def test_module_rejects_wrong_input(backend):
    dev = backend_device(backend)
    m = make_block(4, 3, backend=backend, device=dev)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 3, 5, 5, device=dev))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(4, 5, 5, device=dev))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(1, 4, 5, 5, device=dev, dtype=torch.float64 if m.dw_a.weight.dtype == torch.float32 else torch.float32))


# The same inputs through a direct operator call (codes, not names; every fused backend).
# Each: (x, params, stride, merge, act, residual) -> the bad variant, exception, argument.
OP_BAD_CALLS = {
    "rank3": (lambda x, p, c: (x[0], p, c), ValueError, "x"),
    "rank5": (lambda x, p, c: (x[None], p, c), ValueError, "x"),
    "channels": (lambda x, p, c: (x.new_zeros(2, 5, 6, 5), p, c), ValueError, "channels"),
    "zero_batch": (lambda x, p, c: (x[:0], p, c), ValueError, "x"),
    "zero_width": (lambda x, p, c: (x[..., :0], p, c), ValueError, "x"),
    "int_input": (lambda x, p, c: (x.long(), BlockParams(*[t.long() for t in p]), c), TypeError, "x"),
    "weight_dtype": (lambda x, p, c: (x, p._replace(pa=p.pa.double()), c), TypeError, "pa"),
    "bias_dtype": (lambda x, p, c: (x, p._replace(ba=p.ba.half()), c), TypeError, "ba"),
    "weight_shape": (lambda x, p, c: (x, p._replace(wc=p.wc[:, :, :2]), c), ValueError, "wc"),
    "pointwise_mismatch": (lambda x, p, c: (x, p._replace(pb=p.pb[:2]), c), ValueError, "pb"),
    "bias_shape": (lambda x, p, c: (x, p._replace(qa=p.qa[:1]), c), ValueError, "qa"),
    "missing_projection": (lambda x, p, c: (x, p._replace(ws=None, bs=None), c), ValueError, "ws"),
    "unexpected_projection": (lambda x, p, c: (x, p, (*c[:3], False)), ValueError, "ws"),
    "zero_n": (lambda x, p, c: (x, p._replace(pa=p.pa[:0], pb=p.pb[:0], qa=p.qa[:0], qb=p.qb[:0],
                                              ws=p.ws[:0], bs=p.bs[:0]), c), ValueError, "pa"),
    "stride3": (lambda x, p, c: (x, p, (3, *c[1:])), ValueError, "stride"),
    "stride0": (lambda x, p, c: (x, p, (0, *c[1:])), ValueError, "stride"),
    "merge_code": (lambda x, p, c: (x, p, (c[0], 7, *c[2:])), ValueError, "merge"),
    "act_code": (lambda x, p, c: (x, p, (*c[:2], 9, c[3])), ValueError, "act"),
    "act_negative": (lambda x, p, c: (x, p, (*c[:2], -1, c[3])), ValueError, "act"),
}


def _ops_of(backend):
    ops = get_backend(backend).ops
    assert ops is not None, f"backend {backend} has no operators"
    return ops


@pytest.mark.parametrize("case", sorted(OP_BAD_CALLS))
def test_bad_input_direct_op_call(fused_backend, case):
    """Callers of torch.ops.msfused.* get the same clear errors, never a crash or a
    RuntimeError: the forward and the backward operator of every fused backend."""
    dev = backend_device(fused_backend)
    ops = _ops_of(fused_backend)
    x, p = _ok_args(device=dev)
    p = BlockParams(*[t.detach() for t in p])
    make, exc, name = OP_BAD_CALLS[case]
    cfg = (1, 0, 1, True)  # stride 1, concat, relu, residual (C=4 -> 6: a projection)
    bx, bp, bc = make(x, p, cfg)
    with pytest.raises(exc, match=name):
        ops.forward(bx, *bp, *bc, False)
    y = ops.forward(x, *p, *cfg, False)[0]
    with pytest.raises(exc, match=name):
        ops.backward(torch.ones_like(y), bx, y, *bp, *bc)


BWD_BAD_CALLS = {
    "grad_y_shape": (lambda gy, sv: (gy[:, :1], sv), ValueError, "grad_y"),
    "grad_y_dtype": (lambda gy, sv: (gy.double(), sv), TypeError, "grad_y"),
    "saved_shape": (lambda gy, sv: (gy, sv[:1]), ValueError, "saved"),
    "saved_dtype": (lambda gy, sv: (gy, sv.double()), TypeError, "saved"),
}


@pytest.mark.parametrize("case", sorted(BWD_BAD_CALLS))
def test_bad_backward_extras(fused_backend, case):
    dev = backend_device(fused_backend)
    ops = _ops_of(fused_backend)
    x, p = _ok_args(device=dev)
    p = BlockParams(*[t.detach() for t in p])
    cfg = (1, 0, 1, True)
    y = ops.forward(x, *p, *cfg, False)[0]
    make, exc, name = BWD_BAD_CALLS[case]
    gy, sv = make(torch.ones_like(y), y)
    with pytest.raises(exc, match=name):
        ops.backward(gy, x, sv, *p, *cfg)


@pytest.mark.parametrize("case", ["rank3", "rank5", "channels", "zero_batch", "zero_width",
                                  "int_input", "not_tensor"])
def test_bad_input_module(backend, case):
    """The module checks nothing of x in Python for the C++ backends: the operator does."""
    dev = backend_device(backend)
    m = make_block(4, 3, backend=backend, device=dev)
    make, exc, name = BAD_CALLS[case]
    x, _ = _ok_args(device=dev)
    bad = make(x, m.params())[0]
    with pytest.raises(exc, match=name):
        m(bad)


def test_ops_check_their_arguments_directly():
    """A few direct calls spelled out, with the messages users see."""
    require("cpp")
    x, p = _ok_args()
    op = torch.ops.msfused.block_forward
    with pytest.raises(ValueError, match="stride: expected 1 or 2, got 3"):
        op(x, *p, 3, 0, 1, True, False)
    with pytest.raises(ValueError, match=r"merge: expected 0 \(concat\) or 1 \(add\), got 7"):
        op(x, *p, 1, 7, 1, True, False)
    with pytest.raises(ValueError, match="act: expected one of 0 none, 1 relu, 2 relu6, 3 silu"):
        op(x, *p, 1, 0, 4, True, False)
    with pytest.raises(ValueError, match=r"x: expected 4 channels \(the weights' in_channels\)"):
        op(torch.randn(2, 5, 6, 5), *p, 1, 0, 1, True, False)
    with pytest.raises(ValueError, match=r"pa: expected at least one output channel \(N >= 1\)"):
        op(x, *p._replace(pa=p.pa[:0], pb=p.pb[:0], qa=p.qa[:0], qb=p.qb[:0], ws=p.ws[:0],
                          bs=p.bs[:0]), 1, 0, 1, True, False)
    with pytest.raises(TypeError, match="float32, float64, bfloat16 and float16, got Int"):
        op(x.int(), *[t.int() if t is not None else None for t in p], 1, 0, 1, True, False)
    y16, _ = op(x.half(), *[t.half() if t is not None else None for t in p], 1, 0, 1, True, False)
    assert y16.dtype == torch.float16  # computed in float32 inside the op


def test_triton_ops_refuse_cpu_tensors_without_the_interpreter():
    """No silent fall-back: a CPU tensor handed to the Triton operators outside
    TRITON_INTERPRET=1 is a ValueError naming x (the ops exist whenever Triton imports)."""
    pytest.importorskip("triton")
    code = """
import torch, msfused, sys
sys.path.insert(0, %r)
from blockutil import make_block
m = make_block(4, 3)
x = torch.randn(2, 4, 6, 5)
try:
    torch.ops.msfused.triton_block_forward(x, *m.params(), 1, 0, 1, True, False)
except ValueError as e:
    print("ValueError", e)
""" % os.path.dirname(__file__)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ValueError x: the triton kernels run on CUDA tensors"), out.stdout


def test_double_backward_says_it_is_not_supported():
    require("cpp")
    m = make_block(4, 3, backend="cpp", dtype=torch.float64)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
