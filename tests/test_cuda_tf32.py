"""float32 on the CUDA backend with TF32 allowed (torch.backends.cudnn.allow_tf32, eager's
convolutions' flag, on by default in PyTorch; the suite turns it off for its float32
comparisons): the forward runs its pointwise GEMM on TF32 tensor cores. Checked against
float64 at TF32's precision and against the same call with TF32 off (FMA kernel), which must
differ: otherwise the TF32 path did not run. Needs a GPU (the CPU emulator's version of this
check is tests/test_cuda_emu.py::test_tf32_forward)."""
import pytest
import torch

import msfused

TF32_TOL = 3e-3  # a few units of TF32's 10-bit mantissa; indexing errors are O(1)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture
def tf32_on():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("c,n,h,w,merge,stride,cl", [
    (64, 64, 28, 28, "add", 1, True), (20, 70, 11, 10, "concat", 2, True),
    (32, 32, 16, 16, "concat", 1, False), (256, 128, 7, 7, "add", 2, True)])
def test_tf32_forward(tf32_on, c, n, h, w, merge, stride, cl):
    if not msfused.available_backends()["cuda"].available:
        pytest.skip("cuda backend not built")
    torch.manual_seed(0)
    m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride, backend="cuda",
                                         device="cuda")
    ref = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride,
                                           backend="reference", device="cuda",
                                           dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(2, c, h, w, device="cuda")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = m(x)
        y64 = ref(x.double())
        torch.backends.cudnn.allow_tf32 = False
        y_fma = m(x)
        torch.backends.cudnn.allow_tf32 = True
    err = ((y.double() - y64).norm() / y64.norm()).item()
    assert err < TF32_TOL, err
    assert not torch.equal(y, y_fma), "TF32 allowed but the FMA kernel's result came back"
