"""Resources and instruction mix of the built extension's CUDA kernels, read off its SASS with
cuobjdump (the CUDA toolkit's, or the copy in Triton's wheel). No GPU needed.

    python tools/cuda_sass.py [filter]     # e.g. forward_mma: the tensor-core forward only

Per kernel instantiation: registers, local memory (spills), static shared memory, tensor-core
MMAs (HMMA), float32 and float64 FMAs (FFMA, DFMA), ldmatrix (LDSM), 16-byte cp.async
(LDGSTS...128), 16-byte global stores and loads, barriers, instructions, and the CTAs per SM
its registers allow at 256 threads.
"""
import functools
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COUNTS = {"HMMA": r"\bHMMA\.", "FFMA": r"\bFFMA\b", "DFMA": r"\bDFMA\b", "LDSM": r"\bLDSM\.",
          "LDGSTS128": r"\bLDGSTS\.[A-Z.]*128\b", "STG128": r"\bSTG\.E\.128\b",
          "LDG128": r"\bLDG\.E\.128\b", "LDL": r"\bLDL\b", "STL": r"\bSTL\b",
          "BAR": r"\bBAR\.SYNC\b",
          "L2DROP": r"\bCCTL\.E\.RML2\b",  # discard.global.L2: a line leaves L2 unwritten
          # griddepcontrol.wait / .launch_dependents (programmatic dependent launch)
          "GDWAIT": r"\bACQBULK\b", "GDLAUNCH": r"\bPREEXIT\b",
          # barrier.cluster.arrive / .wait (thread-block clusters)
          "CLARV": r"\bUCGABAR_ARV\b", "CLWAIT": r"\bUCGABAR_WAIT\b"}


def cuobjdump():
    cands = [shutil.which("cuobjdump")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(os.path.join(os.environ[env], "bin", "cuobjdump"))
    cands.append("/usr/local/cuda/bin/cuobjdump")
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def shared_object():
    so = glob.glob(os.path.join(ROOT, "msfused", "_C*.so"))
    return so[0] if so else None


def demangle_short(name):
    """'block_forward_mma_kernel<__nv_bfloat16, 1, 16, true>'-like short form of a mangled
    name."""
    m = None
    for i in range(len(name)):  # Itanium mangling: <length><identifier>, e.g. ...12" "11dact_kernel
        for at in range(i + 1, min(i + 4, len(name)) + 1):
            if not name[i:at].isdigit():
                break
            n = int(name[i:at])
            ident = name[at:at + n]
            if m is None and ident.endswith("_kernel") and name[at + n:at + n + 1] == "I":
                m = (ident, name[at + n + 1:])
    if m is None:
        return name
    kernel, args = m
    dtype = ("bfloat16" if "nv_bfloat16" in args else "half" if "half" in args
             else "double" if args.startswith("d") else "float" if args.startswith("f") else "?")
    # template arguments in order: ints as numbers, bools as true / false
    vals = [v if k == "i" else ("true" if v == "1" else "false")
            for k, v in re.findall(r"L([ib])(\d+)E", args)]
    return f"{kernel}<{', '.join([dtype] + vals)}>"


@functools.lru_cache(maxsize=4)
def _dump(tool, so, what, mtime):
    """cuobjdump's output (what: -res-usage or -sass) for the shared object as of mtime, once
    per process: the SASS tests read the same dump (~10 s each)."""
    r = subprocess.run([tool, what, so], capture_output=True, text=True, timeout=600)
    r.check_returncode()
    return r.stdout


def kernels(so, tool, needle=""):
    """{mangled name: dict of resources and instruction counts} for kernels containing needle."""
    mtime = os.path.getmtime(so)
    out = {}
    lines = _dump(tool, so, "-res-usage", mtime).splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"Function (\S+):", line)
        if m and needle in m.group(1) and i + 1 < len(lines):
            r = lines[i + 1]
            get = lambda k: int(re.search(k + r":(\d+)", r).group(1))  # noqa: E731
            out[m.group(1)] = dict(regs=get("REG"), local=get("LOCAL"), shared=get("SHARED"))
    for chunk in re.split(r"\n\s*Function : ", _dump(tool, so, "-sass", mtime))[1:]:
        name, body = chunk.split("\n", 1)
        name = name.strip()
        if name not in out:
            continue
        for k, pat in COUNTS.items():
            out[name][k] = len(re.findall(pat, body))
        out[name]["instructions"] = len(re.findall(r"/\*[0-9a-f]{4,}\*/", body))
    return out


def main():
    needle = sys.argv[1] if len(sys.argv) > 1 else ""
    tool, so = cuobjdump(), shared_object()
    if tool is None or so is None:
        print("needs cuobjdump and a built msfused/_C*.so")
        return 1
    ks = kernels(so, tool, needle)
    cols = ["regs", "local", "shared", *COUNTS, "instructions"]
    print(f"{'kernel':50} " + " ".join(f"{c:>9}" for c in cols) + f" {'CTAs/SM(regs)':>13}")
    for name, r in sorted(ks.items(), key=lambda kv: demangle_short(kv[0])):
        per_sm = 65536 // max(1, r["regs"] * 256)
        print(f"{demangle_short(name):50} " + " ".join(f"{r.get(c, 0):9d}" for c in cols)
              + f" {per_sm:13d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
