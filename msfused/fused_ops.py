"""Python side of the C++/CUDA custom operators `msfused::block_forward` and
`msfused::block_backward` (schemas and CPU/CUDA kernels live in csrc/): fake kernels for
torch.compile/export, and autograd, which recomputes the branches in a fused backward
instead of saving them.

What the forward saves for backward is only what the final activation needs:
  relu, relu6 -> y (the derivative is read off the output), silu -> the pre-activation,
  none -> nothing. x and the weights are the block's inputs and are saved by reference.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import autocast
from .config import ACT_NONE, ACT_SILU, BlockConfig, out_channels, out_size
from .layout import memory_format_of
from .params import BlockParams

_LOAD_ERROR: Optional[str] = None
try:  # loads the library: schemas + CPU/CUDA kernels
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


# Fixed once the library is loaded; looked up (not queried) per call so that
# torch.compile traces the backend choice without a graph break.
_HAS_KERNEL = {key: _kernels_registered(key) for key in ("CPU", "CUDA")}


def has_kernel(dispatch_key: str) -> bool:
    """Whether block_forward and block_backward have kernels for `dispatch_key` ("CPU", "CUDA")."""
    return _HAS_KERNEL.get(dispatch_key, False)


def _saved_kind(act: int) -> str:
    return "none" if act == ACT_NONE else ("preact" if act == ACT_SILU else "output")


if _C is not None:
    @torch.library.register_fake("msfused::block_forward")
    def _block_forward_fake(x, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs,
                            stride, merge, act, residual, save_preact):
        b, _, h, w = x.shape
        shape = (b, out_channels(pa.shape[0], merge), out_size(h, stride), out_size(w, stride))
        fmt = memory_format_of(x)
        y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        pre = (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
               if save_preact else x.new_empty((0,)))
        return y, pre

    @torch.library.register_fake("msfused::block_backward")
    def _block_backward_fake(grad_y, x, saved, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs,
                             stride, merge, act, residual):
        c, n = x.shape[1], pa.shape[0]
        c_out = out_channels(n, merge)
        empty = x.new_empty((0,))
        return [torch.empty_like(x), torch.empty_like(wa), x.new_empty((c,)),
                torch.empty_like(wb), x.new_empty((c,)), torch.empty_like(wc), x.new_empty((c,)),
                torch.empty_like(pa), x.new_empty((n,)), torch.empty_like(pb), x.new_empty((n,)),
                empty if ws is None else torch.empty_like(ws),
                empty if ws is None else x.new_empty((c_out,))]

    def _setup_context(ctx, inputs, output):
        x, *params = inputs[:13]
        stride, merge, act, residual, _ = inputs[13:]
        y, pre = output
        kind = _saved_kind(act)
        saved = y if kind == "output" else (pre if kind == "preact" else None)
        ctx.save_for_backward(x, saved, *params)
        ctx.config = (stride, merge, act, residual)
        ctx.mark_non_differentiable(pre)

    def _backward(ctx, grad_y, _grad_pre):
        x, saved, *params = ctx.saved_tensors
        stride, merge, act, residual = ctx.config
        if saved is None:
            saved = x.new_empty((0,))
        if _saved_kind(act) == "preact" and saved.numel() == 0:
            # called with save_preact=False (a direct op call): recompute the pre-activation
            _, saved = torch.ops.msfused.block_forward(x, *params, stride, merge, act,
                                                       residual, True)
        grads = torch.ops.msfused.block_backward(grad_y, x, saved, *params,
                                                  stride, merge, act, residual)
        # biases / projection that the block does not have get no gradient
        out = [g if p is not None else None for g, p in zip(grads[1:], params)]
        return (grads[0], *out, None, None, None, None, None)

    torch.library.register_autograd("msfused::block_forward", _backward,
                                    setup_context=_setup_context)
    autocast.register("msfused::block_forward")


def fused_block(x: torch.Tensor, p: BlockParams, cfg: BlockConfig) -> torch.Tensor:
    """Run the block through the C++/CUDA fused operators (device picked by dispatch)."""
    x = x.contiguous(memory_format=memory_format_of(x))
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in p))
    y, _ = torch.ops.msfused.block_forward(
        x, *p, cfg.stride, cfg.merge, cfg.act, cfg.residual,
        bool(needs_grad and cfg.act == ACT_SILU))
    return y


def opcheck_samples(x: torch.Tensor, p: BlockParams, cfg: BlockConfig) -> list:
    """(op, args) pairs for torch.library.opcheck: the forward (saving the pre-activation
    or not) and the backward, on these inputs."""
    x = x.contiguous(memory_format=memory_format_of(x))
    tail = (cfg.stride, cfg.merge, cfg.act, cfg.residual)
    fwd = torch.ops.msfused.block_forward.default
    samples = [(fwd, (x, *p, *tail, False)), (fwd, (x, *p, *tail, True))]
    with torch.no_grad():
        y, pre = fwd(x, *p, *tail, True)
    saved = {"none": x.new_empty((0,)), "output": y, "preact": pre}[_saved_kind(cfg.act)]
    gy = torch.randn_like(y)
    samples.append((torch.ops.msfused.block_backward.default, (gy, x, saved, *p, *tail)))
    return samples
