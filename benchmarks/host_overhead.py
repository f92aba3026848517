"""Host cost of one block call, layer by layer, in units of one trivial ATen call.

On a tiny input (B=1, C=4, N=4, 4x4, one thread) the kernel's own work is negligible, so
what is left is the host path: Python, the dispatcher, autograd and autocast glue, argument
checks. At the paper's shapes a GPU finishes each kernel faster than the host issues it, so
this cost, not the kernel, decides the speed there.

    python benchmarks/host_overhead.py [--backend cpp] [--iters 20000] [--json out.json]

Prints microseconds per call of each layer and the two ratios the host-path issue asks for:
the module's forward against one `x + x`, and its forward+backward against one
`(x + x).sum().backward()` (best of several repeats; the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import msfused


def best_us(cases: dict, iters: int, repeats: int) -> dict:
    """Best-of-`repeats` mean microseconds per call over `iters` calls, for every
    (name -> (fn, iteration scale, grad mode)) case. The cases are timed in rounds, one
    after the other in each round, so that a slower or faster spell of the shared machine
    touches all of them alike and the ratios compare like with like."""
    best = {name: float("inf") for name in cases}
    for rnd in range(repeats + 1):  # round 0 warms up
        for name, (fn, scale, grad) in cases.items():
            n = max(1, int(iters * scale)) if rnd else min(200, iters)
            with torch.set_grad_enabled(grad):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                dt = (time.perf_counter() - t0) / n * 1e6
            if rnd:
                best[name] = min(best[name], dt)
    return best


def measure(backend: str = "cpp", iters: int = 20000, repeats: int = 7) -> dict:
    torch.manual_seed(0)
    c = n = 4
    block = msfused.MultiScaleSeparableBlock(c, n, merge="add", backend=backend)
    p = block.params()
    cfg = block.config
    x = torch.randn(1, c, 4, 4)
    xg = x.clone().requires_grad_(True)
    tail = (cfg.stride, cfg.merge, cfg.act, cfg.residual)
    fwd_op = torch.ops.msfused.block_forward.default if backend in ("cpp", "cuda") else \
        torch.ops.msfused.triton_block_forward.default
    bwd_op = torch.ops.msfused.block_backward.default if backend in ("cpp", "cuda") else \
        torch.ops.msfused.triton_block_backward.default
    pd = [None if t is None else t.detach() for t in p]
    with torch.no_grad():
        y, _ = fwd_op(x, *pd, *tail, False)
    gy = torch.ones_like(y)
    empty = x.new_empty((0,))
    saved = y if cfg.act_name in ("relu", "relu6") else empty

    def trivial():
        return x + x

    def trivial_train():
        (xg + xg).sum().backward()

    def module_fwd():
        return block(x)

    def module_fwd_bwd():
        block(xg).sum().backward()

    def functional_fwd():
        return msfused.multiscale_separable_block(x, p, merge="add", backend=backend)

    def op_fwd():
        return fwd_op(x, *pd, *tail, False)

    def op_bwd():
        return bwd_op(gy, x, saved, *pd, *tail)

    out = {"torch": torch.__version__, "backend": backend, "threads": torch.get_num_threads(),
           "shape": [1, c, 4, 4], "n": n}
    us = best_us({
        "x + x": (trivial, 1, True),
        "(x + x).sum().backward()": (trivial_train, 0.25, True),
        "module forward, no_grad": (module_fwd, 1, False),
        "functional forward, no_grad": (functional_fwd, 1, False),
        "torch.ops forward (default overload)": (op_fwd, 1, False),
        "torch.ops backward (default overload)": (op_bwd, 1, False),
        "module forward, parameters require grad": (module_fwd, 1, True),
        "module forward+backward": (module_fwd_bwd, 0.25, True),
    }, iters, repeats)
    out["us_per_call"] = us
    out["ratios"] = {
        "module forward (grad) / (x + x)":
            us["module forward, parameters require grad"] / us["x + x"],
        "module forward (no_grad) / (x + x)": us["module forward, no_grad"] / us["x + x"],
        "module forward+backward / (x + x).sum().backward()":
            us["module forward+backward"] / us["(x + x).sum().backward()"],
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    r = measure(args.backend, args.iters, args.repeats)
    print(f"torch {r['torch']}, backend {r['backend']}, {r['threads']} thread, "
          f"x {tuple(r['shape'])}, n {r['n']}")
    for k, v in r["us_per_call"].items():
        print(f"  {k:<45} {v:8.2f} us")
    for k, v in r["ratios"].items():
        print(f"  {k:<55} {v:6.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
