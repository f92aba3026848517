"""The `reference` backend: pure torch.nn.functional, any device, float64-capable."""
from ..reference import block_reference
from ..validation import FLOAT_DTYPES
from .registry import Backend, register_backend

register_backend(Backend(
    name="reference",
    forward=block_reference,
    device_types=lambda: ("cpu", "cuda", "mps", "xpu", "meta"),
    dtypes=FLOAT_DTYPES,
    unavailable_reason=lambda: None,
    priority=-100,
    description="pure PyTorch (torch.nn.functional): the oracle",
))
