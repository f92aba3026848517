"""Test helpers: build blocks, an independent float64 implementation of SPEC section 1
(explicit padding and shifted sums; no conv2d), and the error measures of the policy."""
import torch

import msfused
from msfused.config import MERGE_CONCAT, act_code, merge_code, needs_projection, out_channels
from msfused.params import BlockParams


def make_block(c, n, *, merge="concat", stride=1, activation="relu", residual=True, bias=True,
               backend="reference", dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride, activation=activation,
                                         residual=residual, bias=bias, backend=backend,
                                         dtype=torch.float64)
    with torch.no_grad():  # biases away from zero so every term matters
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 0.4))
    return m.to(device=device, dtype=dtype)


def _act(t, name):
    if name == "relu":
        return t.clamp_min(0)
    if name == "relu6":
        return t.clamp(0, 6)
    if name == "silu":
        return t * torch.sigmoid(t)
    return t


def _dw3x3(x, w, b, s):
    # depthwise 3x3, zero padding 1, stride s, by nine shifted slices of a padded input
    B, C, H, W = x.shape
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    xp = torch.zeros(B, C, H + 2, W + 2, dtype=x.dtype)
    xp[:, :, 1:H + 1, 1:W + 1] = x
    out = torch.zeros(B, C, Ho, Wo, dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            patch = xp[:, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s]
            out += patch * w[:, 0, i, j].view(1, C, 1, 1)
    if b is not None:
        out += b.view(1, C, 1, 1)
    return out


def _pw(x, w, b, s=1):
    x = x[:, :, ::s, ::s]
    out = torch.einsum("bchw,oc->bohw", x, w[:, :, 0, 0])
    return out if b is None else out + b.view(1, -1, 1, 1)


def naive_block(x, p: BlockParams, *, stride, merge, activation, residual):
    """SPEC section 1, written independently of msfused.reference (float64, CPU)."""
    d = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    x = d(x)
    p = BlockParams(*[d(t) for t in p])
    a = _act(_dw3x3(x, p.wa, p.ba, stride), activation)
    b1 = _act(_dw3x3(x, p.wb, p.bb, stride), activation)
    b = _act(_dw3x3(b1, p.wc, p.bc, 1), activation)
    pa, pb = _pw(a, p.pa, p.qa), _pw(b, p.pb, p.qb)
    m = torch.cat([pa, pb], 1) if merge == "concat" else pa + pb
    if residual:
        c, c_out = x.shape[1], m.shape[1]
        m = m + (_pw(x, p.ws, p.bs, stride) if needs_projection(c, c_out, stride) else x)
    return _act(m, activation)


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def named_grads(m):
    return {k: v.grad for k, v in m.named_parameters()}


def run_fwd_bwd(m, x, gy):
    x = x.detach().clone().requires_grad_(True)
    for p in m.parameters():
        p.grad = None
    y = m(x)
    y.backward(gy)
    return y.detach(), x.grad, named_grads(m)


def check_float32_against_float64(ref, fused, x, gy, tol=1e-5, tag=()):
    """The float32 block fused against the float64 block ref (same weights) on float64 x and
    gy: y, dx and every parameter gradient within tol relative error. Returns fused's
    (y, dx, gradients)."""
    want = run_fwd_bwd(ref, x, gy)
    got = run_fwd_bwd(fused, x.float(), gy.float())
    assert rel_err(got[0], want[0]) < tol and rel_err(got[1], want[1]) < tol, tag
    for k in want[2]:
        assert rel_err(got[2][k], want[2][k]) < tol, (tag, k)
    return got


__all__ = ["make_block", "naive_block", "rel_err", "run_fwd_bwd",
           "check_float32_against_float64", "MERGE_CONCAT", "act_code",
           "merge_code", "out_channels"]
