"""The CUDA build, checked without a GPU: both operators have CUDA kernels registered and the
extension carries sm_90 machine code (what CI's TORCH_CUDA_ARCH_LIST=9.0 build produces)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import msfused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_sass  # noqa: E402  (tools/cuda_sass.py: cuobjdump and the SASS counts)
from msfused.ops import extension as fused_ops

# One xdist worker runs this file (pyproject: --dist loadgroup): the SASS tests then share one
# cuobjdump of the extension (tools/cuda_sass.py caches it per process).
pytestmark = pytest.mark.xdist_group("cuda_sass")

OPS = ("block_forward", "block_backward")


def _built_with_cuda():
    if fused_ops.load_error():
        pytest.skip(f"extension not built: {fused_ops.load_error()}")
    if not fused_ops.has_kernel("CUDA"):
        pytest.skip("msfused._C was built without CUDA (no nvcc or a CPU-only torch at build time)")


def _cuobjdump():
    return cuda_sass.cuobjdump()


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


def test_no_kernel_spills():
    """No kernel of the extension, any dtype, touches local memory: no spills (LDL / STL in
    the SASS; cuobjdump's LOCAL resource stays 0 for a few spilled registers, so the SASS is
    what is read). The FMA kernels' launch bounds keep ptxas from trading a spill for
    occupancy (block_forward.cu, block_backward.cu)."""
    _built_with_cuda()
    tool, so = cuda_sass.cuobjdump(), cuda_sass.shared_object()
    if tool is None or so is None:
        pytest.skip("cuobjdump or the shared object not found")
    ks = cuda_sass.kernels(so, tool)
    assert len(ks) >= 40, sorted(ks)
    bad = {cuda_sass.demangle_short(n): r for n, r in ks.items()
           if r["local"] or r["LDL"] or r["STL"]}
    assert not bad, bad


def _nvcc():
    for c in [shutil.which("nvcc")] + [os.path.join(os.environ[e], "bin", "nvcc")
                                       for e in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(e)] \
            + ["/usr/local/cuda/bin/nvcc"]:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def test_ptx_wrappers_compile_to_tensor_core_sass(tmp_path):
    """csrc/cuda/ptx_wrappers.cuh, built for sm_90 through the probe kernel the emulator runs:
    the PTX strings become the instructions they are meant to (bf16 and fp16 mma.sync m16n8k16
    with float accumulators, ldmatrix x4/x2 and .trans, 16-byte cp.async with zero-fill, the
    cluster barrier's arrive and wait)."""
    nvcc, tool = _nvcc(), _cuobjdump()
    if nvcc is None or tool is None:
        pytest.skip("needs nvcc and cuobjdump")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cubin = str(tmp_path / "probe.cubin")
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-cubin",
                    "-I" + os.path.join(root, "csrc", "cuda"), "-I" + os.path.join(root, "csrc"),
                    os.path.join(root, "tools", "cuda_emu", "probes", "ptx_probe.cu"),
                    "-o", cubin], check=True, capture_output=True, timeout=300)
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True,
                          timeout=120).stdout
    for instr in ("HMMA.16816.F32.BF16", "HMMA.16816.F32 ", "LDSM.16.M88.4", "LDSM.16.MT88.2",
                  "LDSM.16.M88.2", "LDGSTS.E.BYPASS.128",
                  "UCGABAR_ARV", "UCGABAR_WAIT"):  # the cluster barrier (cluster_probe)
        assert instr in sass, f"{instr.strip()} not in the probe's SASS"


def test_tensor_core_kernels_build_for_sm80(tmp_path):
    """A user's `pip install -e .` builds for sm_80, 86 and 89 as well (setup.py's default
    TORCH_CUDA_ARCH_LIST), CI's build for sm_90 only: the tensor-core kernels' sources must
    compile for sm_80 too (the sm_90-only instructions, griddepcontrol, behind their guards)
    and spill nothing there. The three files build side by side (~40 s on 2 cores)."""
    nvcc, tool = _nvcc(), _cuobjdump()
    if nvcc is None or tool is None:
        pytest.skip("needs nvcc and cuobjdump")
    flags = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-arch=sm_80", "-cubin",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-I" + os.path.join(ROOT, "csrc", "cuda"),
             "-I" + os.path.join(ROOT, "csrc")]
    jobs = {}
    for name in ("block_forward_mma", "block_backward_mma", "block_backward_dw"):
        cubin = str(tmp_path / f"{name}.cubin")
        jobs[name] = (cubin, subprocess.Popen(
            [nvcc, *flags, os.path.join(ROOT, "csrc", "cuda", f"{name}.cu"), "-o", cubin],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for name, (cubin, proc) in jobs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}.cu for sm_80:\n{out[-3000:]}"
        res = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True,
                             timeout=120).stdout
        kernels = [line for line in res.splitlines() if "REG:" in line]
        assert kernels and all("LOCAL:0" in line for line in kernels), (name, res[-2000:])


def _template_args(short):
    return short[short.index("<") + 1:-1].split(", ")


def _gemm_ops(short, tc):
    """The GEMM instructions a forward/backward instantiation must contain: HMMA on tensor
    cores (fed by LDSM in the 16-bit ones), float32 FMAs and no HMMA in float32's exact
    variant (template argument TC, `tc`, "false"), float64 FMAs and no HMMA in float64's."""
    if tc == "false":
        return ("DFMA" if "double," in short else "FFMA",), ("HMMA",)
    return ("HMMA",) + (() if "float," in short else ("LDSM",)), ()


def test_tensor_core_forward_sass():
    """Every instantiation of the one-launch forward (block_forward_mma.cu: float16, bfloat16,
    float32 on TF32, float32 on FMAs where TF32 is not allowed, and float64) runs its GEMM on
    tensor cores (HMMA, fed by ldmatrix (LDSM) in the 16-bit ones) or, the exact float32 one,
    on FFMA without HMMA (float64: DFMA); stages x and the weights with 16-byte cp.async
    (LDGSTS .128), writes y with 16-byte stores, and keeps everything in registers (no local
    memory) within 128 per thread, the two CTAs per SM that the tile plan assumes
    (csrc/cuda/forward_mma_plan.h; float64, gradcheck's dtype, within 255: one CTA per SM).
    The 16-bit ones come twice, without and with thread-block clusters (the kernel's CL:
    cluster barriers in the second only). The table: python tools/cuda_sass.py forward_mma."""
    _built_with_cuda()
    tool, so = cuda_sass.cuobjdump(), cuda_sass.shared_object()
    if tool is None or so is None:
        pytest.skip("cuobjdump or the shared object not found")
    ks = cuda_sass.kernels(so, tool, "block_forward_mma_kernel")
    # ({bfloat16, half, float} on tensor cores + {float, double} on FMAs + {bfloat16, half} as
    # clusters) x stride {1, 2} x width {8, 16}
    assert len(ks) == 28, sorted(ks)
    clustered = 0
    for name, r in ks.items():
        short = cuda_sass.demangle_short(name)
        assert r["local"] == 0 and r["LDL"] == 0 and r["STL"] == 0, (short, r)
        assert r["regs"] <= (255 if "double," in short else 128), (short, r)
        _, _, _, tc, cl = _template_args(short)  # <T, S, TW, TC, CL>
        need, absent = _gemm_ops(short, tc)
        # (GDWAIT, GDLAUNCH: programmatic dependent launch, csrc/cuda/common.cuh)
        for op in need + ("LDGSTS128", "STG128", "GDWAIT", "GDLAUNCH"):
            assert r[op] > 0, (short, op, r)
        for op in absent:
            assert r[op] == 0, (short, op, r)
        clustered += cl == "true"
        assert (r["CLARV"] > 0 and r["CLWAIT"] > 0) == (cl == "true"), (short, r)
    assert clustered == 8, sorted(cuda_sass.demangle_short(k) for k in ks)


def test_tensor_core_backward_sass():
    """The three-launch backward's GEMM launch (block_backward_mma.cu, {half, bfloat16, float
    on TF32, float on FMAs, double} x stride {1, 2}) runs its data and weight gradients on
    tensor cores (HMMA) fed by ldmatrix (LDSM) in the 16-bit ones, or, the exact float32 one,
    on FFMA without HMMA, float64 on DFMA; stages x with 16-byte cp.async (LDGSTS .128), and
    keeps everything in registers (no local memory) within the 255 its one CTA per SM allows;
    its depthwise launch (block_backward_dw.cu) spills nothing either. The table: python
    tools/cuda_sass.py backward."""
    _built_with_cuda()
    tool, so = cuda_sass.cuobjdump(), cuda_sass.shared_object()
    if tool is None or so is None:
        pytest.skip("cuobjdump or the shared object not found")
    ks = cuda_sass.kernels(so, tool, "block_backward_mma_kernel")
    assert len(ks) == 10, sorted(ks)
    for name, r in ks.items():
        short = cuda_sass.demangle_short(name)
        assert r["local"] == 0 and r["LDL"] == 0 and r["STL"] == 0, (short, r)
        assert r["regs"] <= 255, (short, r)
        need, absent = _gemm_ops(short, _template_args(short)[-1])  # <T, S, TC>
        for op in need + ("LDGSTS128",):
            assert r[op] > 0, (short, op, r)
        for op in absent:
            assert r[op] == 0, (short, op, r)
    dw = cuda_sass.kernels(so, tool, "dw_backward_kernel")
    assert dw, "no depthwise backward kernel in the shared object"
    for name, r in dw.items():
        assert r["local"] == 0 and r["LDL"] == 0 and r["STL"] == 0, (cuda_sass.demangle_short(name), r)
    # launch 3 drops the dead scratch from L2 (discard.global.L2 is CCTL.E.RML2 in SASS)
    red = cuda_sass.kernels(so, tool, "backward_reduce_kernel")
    assert len(red) == 4, sorted(red)
    for name, r in red.items():
        assert r["L2DROP"] > 0 and r["LDL"] == 0 and r["STL"] == 0, (cuda_sass.demangle_short(name), r)
    # programmatic dependent launch: every launch waits for the kernel before it
    # (griddepcontrol.wait: ACQBULK) and lets the next one start early
    # (griddepcontrol.launch_dependents: PREEXIT)
    for name, r in {**ks, **dw, **red}.items():
        assert r["GDWAIT"] > 0 and r["GDLAUNCH"] > 0, (cuda_sass.demangle_short(name), r)
