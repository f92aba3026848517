"""The CUDA kernels' source run on the CPU through tools/cuda_emu (g++, no GPU): the bfloat16
NHWC case that the H200 run flagged (add, stride 2, C=20, N=70, relu6, projection; 4.3e-2
against float64) is the kernels' rounding, not an indexing bug. Judged against float64 with
the relu6 derivative read off the kernel's bf16 output (see tools/cuda_emu/run_emu.py)."""
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "cuda_emu"))


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    import run_emu
    run_emu.LIB = str(tmp_path_factory.mktemp("emu") / "libmsfused_cuda_emu.so")
    return run_emu, run_emu.build()


def test_h200_bf16_nhwc_case(emu_lib):
    """(float16 and the other cases: python tools/cuda_emu/run_emu.py; CI time.)"""
    run_emu, lib = emu_lib
    dtype = torch.bfloat16
    errs, exact, eager = run_emu.run(lib, 20, 70, 11, 10, "add", 2, "relu6", True, True, dtype,
                                     True, 2)
    ok, text = run_emu.judge(dtype, errs, exact, eager)
    assert ok, text
