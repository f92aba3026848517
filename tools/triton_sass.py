"""Compile the Triton kernels for a GPU without one, and read their SASS.

    python tools/triton_sass.py [--arch 90] [--dtype bfloat16] [--layout cl] [--json out]

For every benchmark shape (msfused.benchmark.SHAPES; the block's default activation and
residual), the op wrappers run on CPU tensors with a recording launcher instead of the
kernels, so each launch's real arguments are captured. Every launched kernel is then
compiled for sm_<arch> with each autotune config it would try there, specialised as Triton's JIT would
specialise those arguments (16-divisible ints and pointers, ints equal to 1), through
Triton's own ptxas; cuobjdump (shipped in Triton's wheel) gives registers, local memory
and the instruction mix: HMMA / HGMMA (tensor cores: mma.sync / Hopper's wgmma), LDSM
(ldmatrix), 128-bit global loads/stores, LDL/STL (local memory: spills); shared memory from
the compiled kernel's metadata.

This checks what the interpreter cannot: that the compiled frontend accepts the kernels
(constexpr branches, join/permute/reshape, dot shapes), and their resource use. It does not
run anything; timings need a GPU. Must run without TRITON_INTERPRET (the kernels have to be
JIT functions, not interpreted ones).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/triton_sass.py: unset TRITON_INTERPRET (the kernels must be JIT functions)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import msfused  # noqa: E402
from msfused.benchmark import SHAPES  # noqa: E402
from msfused.config import make_config  # noqa: E402
from msfused.ops import triton_ops  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Recorder:
    """Stands in for wrap_triton: `rec(kernel)[grid](*args, **kw)` records the launch."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *a, **kw: rec.launches.append((kernel, a, kw))
        return _Grid()


def record_launches(shape, dtype, channels_last: bool):
    """The (autotuner, args, kwargs) of every kernel launch of one forward (training, so the
    pre-activation store is in) and one backward at this shape (batch 1)."""
    cfg = make_config(shape.stride, shape.merge, "relu", True)  # the module's defaults
    block = msfused.MultiScaleSeparableBlock(shape.c, shape.n, merge=shape.merge,
                                             stride=shape.stride, backend="reference",
                                             dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, shape.c, shape.h, shape.w, dtype=dtype).contiguous(memory_format=fmt)
    p = block.params()
    rec = _Recorder()
    y, pre = triton_ops._forward_impl(x, *p, cfg.stride, cfg.merge, cfg.act, cfg.residual,
                                      True, rec)
    gy = torch.randn_like(y)
    triton_ops._backward_impl(gy, x, y, p, cfg.stride, cfg.merge, cfg.act, cfg.residual, rec)
    return rec.launches


_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DIV16 = [["tt.divisibility", 16]]


def _specialise(v):
    """(signature type, attributes or the constexpr value) of one runtime argument, as
    Triton's JIT specialises it: pointers and ints divisible by 16 get tt.divisibility,
    an int equal to 1 becomes a constant."""
    if isinstance(v, torch.Tensor):
        return "*" + _TT[v.dtype], (_DIV16 if v.data_ptr() % 16 == 0 else [])
    if isinstance(v, int) and not isinstance(v, bool):
        if v == 1:
            return "constexpr", 1
        return ("i32" if -2 ** 31 <= v < 2 ** 31 else "i64"), (_DIV16 if v % 16 == 0 else [])
    raise TypeError(f"unexpected runtime kernel argument {v!r}")


def _source(autotuner, args, kwargs, config):
    fn = autotuner.fn
    values = dict(zip(fn.arg_names, args))
    values.update(kwargs)
    values.update(config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = values[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = v
            continue
        ty, extra = _specialise(v)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = extra
        elif extra:
            attrs[(i,)] = extra
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def _sass_stats(cubin: bytes, tool_dir: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([os.path.join(tool_dir, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tool_dir, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", res)
        return int(m.group(1)) if m else 0
    ops = [m.group(1) for m in _INSTR.finditer(sass)]

    def count(prefix):
        return sum(1 for o in ops if o.startswith(prefix))
    return {"regs": field("REG"), "stack": field("STACK"), "hmma": count("HMMA"), "hgmma": count("HGMMA"), "ldsm": count("LDSM"),
            "ldg128": count("LDG.E.128") + count("LDG.E.EL.128"), "stg128": count("STG.E.128"),
            "ldl": count("LDL"), "stl": count("STL"), "instrs": len(ops)}


def analyse(shapes, dtype, channels_last, arch):
    tool_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    target = GPUTarget("cuda", arch, 32)
    rows, seen = [], set()
    for shape in shapes:
        for autotuner, args, kwargs in record_launches(shape, dtype, channels_last):
            configs = autotuner.configs
            if autotuner.early_config_prune:  # the configs the autotuner would try here
                configs = autotuner.early_config_prune(
                    configs, dict(zip(autotuner.fn.arg_names, args)), **kwargs)
            for config in configs:
                src = _source(autotuner, args, kwargs, config)
                opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                key = (src.hash(), config.num_warps, config.num_stages)
                if key in seen:
                    continue
                seen.add(key)
                ck = triton.compile(src, target=target, options=opts)
                stats = _sass_stats(ck.asm["cubin"], tool_dir)
                stats["shared"] = ck.metadata.shared  # the static field misses Triton's dynamic smem
                rows.append({"shape": shape.name, "kernel": autotuner.base_fn.__name__,
                             "config": f"{config.kwargs} w{config.num_warps} s{config.num_stages}",
                             **stats})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    ap.add_argument("--layout", choices=["cl", "nchw"], default="cl")
    ap.add_argument("--shapes", default="paper,mobilenet",
                    help="comma-separated groups or shape names of msfused.benchmark")
    ap.add_argument("--json", help="write the rows to this file")
    a = ap.parse_args(argv)
    by_name = {s.name: s for g in SHAPES.values() for s in g}
    shapes = []
    for key in a.shapes.split(","):
        shapes += SHAPES[key] if key in SHAPES else [by_name[key]]
    rows = analyse(shapes, _DTYPES[a.dtype], a.layout == "cl", a.arch)
    cols = ["shape", "kernel", "config", "regs", "shared", "hmma", "hgmma", "ldsm", "ldg128",
            "stg128", "ldl", "stl", "instrs"]
    print(f"# sm_{a.arch}, {a.dtype}, {a.layout}, triton {triton.__version__}")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
