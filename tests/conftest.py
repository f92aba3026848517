"""Shared fixtures: which backends run here, and the devices they run on.

Every test that takes `backend` runs once per registered backend; a backend that cannot
run here is skipped with the reason available_backends() gives (e.g. "no GPU").

The triton backend under TRITON_INTERPRET=1 without a GPU runs its kernels in numpy, one
program after another (a 4 x 8 x 260 x 5 forward+backward takes minutes on 2 cores). There
the parametrised tests generate a documented subset of their cases for triton (see
`interpreter_subset` and each test's comment) that still covers every value of every
configuration dimension; MSFUSED_FULL_INTERPRETER=1 generates the full set there too. The
reference and cpp backends, and triton/cuda wherever a GPU runs them, always get every case.
"""
import os

# CI runs two xdist workers on two cores, each with torch's two OpenMP threads: libgomp's
# default spin-wait after every parallel region (the cpp tests run thousands of small ones)
# takes the core away from the other worker. Waiting passively measured tests/test_block.py
# at 225 s against 244 s (user time 289 against 320 s). Set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

import msfused  # noqa: E402
from msfused.backends import get_backend  # noqa: E402


def _float32_means_float32():
    """Reference comparisons on CUDA run with TF32 off: cuDNN's float32 convolutions (the
    reference's conv2d) and float32 matmuls default to TF32 (~1e-3 relative error), which
    would make the float32 tolerance meaningless there."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


_float32_means_float32()

ALL_BACKENDS = msfused.backend_names()
FUSED_BACKENDS = tuple(b for b in ALL_BACKENDS if b != "reference")


def backend_device(name: str) -> str:
    """The device a backend's tests run on: its first device type (cpu or cuda)."""
    types = get_backend(name).device_types
    if "cuda" in types and torch.cuda.is_available():
        return "cuda"
    return types[0]


# MSFUSED_FULL_INTERPRETER=1: the triton backend gets every case under the interpreter too.
FULL_INTERPRETER = os.environ.get("MSFUSED_FULL_INTERPRETER") == "1"


def interpreted(name: str) -> bool:
    """True when backend `name` runs its kernels in the Triton interpreter here (triton
    available, no GPU visible: TRITON_INTERPRET=1 on CPU tensors)."""
    return (name == "triton" and msfused.available_backends()[name].available
            and backend_device(name) == "cpu")


def interpreter_subset(name: str) -> bool:
    """True when the tests of backend `name` generate only their interpreter subset:
    triton in the interpreter, unless MSFUSED_FULL_INTERPRETER=1."""
    return interpreted(name) and not FULL_INTERPRETER


def backend_params(cases, ids, interpreter_ids=None, backends=ALL_BACKENDS):
    """pytest.param(backend, *case, id=f"{backend}-{case id}") for every backend and case,
    for parametrize("backend,...", ..., indirect=["backend"]) (the fixture still skips an
    unavailable backend with its reason). Where `interpreter_subset(backend)` holds and
    `interpreter_ids` is given, only the cases whose id is in it are generated: the others
    are not collected at all (neither run nor reported as skipped) for that backend."""
    ids = list(ids)
    assert len(ids) == len(cases) and len(set(ids)) == len(ids)
    if interpreter_ids is not None:
        unknown = set(interpreter_ids) - set(ids)
        assert not unknown, f"interpreter subset names unknown cases: {sorted(unknown)}"
    out = []
    for b in backends:
        subset = interpreter_ids is not None and interpreter_subset(b)
        for case, i in zip(cases, ids):
            if not subset or i in interpreter_ids:
                out.append(pytest.param(b, *case, id=f"{b}-{i}"))
    return out


def require(name: str) -> str:
    status = msfused.available_backends()[name]
    if not status.available:
        pytest.skip(f"backend {name!r} unavailable here: {status.reason}")
    return backend_device(name)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    require(request.param)
    return request.param


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    require(request.param)
    return request.param


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
    for name, st in msfused.available_backends().items():
        lines.append(f"msfused backend {name}: {st!r}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("TRITON_INTERPRET=1: triton kernels run on CPU tensors")
    if interpreted("triton"):
        lines.append("triton in the interpreter: " + (
            "every case (MSFUSED_FULL_INTERPRETER=1)" if FULL_INTERPRETER else
            "the documented interpreter subset of each parametrised test "
            "(MSFUSED_FULL_INTERPRETER=1 runs every case)"))
    return lines
