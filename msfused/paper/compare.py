"""`msfused compare`: train all five models on one data set with the same seed, settings
and data, print a table laid out like the paper's Tables 3-6 (test accuracy and
parameters) and save a plot of test accuracy against iterations like its Figs. 5-8."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

from . import data as data_mod
from . import train as train_mod
from .models import MODELS

NAMES = {"googlenet": "GoogLeNet", "alexnet": "AlexNet", "mobilenet": "MobileNet",
         "ms1": "Method 1", "ms2": "Method 2"}
ORDER = ("googlenet", "alexnet", "mobilenet", "ms1", "ms2")   # the paper's column order


def add_arguments(p: argparse.ArgumentParser) -> None:
    train_mod.add_arguments(p, single_model=False)
    p.add_argument("--models", default=",".join(ORDER),
                   help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--out-dir", default="compare_out",
                   help="where the per-model JSON, the summary JSON and the PNG go")


def format_table(results: List[Dict]) -> str:
    results = sorted(results, key=lambda r: ORDER.index(r["model"]))   # the paper's order
    r0 = results[0]
    head = (f"Test accuracy on {r0['dataset']} after {r0['iters']} iterations, batch "
            f"{r0['batch_size']} ({r0['test_images']} test images)")
    lines = [head, "",
             "| Model | Accuracy (%) | Parameters | Train time (s) |",
             "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {NAMES[r['model']]} | {100 * r['test_accuracy']:.2f} | "
                     f"{r['params']:,} | {r['train_seconds']:.1f} |")
    return "\n".join(lines)


def save_plot(results: List[Dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("msfused compare: matplotlib is not installed, so no accuracy plot was saved "
              "(pip install matplotlib; the table and JSON are complete).", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in sorted(results, key=lambda r: ORDER.index(r["model"])):
        its = [h[0] for h in r["history"]]
        acc = [100 * h[1] for h in r["history"]]
        ax.plot(its, acc, marker="o", ms=3, label=NAMES[r["model"]])
    ax.set_xlabel("iterations")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results[0]['dataset']}, batch {results[0]['batch_size']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args) -> int:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            print(f"msfused compare: --models: unknown model {m!r}; expected {MODELS}",
                  file=sys.stderr)
            return 2
    try:
        d = data_mod.load(args.dataset, args.data_dir, args.download)
    except data_mod.DatasetMissingError as e:
        print(f"msfused compare: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    results = []
    for m in models:
        results.append(train_mod.train(
            m, args.dataset, args.iters, args.batch_size, args.backend, args.seed, args.lr,
            args.eval_every, args.eval_limit, quiet=args.quiet, data=d,
            json_path=os.path.join(args.out_dir, f"{m}.json")))
    table = format_table(results)
    print(table)
    with open(os.path.join(args.out_dir, "compare.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out_dir, "compare.md"), "w") as f:
        f.write(table + "\n")
    png = os.path.join(args.out_dir, f"accuracy_{args.dataset}.png")
    if save_plot(results, png):
        print(f"accuracy plot: {png}")
    return 0
