"""Random configurations through the emulated CUDA kernels, forward and backward: shapes,
merges, strides, activations, residuals, layouts and dtypes drawn at random, and with them
the plan knobs a GPU's size or a user's environment changes (a smaller shared memory per
block, a forced split, a small scratch budget that slices the batch, the backward's and the
forward's thread-block clusters, the forward's bound on x's reads). Every call is also
checked for out-of-bounds accesses, races between CTAs and early-launch ordering (emu.h:
emu_bounds.h, emu_races.h), which fail the case outright; results are judged as the sweeps
judge them (run_emu.py --forward-low / --backward-low).

    python tools/cuda_emu/fuzz.py [--cases 200] [--seed 1]

Prints one line per case (the case's own seed reproduces it: --seed S --cases 1 --first K)
and the failures at the end; exit status 1 if any failed.
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_emu  # noqa: E402

KNOBS = ("CUDA_EMU_SMEM_LIMIT", "MSFUSED_CUDA_BWD_SPLIT", "MSFUSED_CUDA_BWD_SCRATCH_KB",
         "MSFUSED_CUDA_BWD_CLUSTER", "MSFUSED_CUDA_FWD_CLUSTER", "MSFUSED_CUDA_FWD_XMAX")


def draw(rng):
    """(case as forward_low_cases() writes it, dtype, knobs) for one random configuration."""
    wide = rng.random() < 0.15
    c = rng.choice([1, 2, 3, 5, 8, 16, 20, 24, 32, 40, 48, 64, 72, 96]) if not wide else \
        rng.choice([128, 160, 256, 272])
    n = rng.choice([1, 3, 8, 16, 17, 24, 32, 40, 64, 70, 96]) if not wide else \
        rng.choice([64, 128, 140, 160, 256])
    h, w = rng.randint(1, 23), rng.randint(1, 23)
    if wide:
        h, w = min(h, 9), min(w, 9)
    batch = rng.randint(1, 3)
    case = ((c, n, h, w, batch), rng.choice(["concat", "add"]), rng.choice([1, 2]),
            rng.random() < 0.6, rng.random() < 0.6,
            rng.choice(["relu", "relu6", "silu", "none"]))
    dtype = rng.choice([torch.bfloat16, torch.float16, "tf32", torch.float32, torch.float64])
    knobs = {}
    if rng.random() < 0.3:
        knobs["CUDA_EMU_SMEM_LIMIT"] = str(rng.choice([64, 100, 164]) * 1024)
    if rng.random() < 0.3:
        knobs["MSFUSED_CUDA_BWD_SPLIT"] = str(rng.randint(1, 3))
    if rng.random() < 0.3:
        knobs["MSFUSED_CUDA_BWD_SCRATCH_KB"] = str(rng.choice([1, 4, 16]))
    if rng.random() < 0.3:
        knobs["MSFUSED_CUDA_BWD_CLUSTER"] = "1"
    # drawn last, so the earlier draws (and a seed's cases before these knobs) stay as they were
    if rng.random() < 0.3:
        knobs["MSFUSED_CUDA_FWD_CLUSTER"] = "1"
    if rng.random() < 0.2:
        knobs["MSFUSED_CUDA_FWD_XMAX"] = "1.3"
    return case, dtype, knobs


def run_case(lib, case, dtype, knobs):
    """(ok, line); an out-of-bounds access, a race or a missing wait fails the emulate() call's
    assertion (the driver printed which)."""
    old = {k: os.environ.get(k) for k in KNOBS}
    try:
        for k in KNOBS:
            os.environ.pop(k, None)
        os.environ.update(knobs)
        if dtype == "tf32":
            return run_emu.run_backward_tf32(lib, case)
        if dtype in (torch.float32, torch.float64):
            return run_emu.run_float32(lib, case, backward=True, dtype=dtype)
        return run_emu.run_forward_low(lib, case, dtype, backward=True)
    except AssertionError as e:  # emulate(): the driver returned non-zero
        return False, f"FAIL {case} {dtype}: the emulated call failed ({e!r}; see stderr above)"
    finally:
        run_emu.restore_environ(old)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=0, help="start at this case number")
    a = ap.parse_args(argv)
    lib = run_emu.build()
    fails = []
    for k in range(a.first, a.first + a.cases):
        rng = random.Random(a.seed * 1_000_003 + k)
        case, dtype, knobs = draw(rng)
        torch.manual_seed(a.seed * 1_000_003 + k)
        ok, line = run_case(lib, case, dtype, knobs)
        line = f"[{k}] {' '.join(f'{n}={v}' for n, v in knobs.items())} {line}"
        print(line, flush=True)
        if not ok:
            fails.append(line)
    print(f"{len(fails)} failure(s) of {a.cases} (seed {a.seed})")
    for line in fails:
        print(line)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
