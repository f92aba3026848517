"""The custom operators themselves: float64 gradcheck through every fused backend, and
torch.library.opcheck (schema, fake kernel, autograd registration) on every op.

Triton in the interpreter (TRITON_INTERPRET=1, no GPU) gets opcheck on INTERPRETER_OPCHECK
only (the other cases are not generated for it there); MSFUSED_FULL_INTERPRETER=1 runs all."""
import itertools

import pytest
import torch

import msfused
from blockutil import make_block
from conftest import FUSED_BACKENDS, backend_device, backend_params
from msfused.backends import get_backend
from msfused.config import make_config


@pytest.mark.parametrize("merge,act,residual,stride", [
    ("concat", "relu", True, 1), ("add", "silu", True, 2), ("concat", "relu6", False, 2),
    ("add", "none", True, 1), ("concat", "silu", True, 1), ("add", "relu", False, 1)])
def test_gradcheck_float64(fused_backend, merge, act, residual, stride):
    b = get_backend(fused_backend)
    if torch.float64 not in b.dtypes:
        pytest.skip(f"{fused_backend} has no float64 kernels (gradcheck needs float64)")
    dev = backend_device(fused_backend)
    # C=3, N=2 and odd sizes; relu kinks are avoided with probability 1 by random data
    m = make_block(3, 2, merge=merge, stride=stride, activation=act, residual=residual,
                   backend=fused_backend, dtype=torch.float64, device=dev)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=dev, requires_grad=True)
    params = [p for p in m.params() if p is not None]

    def f(x, *ps):
        it = iter(ps)
        full = [None if p is None else next(it) for p in m.params()]
        return msfused.multiscale_separable_block(
            x, full, stride=stride, merge=merge, activation=act, residual=residual,
            backend=fused_backend)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


OPCHECK_CASES = list(itertools.product(("concat", "add"), ("relu", "silu", "none"), (1, 2),
                                       (False, True)))
OPCHECK_IDS = [f"{m}-{a}-{s}-{cl}" for m, a, s, cl in OPCHECK_CASES]


# Under TRITON_INTERPRET=1 one opcheck of the triton ops takes ~30 s on 2 cores; there only
# these cases are generated for triton (both merges, strides, layouts, a saved-output, a
# saved-pre-activation and an identity activation; conftest.interpreter_subset), the full
# list wherever the kernels are compiled (GPU) and under MSFUSED_FULL_INTERPRETER=1.
INTERPRETER_OPCHECK = {"concat-relu-2-True", "add-silu-1-False", "add-none-2-False"}


@pytest.mark.parametrize("fused_backend,merge,act,stride,channels_last",
                         backend_params(OPCHECK_CASES, OPCHECK_IDS, INTERPRETER_OPCHECK,
                                        backends=FUSED_BACKENDS),
                         indirect=["fused_backend"])
def test_opcheck(fused_backend, merge, act, stride, channels_last):
    b = get_backend(fused_backend)
    if b.ops is None:
        pytest.fail(f"backend {fused_backend} registers no operators")
    dev = backend_device(fused_backend)
    dtype = torch.float64 if torch.float64 in b.dtypes else torch.float32
    m = make_block(4, 3, merge=merge, stride=stride, activation=act, backend=fused_backend,
                   dtype=dtype, device=dev)
    for p in m.parameters():
        p.requires_grad_(True)
    x = torch.randn(2, 4, 5, 6, dtype=dtype, device=dev, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    cfg = make_config(stride, merge, act, True)
    for op, args in b.ops.opcheck_samples(x, m.params(), cfg):
        torch.library.opcheck(op, args)
