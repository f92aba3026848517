"""The `msfused` command: `msfused bench` (the benchmark harness), `msfused backends`,
`msfused train` (one of the paper's networks on one data set), `msfused compare` (all five
models on one data set, the paper's Tables 3-6 and Figs. 5-8), `msfused params`."""
from __future__ import annotations

import argparse
import sys


def _backends(_args) -> int:
    import msfused
    for name, st in msfused.available_backends().items():
        print(f"{name:<10} {st!r}")
    return 0


def _bench(args) -> int:
    from . import benchmark
    benchmark.run(args)
    return 0


def _train(args) -> int:
    from .paper import train
    return train.run(args)


def _compare(args) -> int:
    from .paper import compare
    return compare.run(args)


def _params(_args) -> int:
    from .paper import models
    models.print_parameter_counts()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import benchmark
    p = argparse.ArgumentParser(prog="msfused", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="compare fused backends with eager PyTorch and torch.compile")
    benchmark.add_arguments(b)
    b.set_defaults(func=_bench)
    s = sub.add_parser("backends", help="which backends are usable here, and why not")
    s.set_defaults(func=_backends)
    from .paper import compare, train
    t = sub.add_parser("train", help="train one of the paper's networks on one data set")
    train.add_arguments(t)
    t.set_defaults(func=_train)
    c = sub.add_parser("compare", help="train all five models on one data set: the "
                       "paper's accuracy/parameter table and accuracy-vs-iterations plot")
    compare.add_arguments(c)
    c.set_defaults(func=_compare)
    m = sub.add_parser("params", help="Table 2 and every network's parameter count")
    m.set_defaults(func=_params)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
