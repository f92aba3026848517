"""torch.compile(fullgraph=True) and torch.export over models built from the block, for
every fused backend that runs here: no graph break, the fused op in the graph, outputs
and gradients equal to eager.

Inductor compiles for the backend's device; under TRITON_INTERPRET=1 the triton ops are
opaque custom ops (msfused.triton_ops) and the CPU graph goes through aot_eager."""
import os
import subprocess
import sys

import pytest
import torch

from blockutil import make_block, rel_err, run_fwd_bwd
from conftest import FUSED_BACKENDS, backend_device, backend_params
from msfused.backends import get_backend


def _model(backend, dev, dtype=torch.float32):
    return torch.nn.Sequential(
        make_block(6, 3, merge="concat", activation="relu", backend=backend, device=dev,
                   dtype=dtype),
        torch.nn.ReLU(),
        make_block(6, 4, merge="add", stride=2, activation="silu", backend=backend,
                   device=dev, dtype=dtype, seed=1))


def _compiler(backend, dev):
    if backend == "triton" and dev == "cpu":
        return "aot_eager"
    return "inductor"


# Triton in the interpreter: channels_last only (the layout the kernels are tuned for; the
# NCHW one took another 35 s there); every layout wherever the kernels are compiled.
@pytest.mark.parametrize("fused_backend,channels_last",
                         backend_params([(False,), (True,)], ["nchw", "nhwc"], {"nhwc"},
                                        backends=FUSED_BACKENDS),
                         indirect=["fused_backend"])
def test_compile_fullgraph(fused_backend, channels_last):
    dev = backend_device(fused_backend)
    m = _model(fused_backend, dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 9, 7, device=dev).contiguous(memory_format=fmt)
    gy = torch.randn(2, 4, 5, 4, device=dev).contiguous(memory_format=fmt)
    y0, dx0, g0 = run_fwd_bwd(m, x, gy)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend=_compiler(fused_backend, dev))
    y, dx, g = run_fwd_bwd(cm, x, gy)
    g = {k.removeprefix("_orig_mod."): v for k, v in g.items()}
    assert rel_err(y, y0) < 1e-5 and rel_err(dx, dx0) < 1e-5
    for k in g0:
        assert rel_err(g[k], g0[k]) < 1e-5, k
    assert y.is_contiguous(memory_format=fmt)


def test_compile_explain_no_graph_break(fused_backend):
    dev = backend_device(fused_backend)
    m = _model(fused_backend, dev)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(m)(torch.randn(1, 6, 5, 5, device=dev))
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


def test_export_runs_and_matches(fused_backend):
    dev = backend_device(fused_backend)
    m = _model(fused_backend, dev).eval()
    x = torch.randn(2, 6, 9, 7, device=dev)
    with torch.no_grad():
        y0 = m(x)
    ep = torch.export.export(m, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    op = str(get_backend(fused_backend).ops.forward)  # e.g. msfused.block_forward.default
    assert sum(t == op for t in targets) == 2, (op, targets)
    with torch.no_grad():
        y = ep.module()(x)
        y2 = ep.module()(torch.randn(2, 6, 9, 7, device=dev))
    assert rel_err(y, y0) < 1e-6
    assert y2.shape == y0.shape


def test_export_save_load_roundtrip(fused_backend, tmp_path):
    """An exported program with the fused op survives torch.export.save/load (the op is
    found again by name when msfused is imported)."""
    dev = backend_device(fused_backend)
    m = _model(fused_backend, dev).eval()
    x = torch.randn(1, 6, 8, 8, device=dev)
    ep = torch.export.export(m, (x,))
    path = os.path.join(tmp_path, "block.pt2")
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        assert rel_err(loaded.module()(x), m(x)) < 1e-6


def test_fresh_process_loads_the_exported_program(fused_backend, tmp_path):
    """A process that only imports msfused finds the backend's operator (the Triton ones
    too: they are defined at import) and runs a saved exported program."""
    dev = backend_device(fused_backend)
    m = _model(fused_backend, dev).eval()
    x = torch.randn(1, 6, 8, 8, device=dev)
    with torch.no_grad():
        y = m(x)
    torch.export.save(torch.export.export(m, (x,)), os.path.join(tmp_path, "block.pt2"))
    torch.save((x.cpu(), y.cpu()), os.path.join(tmp_path, "xy.pt"))
    code = f"""
import os, torch, msfused
ep = torch.export.load(os.path.join({str(tmp_path)!r}, "block.pt2"))
x, y = torch.load(os.path.join({str(tmp_path)!r}, "xy.pt"))
with torch.no_grad():
    out = ep.module()(x.to({dev!r})).cpu()
print(((out - y).norm() / y.norm()).item())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-6
