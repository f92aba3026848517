"""Random configurations through a fused backend on its device, forward and backward, against
float64 PyTorch: the GPU's counterpart of tools/cuda_emu/fuzz.py, where the kernels run on
the hardware (CTAs really concurrent, the real caches and clocks) on shapes the suite's fixed
cases do not pick. Also runs on the CPU (--device cpu --backend cpp), which is how CI checks
the script itself.

    python tools/gpu/fuzz_backend.py --device cuda --backend cuda [--cases 200] [--seconds 80]

Each case draws C, N, the image, batch, merge, stride, activation, residual, bias, layout and
dtype (float64, float32, bfloat16, float16), runs the block's forward and backward in that
dtype, and judges y and every gradient against float64 autograd from the same inputs:
float64 within 1e-9; the others within twice eager PyTorch's error in the same dtype plus a
tenth of the dtype's epsilon (the project's tolerance policy), float32 also within 1e-5.
TF32 is off (torch.backends.cudnn / cuda.matmul), as in the suite's comparisons. Prints one
line per case and the failures; exit status 1 if any failed.
"""
import argparse
import random
import sys
import time

import torch

import msfused
from msfused import activations
from msfused.config import apply_act
from msfused.reference import block_preactivation

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# The kernels' gradients against float64 differentiated with act' read off the kernel's own
# output (relu, relu6: y is what the backward reads): a few units of the dtype's rounding
# (tools/cuda_emu/run_emu.py EXACT_TOL).
EXACT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def draw(rng, dtypes=DTYPES):
    c = rng.choice([1, 2, 3, 5, 8, 16, 20, 32, 40, 64, 96, 128, 160, 256])
    n = rng.choice([1, 3, 8, 16, 17, 24, 32, 64, 70, 128, 140])
    return dict(c=c, n=n, h=rng.randint(1, 30), w=rng.randint(1, 30), batch=rng.randint(1, 4),
                merge=rng.choice(["concat", "add"]), stride=rng.choice([1, 2]),
                activation=rng.choice(["relu", "relu6", "silu", "none"]),
                residual=rng.random() < 0.6, bias=rng.random() < 0.8,
                channels_last=rng.random() < 0.6, dtype=rng.choice(dtypes))


def _rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _outputs(m, x, gy):
    """y and the gradients of x and every parameter, in order."""
    x = x.detach().requires_grad_(True)
    y = m(x)
    y.backward(gy)
    return [y.detach(), x.grad] + [p.grad for p in m.parameters()]


def run_case(cfg, device, backend, seed):
    """(ok, line) for one drawn configuration."""
    torch.manual_seed(seed)
    kw = dict(merge=cfg["merge"], stride=cfg["stride"], activation=cfg["activation"],
              residual=cfg["residual"], bias=cfg["bias"])
    dtype = cfg["dtype"]
    ref = msfused.MultiScaleSeparableBlock(cfg["c"], cfg["n"], backend="reference",
                                           device=device, dtype=torch.float64, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    fused = msfused.MultiScaleSeparableBlock(cfg["c"], cfg["n"], backend=backend,
                                             device=device, dtype=dtype, **kw)
    eager = msfused.MultiScaleSeparableBlock(cfg["c"], cfg["n"], backend="reference",
                                             device=device, dtype=dtype, **kw)
    fused.load_state_dict(ref.state_dict())
    eager.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())  # float64 from the rounded weights
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    x = torch.randn(cfg["batch"], cfg["c"], cfg["h"], cfg["w"], device=device,
                    dtype=dtype).contiguous(memory_format=fmt)
    ho = (cfg["h"] - 1) // cfg["stride"] + 1
    wo = (cfg["w"] - 1) // cfg["stride"] + 1
    gy = torch.randn(cfg["batch"], fused.out_channels, ho, wo, device=device,
                     dtype=dtype).contiguous(memory_format=fmt)
    want = _outputs(ref, x.double().contiguous(memory_format=fmt), gy.double())
    got = _outputs(fused, x, gy)
    base = _outputs(eager, x, gy) if dtype != torch.float64 else None
    names = ["y", "dx"] + [n for n, _ in fused.named_parameters()]
    eps = torch.finfo(dtype).eps
    bad = []
    for i, name in enumerate(names):
        err = _rel(got[i], want[i])
        if dtype == torch.float64:
            tol = 1e-9
        else:
            tol = 2 * _rel(base[i], want[i]) + eps / 10
            if dtype == torch.float32:
                tol = max(tol, 1e-5)
        if not err <= tol:
            bad.append(f"{name} {err:.2e} > {tol:.2e}")
    desc = (f"C{cfg['c']} N{cfg['n']} {cfg['h']}x{cfg['w']} B{cfg['batch']} {cfg['merge']} "
            f"s{cfg['stride']} {cfg['activation']} res={cfg['residual']} bias={cfg['bias']} "
            f"{'nhwc' if cfg['channels_last'] else 'nchw'} {str(dtype)[6:]}")
    note = ""
    if bad and cfg["activation"] in ("relu", "relu6"):
        explained, note = _flips_explain(ref, fused, x, gy, got, dtype)
        if explained:
            bad = []
    return not bad, (f"{'ok  ' if not bad else 'FAIL'} {desc}" + (f": {bad}" if bad else "")
                     + note)


def _flips_explain(ref, fused, x, gy, got, dtype):
    """Whether a policy miss of a relu/relu6 block comes from act' alone, as the emulator's
    judge accepts it (run_emu.judge): where float64's pre-activation lies within the dtype's
    rounding of a kink, the kernel's mask (read off its own output) can come out the other
    way, and so can eager's by other roundings; one flipped pixel moves a small case's
    gradients by 1e-2..1e-1. Explained when the kernel's gradients are within a few roundings
    of float64 differentiated with the kernel's own mask, and the flips are few (at most 1%
    of the elements, or one)."""
    cfg = fused.config
    xd = x.double().requires_grad_(True)
    pd = ref.params()
    pd = type(pd)(*[t.detach().double().requires_grad_(True) if t is not None else None
                    for t in pd])
    z = block_preactivation(xd, pd, cfg)
    y = got[0].double()
    z.backward(activations.grad_from_saved(cfg.act, gy.double(), y))
    exact = [xd.grad] + [t.grad for t in pd if t is not None]
    errs = [_rel(g, e) for g, e in zip(got[1:], exact)]
    mask_k = activations.grad_from_saved(cfg.act, torch.ones_like(y), y) != 0
    y64 = apply_act(z.detach(), cfg.act)
    mask_64 = activations.grad_from_saved(cfg.act, torch.ones_like(y64), y64) != 0
    flips = int((mask_k != mask_64).sum())
    ok = max(errs) < EXACT_TOL[dtype] and flips <= max(1, z.numel() // 100)
    verdict = "" if ok else ": not explained"
    return ok, (f"; policy miss from {flips} act' flip(s) of {z.numel()} (gradients within "
                f"{max(errs):.1e} of float64 with the kernel's mask){verdict}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    a = ap.parse_args(argv)
    if a.device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    # the dtypes the backend runs (triton: no float64)
    dtypes = [d for d in DTYPES if d in msfused.backends.get_backend(a.backend).dtypes]
    t0, fails, ran = time.monotonic(), [], 0
    for k in range(a.cases):
        if a.seconds and time.monotonic() - t0 > a.seconds:
            print(f"(stopped after {a.seconds:.0f} s)")
            break
        seed = a.seed * 1_000_003 + k
        ok, line = run_case(draw(random.Random(seed), dtypes), a.device, a.backend, seed)
        ran += 1
        print(f"[{k}] {line}", flush=True)
        if not ok:
            fails.append(f"[{k}] {line}")
    print(f"{len(fails)} failure(s) of {ran} ({a.backend} on {a.device}, seed {a.seed})")
    for line in fails:
        print(line)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
