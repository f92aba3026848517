"""What lowering turns the fused forward operators into: torch.export's
`run_decompositions()` and the dynamo ONNX exporter (which runs it) see the block's math in
core ATen operators (depthwise and pointwise convolutions, cat or add, the activation), a
graph that every runtime knows and fuses in its own way; inference needs nothing else (the
pre-activation output is empty unless asked for).

Everywhere else the fused kernels stay: eager calls, torch.compile, and the un-decomposed
exported program, which keeps the fused operator.

How: a Python kernel at the forward operator's per-device Autograd keys. PyTorch's Python
dispatcher, which tracing turns on, consults such kernels (eager calls never do); while
`torch.compiler.is_exporting()` holds (the lowering pass) it traces the reference
decomposition, otherwise it hands the call to the operator's own autograd kernel. The
operator keeps no CompositeImplicitAutograd kernel: FakeTensorMode and proxy tracing would
then decompose it under torch.compile too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..activations import apply_act
from ..config import BlockConfig
from ..layout import memory_format_of
from ..params import BlockParams
from ..reference import block_preactivation

_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.AutogradCUDA)


def decomposed_forward(x: Tensor, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs, stride: int,
                       merge: int, act: int, residual: bool, save_preact: bool):
    """The forward operator's outputs, (y, pre-activation or empty), from
    torch.nn.functional: what lowering traces in place of the fused kernel."""
    m = block_preactivation(x, BlockParams(wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs),
                            BlockConfig(stride, merge, act, residual))
    fmt = memory_format_of(x)
    y = apply_act(m, act).contiguous(memory_format=fmt)
    return y, (m.contiguous(memory_format=fmt) if save_preact else x.new_empty((0,)))


def register_lowering(fwd: torch._ops.OpOverload, autograd_in_cpp: bool) -> None:
    """Lower `fwd` (a forward operator with the schema of csrc/ops.cpp) to
    decomposed_forward while exporting. autograd_in_cpp: the operator's autograd kernel is
    C++ and registered at the per-device keys (csrc/autograd.cpp), so it can be called by key;
    a Python-registered one is reached by calling the operator with the Python dispatcher off."""
    for key in _AUTOGRAD_KEYS:
        def kernel(*args, _key=key):
            if torch.compiler.is_exporting():
                return decomposed_forward(*args)
            if autograd_in_cpp:
                return fwd._op_dk(_key, *args)
            with torch._C._DisablePythonDispatcher():
                return fwd(*args)

        if key in fwd.py_kernels:
            del fwd.py_kernels[key]
        fwd.py_impl(key)(kernel)
