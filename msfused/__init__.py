"""msfused: the multi-scale separable block (depthwise 3x3 || stacked depthwise 3x3 ->
pointwise 1x1 -> concat/add -> residual) as fused CPU, CUDA and Triton kernels."""
from .backends import BackendUnavailableError, available_backends, backend_names
from .config import ACTIVATIONS, MERGES, BlockConfig
from .convert import convert
from .functional import backend_for, multiscale_separable_block
from .fuse import FuseReport, Swap, fuse_model
from .modules import MultiScaleSeparableBlock
from .ops.extension import empty_cpu_cache
from .params import BlockParams
from .reference import block_reference

__version__ = "0.1.0"

__all__ = ["MultiScaleSeparableBlock", "multiscale_separable_block", "available_backends",
           "backend_names", "backend_for", "BackendUnavailableError", "BlockParams",
           "BlockConfig", "block_reference", "MERGES", "ACTIVATIONS", "fuse_model",
           "FuseReport", "Swap", "convert", "empty_cpu_cache"]
