"""The `reference` backend: pure torch.nn.functional, any device, float64-capable."""
import torch

from ..reference import block_reference
from ..validation import FLOAT_DTYPES, check_block_inputs
from .registry import Backend, register_backend


def _run(x, p, cfg):
    if not torch.jit.is_tracing():  # (the TorchScript ONNX exporter traces shapes as tensors)
        check_block_inputs(x, p, cfg)  # the Python path's one validation (SPEC section 4)
    return block_reference(x, p, cfg)


register_backend(Backend(
    name="reference",
    run=_run,
    device_types=("cpu", "cuda", "mps", "xpu", "meta"),
    dtypes=FLOAT_DTYPES,
    unavailable_reason=None,
    priority=-100,
    description="pure PyTorch (torch.nn.functional): the oracle",
))
