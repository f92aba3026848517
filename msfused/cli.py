"""The `msfused` command: `msfused bench` (the benchmark harness), `msfused backends`."""
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


def build_parser() -> argparse.ArgumentParser:
    from . import benchmark
    p = argparse.ArgumentParser(prog="msfused", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="compare fused backends with eager PyTorch and torch.compile")
    benchmark.add_arguments(b)
    b.set_defaults(func=_bench)
    s = sub.add_parser("backends", help="which backends are usable here, and why not")
    s.set_defaults(func=_backends)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
