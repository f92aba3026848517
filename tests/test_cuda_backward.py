"""The float16/bfloat16 CUDA backward on a GPU (block_backward_mma.cu, block_backward_dw.cu):
every gradient the same bits run to run, under torch.use_deterministic_algorithms(True), and
whatever split count the launch uses (MSFUSED_CUDA_BWD_SPLIT, read once per process: the
other split runs in a subprocess), and with launch 1 as thread-block clusters
(MSFUSED_CUDA_BWD_CLUSTER=1). Needs a GPU; the emulator's versions of these checks are
tests/test_cuda_emu.py::test_backward_weight_grads_do_not_depend_on_the_split and the
test_backward_*_cluster tests there."""
import os
import subprocess
import sys

import pytest
import torch

import msfused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

CASES = {"mnet-56-like": (64, 64, 28, 28, "add", 1), "concat-s2": (40, 24, 17, 13, "concat", 2)}

# Computes the gradients of one case and saves them (run here and in a subprocess).
SCRIPT = r"""
import sys, torch, msfused
c, n, h, w, merge, stride = eval(sys.argv[1])
torch.manual_seed(0)
m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride, backend="cuda",
                                     device="cuda", dtype=torch.bfloat16)
x = torch.randn(4, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(
    memory_format=torch.channels_last).requires_grad_(True)
y = m(x)
y.backward(torch.randn_like(y))
torch.save([x.grad.cpu()] + [p.grad.cpu() for p in m.parameters()], sys.argv[2])
"""


def _grads(case, path, split=None, cluster=None):
    env = dict(os.environ)
    for knob, value in (("MSFUSED_CUDA_BWD_SPLIT", split),
                        ("MSFUSED_CUDA_BWD_CLUSTER", cluster)):
        env.pop(knob, None)
        if value is not None:
            env[knob] = str(value)
    subprocess.run([sys.executable, "-c", SCRIPT, repr(case), str(path)], env=env, check=True)
    return torch.load(path)


def _same_bits(a, b):
    return all(torch.equal(u.view(torch.int16), v.view(torch.int16)) for u, v in zip(a, b))


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_bits_do_not_depend_on_the_split(name, tmp_path):
    if not msfused.available_backends()["cuda"].available:
        pytest.skip("cuda backend not built")
    case = CASES[name]
    default = _grads(case, tmp_path / "a.pt")
    again = _grads(case, tmp_path / "b.pt")
    one = _grads(case, tmp_path / "c.pt", split=1)
    assert _same_bits(default, again), "gradients differ run to run"
    assert _same_bits(default, one), "gradients depend on the split count"


def test_backward_under_deterministic_algorithms():
    if not msfused.available_backends()["cuda"].available:
        pytest.skip("cuda backend not built")
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        m = msfused.MultiScaleSeparableBlock(32, 32, backend="cuda", device="cuda",
                                             dtype=torch.bfloat16)
        x = torch.randn(2, 32, 20, 20, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        with torch.no_grad():
            gy = torch.randn_like(m(x))
        runs = []
        for _ in range(2):
            x.grad = None
            m.zero_grad()
            m(x).backward(gy)
            runs.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        assert _same_bits(runs[0], runs[1])
    finally:
        torch.use_deterministic_algorithms(old)


def test_clusters_sharing_gz_keep_the_bits(tmp_path):
    """paper-u3's block (four channel blocks cover each pixel): with clusters on they share gz
    over distributed shared memory (sm_90; elsewhere the plain launch runs), the same
    arithmetic, so the same bits."""
    if not msfused.available_backends()["cuda"].available:
        pytest.skip("cuda backend not built")
    case = (128, 128, 8, 8, "concat", 1)
    plain = _grads(case, tmp_path / "a.pt")
    shared = _grads(case, tmp_path / "b.pt", cluster=1)
    assert _same_bits(plain, shared), "sharing gz changed the gradients"


def test_clusters_summing_partials_do_not_depend_on_the_split(tmp_path):
    """One channel block (the mnet-56-like case): with clusters on, four CTAs along the groups
    sum their partials before writing one. The sums are grouped differently from the plain
    run's, so a gradient may move by a rounding of its largest element, not more, and the
    bits do not depend on the split."""
    if not msfused.available_backends()["cuda"].available:
        pytest.skip("cuda backend not built")
    case = CASES["mnet-56-like"]
    plain = _grads(case, tmp_path / "a.pt")
    summed = _grads(case, tmp_path / "b.pt", cluster=1)
    one = _grads(case, tmp_path / "c.pt", split=1, cluster=1)
    assert _same_bits(summed, one), "the cluster's sums depend on the split count"
    for a, b in zip(summed, plain):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2.0 ** -7 * scale + 1e-30
