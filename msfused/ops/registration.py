"""One helper that registers a backend's pair of custom operators, whatever language their
kernels are in.

Every fused backend exposes the same two schemas (csrc/ops.cpp):

    <fwd>(x, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs, stride, merge, act, residual,
          save_preact) -> (y, preact)
    <bwd>(grad_y, x, saved, wa, ..., bs, stride, merge, act, residual) -> Tensor[13]

`register_block_ops` adds what the operators do not bring themselves: fake (shape-only)
kernels for torch.compile/export, autograd and autocast written in Python (the C++/CUDA
operators register both in C++; Python-defined ones, like the Triton operators, need
them here), the lowering to core ATen that run_decompositions() and the ONNX exporter
trace (msfused.ops.lowering), and returns a `BlockOps` that runs the block (the backend's
forward) and lists the calls torch.library.opcheck should check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import activations
from ..config import BlockConfig, out_channels, out_size
from ..layout import memory_format_of
from ..params import BlockParams
from . import autocast as autocast_mod
from .lowering import register_lowering


def _op(qualname: str):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def forward_fake(x, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs, stride, merge, act,
                 residual, save_preact):
    """Shapes, dtype and layout of the forward's outputs."""
    b, _, h, w = x.shape
    shape = (b, out_channels(pa.shape[0], merge), out_size(h, stride), out_size(w, stride))
    fmt = memory_format_of(x)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    pre = (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
           if save_preact else x.new_empty((0,)))
    return y, pre


def backward_fake(grad_y, x, saved, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs, stride,
                  merge, act, residual):
    """Shapes of the backward's 13 gradients (bias gradients always; dws/dbs empty
    without a projection)."""
    c, n = x.shape[1], pa.shape[0]
    c_out = out_channels(n, merge)
    empty = x.new_empty((0,))
    return [torch.empty_like(x, memory_format=memory_format_of(x)), torch.empty_like(wa),
            x.new_empty((c,)), torch.empty_like(wb), x.new_empty((c,)), torch.empty_like(wc),
            x.new_empty((c,)), torch.empty_like(pa), x.new_empty((n,)), torch.empty_like(pb),
            x.new_empty((n,)), empty if ws is None else torch.empty_like(ws),
            empty if ws is None else x.new_empty((c_out,))]


def _needs_grad(x: Tensor, p: BlockParams) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in p))


def _make_run(fwd, python_autograd: bool):
    """run(x, params, cfg) -> y through the forward operator `fwd`.

    Eager calls go straight to the operator's C++ entry point (`OpOverload._op`: what
    OpOverload.__call__ runs when no Python dispatch object is installed, minus a Python
    frame, ~0.5 us of a ~6 us call); torch.compile traces the OpOverload itself.
    """
    has_pyobj = hasattr(fwd, "_pyobj_dispatcher")  # PyTorch >= 2.13
    compiling = torch.compiler.is_dynamo_compiling

    def run(x: Tensor, p: BlockParams, cfg: BlockConfig) -> Tensor:
        # Python autograd saves only what the call asked for: ask for the pre-activation
        # when the activation's gradient reads it and a gradient will be taken (the C++
        # autograd keeps it by itself).
        save = (python_autograd and activations.saves(cfg.act) == "preact"
                and _needs_grad(x, p))
        if compiling() or (has_pyobj and fwd._pyobj_dispatcher is not None):
            return fwd(x, *p, *cfg.op_args, save)[0]
        return fwd._op(x, *p, *cfg.op_args, save)[0]
    return run


@dataclass(frozen=True)
class BlockOps:
    """A backend's forward and backward operators (OpOverloads), and `run`, the backend's
    forward: y = block(x), differentiable through the operators' autograd."""

    forward: torch._ops.OpOverload
    backward: torch._ops.OpOverload
    run: Callable[[Tensor, BlockParams, BlockConfig], Tensor]

    def opcheck_samples(self, x: Tensor, p: BlockParams, cfg: BlockConfig) -> list:
        """(op, args) pairs for torch.library.opcheck: the forward with and without the
        pre-activation output, and the backward on what the forward saves. The backward's
        inputs are detached: it has no derivative of its own (no double backward)."""
        tail = cfg.op_args
        samples = [(self.forward, (x, *p, *tail, False)), (self.forward, (x, *p, *tail, True))]
        with torch.no_grad():
            y, pre = self.forward(x, *p, *tail, True)
        saved = activations.saved_for_backward(cfg.act, y, pre)
        if saved is None:
            saved = x.new_empty((0,))
        gy = torch.randn_like(y)
        d = [None if t is None else t.detach() for t in (x, saved, *p)]
        samples.append((self.backward, (gy, *d, *tail)))
        return samples


def _setup_context(ctx, inputs, output):
    x, *params = inputs[:13]
    stride, merge, act, residual, _ = inputs[13:]
    y, pre = output
    ctx.save_for_backward(x, activations.saved_for_backward(act, y, pre), *params)
    ctx.config = (stride, merge, act, residual)
    ctx.mark_non_differentiable(pre)


def _make_backward(fwd, bwd):
    def backward(ctx, grad_y, _grad_pre):
        x, saved, *params = ctx.saved_tensors
        stride, merge, act, residual = ctx.config
        if activations.saves(act) == "preact" and (saved is None or saved.numel() == 0):
            # the forward was called with save_preact=False: one more launch recomputes it
            _, saved = fwd(x, *params, stride, merge, act, residual, True)
        if saved is None:
            saved = x.new_empty((0,))
        grads = bwd(grad_y, x, saved, *params, stride, merge, act, residual)
        # a weight the block does not have (a bias with bias=False, no projection) gets none
        out = [g if p is not None else None for g, p in zip(grads[1:], params)]
        return (grads[0], *out, None, None, None, None, None)
    return backward


def register_block_ops(forward: str, backward: str, *, fake: bool = False,
                       autograd: bool = False, autocast: bool = False) -> BlockOps:
    """Complete the registration of the operators `forward` and `backward` ("ns::name",
    already defined): fake kernels (fake=True), autograd in Python on the forward
    (autograd=True), CPU/CUDA Autocast kernels in Python on the forward (autocast=True),
    and always the forward's lowering for run_decompositions() and ONNX."""
    if fake:
        torch.library.register_fake(forward)(forward_fake)
        torch.library.register_fake(backward)(backward_fake)
    fwd, bwd = _op(forward), _op(backward)
    if autograd:
        torch.library.register_autograd(forward, _make_backward(fwd, bwd),
                                        setup_context=_setup_context)
    if autocast:
        autocast_mod.register(forward)
    register_lowering(fwd, autograd_in_cpp=not autograd)
    return BlockOps(fwd, bwd, _make_run(fwd, python_autograd=autograd))
