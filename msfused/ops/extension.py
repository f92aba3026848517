"""The C++/CUDA operators `msfused::block_forward` and `msfused::block_backward`, from the
compiled extension msfused._C. Their schemas, argument checks, kernels (CPU, CUDA),
autograd and autocast are all registered in C++ (csrc/); Python adds only the fake
(shape-only) kernels that torch.compile and torch.export trace with.

What the forward's autograd saves is x, the weights and only what the final activation's
gradient reads (msfused.activations: y for relu/relu6, the pre-activation for silu,
nothing for none); the backward recomputes a, b1, b from x.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .registration import BlockOps, register_block_ops

_LOAD_ERROR: Optional[str] = None
try:  # loads the library: schemas, kernels, autograd, autocast
    _C = importlib.import_module("msfused._C")
except ImportError as e:  # not built: `pip install --no-build-isolation -e .` compiles it
    _C = None
    _LOAD_ERROR = f"the C++ extension msfused._C is not built or does not load ({e})"


def load_error() -> Optional[str]:
    return _LOAD_ERROR


def _kernels_registered(dispatch_key: str) -> bool:
    return _C is not None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"msfused::{op}", dispatch_key)
        for op in ("block_forward", "block_backward"))


# Fixed once the library is loaded.
_HAS_KERNEL = {key: _kernels_registered(key) for key in ("CPU", "CUDA")}


def has_kernel(dispatch_key: str) -> bool:
    """Whether block_forward and block_backward have kernels for `dispatch_key` ("CPU", "CUDA")."""
    return _HAS_KERNEL.get(dispatch_key, False)


OPS: Optional[BlockOps] = (
    register_block_ops("msfused::block_forward", "msfused::block_backward", fake=True)
    if _C is not None else None)


def empty_cpu_cache() -> int:
    """Returns the idle blocks of the CPU op's output cache to the system, like
    torch.cuda.empty_cache() for the CUDA caching allocator; the bytes released (0 without
    the extension).

    The CPU op takes outputs of 32 MiB and more (y, the pre-activation, dx) from a cache of
    mapped blocks: glibc maps allocations that large fresh on every call, and faulting them
    in cost more than the kernels at some shapes. The cache holds only blocks no tensor uses,
    at most MSFUSED_CPU_OUTPUT_CACHE_MB MiB (default 128; 0 turns it off)."""
    return int(torch.ops.msfused._empty_cpu_cache()) if _C is not None else 0
