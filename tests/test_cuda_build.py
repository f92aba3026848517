"""The CUDA build, checked without a GPU: both operators have CUDA kernels registered and the
extension carries sm_90 machine code (what CI's TORCH_CUDA_ARCH_LIST=9.0 build produces)."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

import msfused
from msfused.ops import extension as fused_ops

OPS = ("block_forward", "block_backward")


def _built_with_cuda():
    if fused_ops.load_error():
        pytest.skip(f"extension not built: {fused_ops.load_error()}")
    if not fused_ops.has_kernel("CUDA"):
        pytest.skip("msfused._C was built without CUDA (no nvcc or a CPU-only torch at build time)")


def _cuobjdump():
    cands = [shutil.which("cuobjdump")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(os.path.join(os.environ[env], "bin", "cuobjdump"))
    cands.append("/usr/local/cuda/bin/cuobjdump")
    try:  # Triton's wheel bundles one
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def test_cuda_kernels_registered():
    _built_with_cuda()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"msfused::{op}", "CUDA"), op


def test_cuda_backend_listed():
    _built_with_cuda()
    st = msfused.available_backends()["cuda"]
    if not torch.cuda.is_available():
        assert not st.available and "GPU" in st.reason
    else:
        assert st.available, st.reason


def test_shared_object_has_sm90_code():
    _built_with_cuda()
    so = glob.glob(os.path.join(os.path.dirname(msfused.__file__), "_C*.so"))
    assert so, "msfused/_C*.so not found"
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or Triton's bundled copy)")
    out = subprocess.run([tool, "--list-elf", so[0]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sm_90" in out.stdout, f"no sm_90 cubin in {so[0]}:\n{out.stdout}"
    for kernel in ("block_forward", "block_backward"):
        assert kernel in out.stdout


def test_no_local_memory_in_float32_kernels():
    """The float32 forward/backward kernels should not spill to local memory."""
    _built_with_cuda()
    so = glob.glob(os.path.join(os.path.dirname(msfused.__file__), "_C*.so"))
    tool = _cuobjdump()
    if tool is None or not so:
        pytest.skip("cuobjdump or the shared object not found")
    out = subprocess.run([tool, "-res-usage", so[0]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    checked = 0
    for i, line in enumerate(lines):
        if "Function" in line and ("IfE" in line or "IfLi" in line) and i + 1 < len(lines):
            res = lines[i + 1]
            if "LOCAL:" in res:
                checked += 1
                assert "LOCAL:0" in res, f"{line}\n{res}"
    assert checked > 0
