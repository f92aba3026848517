"""The CUDA issues' targets, read off `msfused bench` results files: per shape and as the
geometric mean over the shapes, each with its bar and whether it is met.

    python tools/gpu/targets.py bench-cuda-bf16.json [bench-cuda-bf16-compile.json] \
        [--backend cuda] [--layout cl]

The targets (bfloat16, channels_last; GPU time where the file has it, else the per-call
time, as on a CPU):
  forward (CUDA forward issue): >= 5x eager, >= 3x torch.compile (geometric means),
      >= 50% of the floor at mnet-56 and mnet-28;
  forward+backward (CUDA backward issue): >= 4x eager, >= 2.5x torch.compile (geometric
      means), peak memory per block <= 30% of eager's at every shape.
"eager" is the harness's: the best of eager's variants (layouts; for 16-bit, 16-bit weights
and autocast) in the same file, as its "x eager" column. torch.compile's ratio comes from a
file that has the compile-cl rows (`msfused bench` without --no-compile), the fused rows of
that same file against them, so that both were timed in one process.
"""
import argparse
import json
import math
import sys

FWD_EAGER, FWD_COMPILE, FWD_FLOOR = 5.0, 3.0, 0.5
FWD_FLOOR_SHAPES = ("mnet-56", "mnet-28")
TRAIN_EAGER, TRAIN_COMPILE, TRAIN_PEAK = 4.0, 2.5, 0.30


def _time(r):
    return r["gpu_ms"] if r.get("gpu_ms") is not None else r["ms"]


def _geomean(xs):
    xs = [x for x in xs if x is not None]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def evaluate(results, variant):
    """{mode: {"shapes": {shape: {...}}, "targets": [(name, value, bar, met)]}} for the
    fused `variant` (e.g. "cuda-cl") over a list of results dicts (msfused bench files)."""
    out = {}
    for mode in ("fwd", "fwd+bwd"):
        per = {}
        for res in results:
            rows = [r for r in res["rows"] if r["mode"] == mode]
            by = {(r["shape"], r["variant"]): r for r in rows}
            for (shape, name), r in by.items():
                if name != variant:
                    continue
                d = per.setdefault(shape, {})
                d.setdefault("vs_eager", r["vs_eager"])
                d.setdefault("floor", r["floor_frac"])
                # against the eager variant that needs the least memory: the strictest
                eager_peaks = [e["peak_mb"] for (s, n), e in by.items()
                               if s == shape and n.startswith("eager") and e.get("peak_mb")]
                if r.get("peak_mb") and eager_peaks and "peak" not in d:
                    d["peak"] = r["peak_mb"] / min(eager_peaks)
                comp = by.get((shape, "compile-cl"))
                if comp is not None and "vs_compile" not in d:
                    d["vs_compile"] = _time(comp) / _time(r)
        if not per:
            continue
        order = [sh["name"] for res in results for sh in res.get("shapes", [])]
        shapes = sorted(per, key=lambda s: order.index(s) if s in order else len(order))
        g = lambda k: _geomean([per[s].get(k) for s in shapes])  # noqa: E731
        targets = []
        if mode == "fwd":
            targets.append(("x eager (geomean)", g("vs_eager"), FWD_EAGER))
            if g("vs_compile") is not None:
                targets.append(("x torch.compile (geomean)", g("vs_compile"), FWD_COMPILE))
            for s in FWD_FLOOR_SHAPES:
                if s in per:
                    targets.append((f"floor fraction at {s}", per[s]["floor"], FWD_FLOOR))
        else:
            targets.append(("x eager (geomean)", g("vs_eager"), TRAIN_EAGER))
            if g("vs_compile") is not None:
                targets.append(("x torch.compile (geomean)", g("vs_compile"), TRAIN_COMPILE))
            peaks = [per[s].get("peak") for s in shapes]
            if all(p is not None for p in peaks):
                worst = max(peaks)
                targets.append(("peak memory / eager's (worst shape)", worst, TRAIN_PEAK))
        out[mode] = {"shapes": {s: per[s] for s in shapes}, "targets": [
            (name, v, bar, (v <= bar) if "peak" in name else (v >= bar))
            for name, v, bar in targets]}
    return out


def report(ev, variant):
    lines = []
    for mode, e in ev.items():
        lines.append(f"{variant} {mode}:")
        lines.append(f"  {'shape':<10} {'x eager':>8} {'x compile':>10} {'floor':>7} "
                     f"{'peak/eager':>11}")
        for s, d in e["shapes"].items():
            f = lambda k, fmt: (fmt.format(d[k]) if d.get(k) is not None else "-")  # noqa: E731
            lines.append(f"  {s:<10} {f('vs_eager', '{:.2f}'):>8} {f('vs_compile', '{:.2f}'):>10} "
                         f"{f('floor', '{:.0%}'):>7} {f('peak', '{:.2f}'):>11}")
        for name, v, bar, met in e["targets"]:
            rel = "<=" if "peak" in name else ">="
            lines.append(f"  {'met ' if met else 'MISS'} {name}: {v:.2f} (target {rel} {bar})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--layout", default="cl", choices=("cl", "nchw"))
    a = ap.parse_args(argv)
    results = [json.load(open(f)) for f in a.files]
    variant = f"{a.backend}-{a.layout}"
    ev = evaluate(results, variant)
    if not ev:
        print(f"no {variant} rows in {', '.join(a.files)}")
        return 1
    head = results[0]
    print(f"{head['device']}, torch {head['torch']}, commit {head['commit']}, {head['dtype']}")
    print(report(ev, variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
