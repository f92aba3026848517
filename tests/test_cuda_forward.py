"""The float16/bfloat16 CUDA forward on a GPU (block_forward_mma.cu) as thread-block clusters
sharing each run of tiles (MSFUSED_CUDA_FWD_CLUSTER=1 with a forced tile, cluster and split:
MSFUSED_CUDA_FWD_TILE=THxTWxRUNxK{r,b}, both read once per process, hence a subprocess per
variant): the cluster kernel ran (its name in the profiler's kernel list) and y has the bits
of the default plan's. Needs a GPU; the emulator's version is
tests/test_cuda_emu.py::test_forward_clusters_keep_the_bits."""
import os
import subprocess
import sys

import pytest
import torch

import msfused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# Runs one forward and saves y and the names of the CUDA kernels it launched.
SCRIPT = r"""
import sys, torch, msfused
c, n, h, w, merge, dtype = eval(sys.argv[1])
dtype = getattr(torch, dtype)
torch.manual_seed(0)
m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, backend="cuda", device="cuda",
                                     dtype=dtype)
x = torch.randn(4, c, h, w, device="cuda", dtype=dtype).contiguous(
    memory_format=torch.channels_last)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    with torch.no_grad():
        y = m(x)
    torch.cuda.synchronize()
names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
torch.save([y.cpu(), names], sys.argv[2])
"""

# (C, N, H, W, merge, dtype): the cluster tiles to force, each splitting the rows (r) or the
# GEMM blocks (b)
CASES = [((128, 64, 28, 28, "concat", "bfloat16"), ("10x16x3x2r", "8x8x1x2b", "8x8x2x4r")),
         ((256, 128, 14, 14, "add", "bfloat16"), ("5x16x2x2b", "4x16x1x4r")),
         ((72, 40, 23, 9, "concat", "float16"), ("2x8x5x2b", "4x16x2x2r"))]


def _forward(case, path, tile=None):
    env = dict(os.environ)
    for knob in ("MSFUSED_CUDA_FWD_TILE", "MSFUSED_CUDA_FWD_CLUSTER", "MSFUSED_CUDA_FWD_XMAX"):
        env.pop(knob, None)
    if tile is not None:
        env.update(MSFUSED_CUDA_FWD_TILE=tile, MSFUSED_CUDA_FWD_CLUSTER="1")
    subprocess.run([sys.executable, "-c", SCRIPT, repr(case), str(path)], env=env, check=True)
    return torch.load(path)


def _cluster_kernels(names):
    """The 16-bit cluster kernel among the profiler's kernel names: template arguments TC and
    CL true, demangled or, should the profiler report the mangled name, as Lb1ELb1E."""
    return [k for k in names if "block_forward_mma_kernel" in k
            and ("true, true>" in k or "Lb1ELb1E" in k)]


@pytest.mark.parametrize("case,tiles", CASES, ids=lambda v: "-".join(map(str, v)))
def test_forward_clusters_keep_the_bits(case, tiles, tmp_path):
    if not msfused.available_backends()["cuda"].available:
        pytest.skip("cuda backend not built")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0 (the plan has none)")
    y0, names0 = _forward(case, tmp_path / "default.pt")
    assert any("block_forward_mma_kernel" in k for k in names0), names0  # (the profiler sees
    assert not _cluster_kernels(names0), names0                           # the kernels)
    for tile in tiles:
        y, names = _forward(case, tmp_path / f"{tile}.pt", tile)
        assert _cluster_kernels(names), (tile, names)
        assert torch.equal(y.view(torch.int16), y0.view(torch.int16)), (
            tile, (y.float() - y0.float()).abs().max())
