"""Is every __syncthreads() of the CUDA kernels needed, and does the emulator notice when one
is missing? For each barrier in csrc/cuda, a copy of the tree without it runs
tests/test_cuda_emu.py (stopping at the first failure); a barrier whose removal passes the
tests is either redundant or guards something the tests do not exercise.

    python tools/cuda_emu/mutate_barriers.py                 # every barrier (~25 s each)
    python tools/cuda_emu/mutate_barriers.py block_backward.cu:309 depthwise_tile.cuh

One line per barrier: "caught" (a test failed or an emulator check aborted) or "MISSED".
Exit status 1 if any was missed. Not part of the suite (minutes of CPU time).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = os.path.join(ROOT, "csrc", "cuda")
BARRIER = re.compile(r"__syncthreads\(\);")


def sources():
    """{file name: its lines} of csrc/cuda's kernels, read once: the mutations are made from
    (and the copies restored to) this snapshot, whatever happens to the checkout meanwhile."""
    out = {}
    for name in sorted(os.listdir(KERNELS)):
        if name.endswith((".cu", ".cuh")):
            with open(os.path.join(KERNELS, name)) as f:
                out[name] = f.readlines()
    return out


def barriers(src, selection):
    """(file name, 1-based line) of every barrier statement in src, filtered by selection
    ("file" or "file:line" items; empty: all)."""
    found = []
    for name, lines in src.items():
        for i, line in enumerate(lines, 1):
            if BARRIER.search(line.split("//", 1)[0]):
                found.append((name, i))
    if not selection:
        return found
    keep = []
    for name, line in found:
        for item in selection:
            fname, _, at = item.partition(":")
            if fname == name and (not at or int(at) == line):
                keep.append((name, line))
                break
    return keep


def main(argv):
    src = sources()
    todo = barriers(src, argv)
    if not todo:
        print("no barrier matches", argv)
        return 2
    work = tempfile.mkdtemp(prefix="msfused-mut-")
    try:
        for part in ("csrc", os.path.join("tools", "cuda_emu"), "tests"):
            shutil.copytree(os.path.join(ROOT, part), os.path.join(work, part),
                            ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        shutil.copy(os.path.join(ROOT, "pyproject.toml"), work)
        for name, lines in src.items():
            with open(os.path.join(work, "csrc", "cuda", name), "w") as f:
                f.writelines(lines)
        missed = 0
        for name, line in todo:
            path = os.path.join(work, "csrc", "cuda", name)
            lines = src[name]
            mutated = list(lines)
            mutated[line - 1] = BARRIER.sub("/* barrier removed */", mutated[line - 1], count=1)
            with open(path, "w") as f:
                f.writelines(mutated)
            # the installed msfused (with its _C) is the one imported; the emulator compiles
            # this copy's csrc (run_emu.py builds from the tree it sits in)
            r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda_emu.py", "-x",
                                "-q", "-p", "no:cacheprovider", "-o", "addopts="],
                               cwd=work, capture_output=True, text=True, timeout=1800)
            caught = r.returncode != 0
            missed += not caught
            tail = (r.stdout.strip().splitlines() or [""])[-1]
            print(f"{name}:{line}: {'caught' if caught else 'MISSED'} ({tail})", flush=True)
            with open(path, "w") as f:
                f.writelines(lines)
        return 1 if missed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
