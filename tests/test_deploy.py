"""Deployment: torch.export's run_decompositions() lowers the fused operators to core ATen,
and models built from the block export to ONNX (the dynamo exporter, and the TorchScript
one) as standard ONNX operators only, which ONNX Runtime runs to PyTorch's result. The
ONNX tests need the `onnx` extra (onnx, onnxscript, onnxruntime)."""
import copy
import io

import pytest
import torch

import msfused
from blockutil import make_block, rel_err
from conftest import FUSED_BACKENDS, backend_device, backend_params, require
from msfused.paper.models import PaperNet

# Every ONNX operator the block and the paper's networks lower to (default domain only).
STANDARD_OPS = {"Conv", "Concat", "Add", "Relu", "Clip", "Sigmoid", "Mul", "MaxPool", "Gemm",
                "Reshape", "Flatten", "Identity", "Constant", "MatMul", "Transpose", "Shape",
                "Gather", "Unsqueeze", "Cast", "ReduceMean", "GlobalAveragePool"}
OPSET = 18  # what the dynamo exporter of PyTorch 2.14 emits by default; the graph needs >= 11


def _model(backend, dev):
    return torch.nn.Sequential(
        make_block(6, 3, merge="concat", activation="relu", backend=backend, device=dev),
        make_block(6, 4, merge="add", stride=2, activation="silu", backend=backend, device=dev,
                   seed=1),
        make_block(4, 4, merge="add", activation="relu6", backend=backend, device=dev, seed=2)).eval()


def _targets(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def test_run_decompositions_lowers_to_core_aten(fused_backend):
    dev = backend_device(fused_backend)
    m = _model(fused_backend, dev)
    x = torch.randn(2, 6, 9, 7, device=dev)
    with torch.no_grad():
        y0 = m(x)
    ep = torch.export.export(m, (x,))
    op = str(msfused.backends.get_backend(fused_backend).ops.forward)
    assert _targets(ep).count(op) == 3, "the un-decomposed program keeps the fused op"
    low = ep.run_decompositions()
    assert not [t for t in _targets(low) if "msfused" in t], _targets(low)
    assert any("convolution" in t for t in _targets(low))
    with torch.no_grad():
        assert rel_err(low.module()(x), y0) < 1e-5
    # the lowering is for export only: eager and the original program still run fused
    with torch.no_grad():
        assert rel_err(ep.module()(x), y0) < 1e-6


def test_lowering_leaves_torch_compile_on_the_fused_op():
    """torch.compile traces with the Python dispatcher, where the lowering's kernels live:
    outside export they hand the call to the op's own autograd (no decomposition)."""
    require("cpp")
    m = make_block(6, 3, backend="cpp")
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    seen = []

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend=aot_autograd(fw_compiler=backend))
    cm(x).sum().backward()
    assert "msfused.block_forward.default" in seen, seen
    assert not any("convolution" in t for t in seen), seen


def _onnx_check(model, x, **export_kw):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        y0 = model(x)
    if export_kw.get("dynamo", True):
        proto = torch.onnx.export(model, (x,), dynamo=True, opset_version=OPSET).model_proto
    else:
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=OPSET)
        proto = onnx.load_from_string(buf.getvalue())
    nodes = {(n.domain, n.op_type) for n in proto.graph.node}
    assert all(d in ("", "ai.onnx") for d, _ in nodes), f"custom-domain nodes: {nodes}"
    assert {t for _, t in nodes} <= STANDARD_OPS, nodes
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    # ONNX Runtime on the CPU, whatever device the model was exported from
    out = sess.run(None, {sess.get_inputs()[0].name: x.cpu().numpy()})[0]
    assert rel_err(torch.from_numpy(out), y0) < 1e-5
    return {t for _, t in nodes}


# Triton in the interpreter: method 1 only (concat; 38-54 s per network there); both
# methods for cpp and wherever the triton kernels are compiled.
@pytest.mark.parametrize("fused_backend,method",
                         backend_params([("ms1",), ("ms2",)], ["ms1", "ms2"], {"ms1"},
                                        backends=FUSED_BACKENDS),
                         indirect=["fused_backend"])
def test_paper_network_exports_to_onnx(fused_backend, method):
    dev = backend_device(fused_backend)
    torch.manual_seed(0)
    m = PaperNet(method, in_channels=1, image_size=28, num_classes=10, backend=fused_backend,
                 dropout=0.0).to(dev).eval()
    ops = _onnx_check(m, torch.randn(2, 1, 28, 28, device=dev))
    assert "Conv" in ops and ("Concat" in ops) == (method == "ms1")


def test_every_activation_and_shortcut_exports_to_onnx():
    require("cpp")
    ops = _onnx_check(_model("cpp", "cpu"), torch.randn(2, 6, 9, 7))
    assert {"Relu", "Clip", "Sigmoid", "Mul", "Concat", "Add"} <= ops


def test_torchscript_onnx_exporter_works_too():
    require("cpp")
    _onnx_check(_model("cpp", "cpu"), torch.randn(2, 6, 9, 7), dynamo=False)


def test_fused_model_exports_to_onnx():
    """A hand-written model put through fuse_model exports like a model built from the
    block."""
    require("cpp")
    from test_fuse import HandNet
    torch.manual_seed(0)
    model = HandNet().eval()
    fused = msfused.fuse_model(copy.deepcopy(model), backend="cpp")
    assert any(isinstance(b, msfused.MultiScaleSeparableBlock) for b in fused.modules())
    x = torch.randn(2, 3, 11, 9)
    _onnx_check(fused, x)
