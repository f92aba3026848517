"""Benchmark harness: every fused backend against eager PyTorch (NCHW and channels_last)
and torch.compile of the reference, in one process, forward (no_grad) and forward+backward.

For each shape it reports time, the ratio to the best eager layout, the memory a training
step keeps per block, and achieved FLOP rate / bandwidth against ceilings measured in the
same run (a large GEMM and a large copy). Backends join by name through the registry;
nothing here knows about a particular fused backend.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

try:  # page-fault counts in the CPU timings; POSIX only
    import resource
except ImportError:
    resource = None

import torch

import msfused
from msfused.config import out_channels, out_size
from msfused.layout import memory_format_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    c: int
    n: int
    h: int
    w: int
    merge: str
    stride: int = 1


# The paper's three units (Table 1, method 1) at batch 128, and MobileNet-scale units.
PAPER_SHAPES = [
    Shape("paper-u1", 128, 3, 32, 32, 32, "concat"),
    Shape("paper-u2", 128, 64, 64, 16, 16, "concat"),
    Shape("paper-u3", 128, 128, 128, 8, 8, "concat"),
]
MOBILENET_SHAPES = [
    Shape("mnet-56", 32, 64, 64, 56, 56, "add"),
    Shape("mnet-28", 32, 128, 64, 28, 28, "concat"),
    Shape("mnet-14", 32, 256, 128, 14, 14, "add"),
]
SHAPES = {"paper": PAPER_SHAPES, "mobilenet": MOBILENET_SHAPES}


def flops_split(s: Shape) -> Tuple[float, float]:
    """(depthwise, GEMM) FLOPs (multiply-adds x 2) of the forward: three depthwise 3x3 (b1
    over the full output) on the FP32 units, the two pointwise convs and the projection
    (when there is one) as GEMMs."""
    ho, wo = out_size(s.h, s.stride), out_size(s.w, s.stride)
    c_out = out_channels(s.n, 0 if s.merge == "concat" else 1)
    proj = c_out * s.c if (s.stride != 1 or c_out != s.c) else 0
    pixels = s.batch * ho * wo
    return 2.0 * pixels * 27 * s.c, 2.0 * pixels * (2 * s.n * s.c + proj)


def flops_forward(s: Shape) -> float:
    """All FLOPs of the forward (depthwise + GEMM)."""
    return sum(flops_split(s))


def floor_seconds(s: Shape, elem: int, ceilings: Dict[str, float], train: bool) -> float:
    """The time under which the block cannot run here: max(bytes / copy bandwidth,
    depthwise FLOPs / FP32 rate, GEMM FLOPs / GEMM rate), with the run's measured ceilings;
    forward+backward counts 3x the forward's FLOPs. The GEMM rate is the faster of the
    benchmark dtype's and float32's: a CPU without 16-bit dot products (AMD Zen 3: oneDNN's
    bfloat16 GEMM at 15 against 110 GFLOP/s) multiplies 16-bit data fastest in float32,
    which is what the cpp kernels do there, and a floor from the slower rate would put
    them at several times 100% of it."""
    dw, gemm = flops_split(s)
    k = 3.0 if train else 1.0
    by = bytes_train(s, elem) if train else bytes_forward(s, elem)
    fp32 = ceilings.get("fp32_flops", ceilings["gemm_flops"])
    gemm_rate = max(ceilings["gemm_flops"], fp32)
    return max(by / ceilings["copy_bytes_per_s"], k * dw / fp32, k * gemm / gemm_rate)


def bytes_forward(s: Shape, elem: int) -> float:
    """The fewest bytes a forward must move: x read once, y written once, weights."""
    ho, wo = out_size(s.h, s.stride), out_size(s.w, s.stride)
    c_out = out_channels(s.n, 0 if s.merge == "concat" else 1)
    weights = 30 * s.c + 2 * s.n * (s.c + 1) + c_out * (s.c + 1)
    return elem * (s.batch * s.c * s.h * s.w + s.batch * c_out * ho * wo + weights)


def bytes_train(s: Shape, elem: int) -> float:
    """Forward + backward floor: forward's bytes, then x, dy and y read, dx written."""
    ho, wo = out_size(s.h, s.stride), out_size(s.w, s.stride)
    c_out = out_channels(s.n, 0 if s.merge == "concat" else 1)
    x, y = s.batch * s.c * s.h * s.w, s.batch * c_out * ho * wo
    return bytes_forward(s, elem) + elem * (2 * x + 2 * y)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _minor_faults() -> Optional[int]:
    """The process's minor page faults so far (all threads), or None where the OS does not
    say (no `resource` module)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _host_call(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call as the caller's loop sees it (CUDA events on the GPU)."""
    if device == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fn(fn: Callable[[], object], device: str, min_time: float = 0.3,
            max_reps: int = 200, best: bool = False) -> float:
    """Median seconds per call (the fastest with best=True): warm-up, then repeats until
    min_time has passed."""
    for _ in range(3):
        fn()
    _sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 5):
        times.append(_host_call(fn, device))
    return min(times) if best else statistics.median(times)


class _ColdL2Timer:
    """GPU seconds of single calls with a cold L2 (the triton.testing.do_bench method): each
    call runs after a write of a buffer larger than L2, and CUDA events time the call alone.
    The flush keeps the GPU busy while the host enqueues the call, so host overhead shorter
    than the flush (about 60 us) is hidden; the host-call time is what a user's loop sees."""

    def __init__(self):
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def enqueue(self, fn: Callable[[], object], events: list) -> None:
        self.flush.zero_()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        events.append((e0, e1))
        if len(events) % 10 == 0:
            e1.synchronize()  # keeps the host from racing far ahead of the clock

    @staticmethod
    def median(events: list) -> float:
        torch.cuda.synchronize()
        return statistics.median(e0.elapsed_time(e1) / 1e3 for e0, e1 in events)


def gpu_time_fn(fn: Callable[[], object], min_time: float = 0.3, max_reps: int = 200) -> float:
    """Median GPU seconds per call with a cold L2 (_ColdL2Timer), calls back to back."""
    timer = _ColdL2Timer()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    events: list = []
    start = time.perf_counter()
    while len(events) < max_reps and (time.perf_counter() - start < min_time or len(events) < 5):
        timer.enqueue(fn, events)
    return timer.median(events)


def time_interleaved(jobs: Dict[tuple, Callable[[], object]], device: str, min_time: float,
                     rounds: int = 5,
                     max_reps: int = 200
                     ) -> Dict[tuple, Tuple[float, Optional[float], Optional[float]]]:
    """{key: (median host seconds per call, median cold-L2 GPU seconds or None, median minor
    page faults per call on the CPU or None)} of every job, the jobs taking turns: `rounds`
    rounds, in each of which every job runs for min_time / rounds seconds (at least one
    call; on CUDA, then a turn of cold-L2 calls). The faults say how much of a CPU time is
    the kernel mapping fresh memory in (each a few microseconds on the build machines' VMs,
    14-56 thousand a call for eager's float32 forward at some shapes there), which other
    machines price differently.
    On a shared machine whose speed drifts over seconds (other tenants' load moved eager's
    times 2-4x between minutes on the CPU build machines), back-to-back timing can give one
    variant a slow minute and another a fast one; taking turns lets every variant see the
    same spells, so the ratios between them hold."""
    for fn in jobs.values():
        for _ in range(3):
            fn()
    _sync(device)
    host: Dict[tuple, List[float]] = {k: [] for k in jobs}
    faults: Dict[tuple, List[int]] = {k: [] for k in jobs}
    cold: Dict[tuple, list] = {k: [] for k in jobs}
    count_faults = device == "cpu" and _minor_faults() is not None

    def host_call(key, fn):
        f0 = _minor_faults() if count_faults else None
        host[key].append(_host_call(fn, device))
        if count_faults:
            faults[key].append(_minor_faults() - f0)
    timer = _ColdL2Timer() if device == "cuda" else None
    turn, per_round = min_time / rounds, max(1, max_reps // rounds)

    def one_turn(call):  # at least one call, then until the turn's time is up
        start = time.perf_counter()
        for _ in range(per_round):
            call()
            if time.perf_counter() - start >= turn:
                break

    for _ in range(rounds):
        for key, fn in jobs.items():
            one_turn(lambda: host_call(key, fn))
            if timer is not None:
                one_turn(lambda: timer.enqueue(fn, cold[key]))
    return {k: (statistics.median(host[k]), timer.median(cold[k]) if timer else None,
                statistics.median(faults[k]) if count_faults else None)
            for k in jobs}


def measure_ceilings(device: str, dtype: torch.dtype) -> Dict[str, float]:
    """GEMM rate (FLOP/s) in `dtype` (tensor cores on a GPU for 16-bit types; TF32 where
    PyTorch's flags allow it), the FP32 FMA rate (a float32 GEMM without TF32: the depthwise
    convolutions' units) and copy bandwidth (bytes read + written per s), each from its
    fastest repeat: a ceiling is the best the machine was seen doing, and on a shared
    machine the median of a few repeats can sit well below it."""
    n = 2048 if device == "cpu" else 8192

    def gemm_rate(dt):
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        t = time_fn(lambda: torch.mm(a, b), device, min_time=0.5, max_reps=20, best=True)
        rate = 2.0 * n ** 3 / t
        if device == "cpu":
            # torch.mm goes to the BLAS PyTorch was built with (MKL), which on some CPUs
            # runs well below what oneDNN's GEMM kernels reach there (AMD EPYC: 169 against
            # 434 GFLOP/s in float32); a channels_last 1x1 convolution is a oneDNN GEMM.
            # The ceiling is the faster of the two, so no variant can sit above its floor.
            x = torch.randn(16, 512, 32, 32, dtype=dt).to(memory_format=torch.channels_last)
            w = torch.randn(512, 512, 1, 1, dtype=dt).to(memory_format=torch.channels_last)
            with torch.no_grad():
                t = time_fn(lambda: torch.nn.functional.conv2d(x, w), device, min_time=0.5,
                            max_reps=20, best=True)
            rate = max(rate, 2.0 * x.numel() * 512 / t)
        return rate
    gemm = gemm_rate(dtype)
    if device == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            fp32 = gemm_rate(torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    else:
        fp32 = gemm if dtype == torch.float32 else gemm_rate(torch.float32)
    nbytes = (256 << 20) if device == "cpu" else (1 << 30)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, min_time=0.5, max_reps=20, best=True)
    return {"gemm_flops": gemm, "fp32_flops": fp32, "copy_bytes_per_s": 2.0 * nbytes / t}


def saved_bytes_per_block(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one block, not counting x and the
    parameters (which exist anyway): the block's own training-memory overhead."""
    seen, total = set(), [0]
    exclude = {x.untyped_storage().data_ptr()} | {
        p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in exclude:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return total[0]


@dataclass
class Row:
    shape: str
    variant: str
    mode: str  # "fwd" or "fwd+bwd"
    ms: float  # per call as a user's loop sees it (on a GPU: host overhead included)
    vs_eager: float  # best eager time / this time (> 1: faster); on a GPU, GPU times
    gflops: float
    gbps: float
    floor_frac: float  # floor_seconds / time (GPU time on a GPU)
    saved_mb: Optional[float] = None
    peak_mb: Optional[float] = None
    gpu_ms: Optional[float] = None  # GPU time per call, cold L2 (_ColdL2Timer); GPU only
    vs_eager_call: Optional[float] = None  # the same ratio on the per-call times; GPU only
    faults: Optional[float] = None  # minor page faults per call, median; CPU only


def _variants(shape: Shape, device: str, dtype: torch.dtype, backends: List[str],
              compile_ref: bool):
    """(name, module, memory_format, autocast) for each variant measured at this shape.
    For 16-bit dtypes the modules hold weights in that dtype; with `autocast` the module
    holds float32 weights and runs under torch.autocast(device, dtype) on a float32 input,
    the way mixed-precision training runs it (the "-ac" variants)."""
    mk = lambda b, dt=dtype: msfused.MultiScaleSeparableBlock(  # noqa: E731
        shape.c, shape.n, merge=shape.merge, stride=shape.stride, backend=b,
        device=device, dtype=dt)
    base = mk("reference")
    state = base.state_dict()
    lowp = dtype in (torch.float16, torch.bfloat16)
    base32 = None
    if lowp:
        base32 = mk("reference", torch.float32)
        base32.load_state_dict(state)
    fmts = (("nchw", torch.contiguous_format), ("cl", torch.channels_last))
    out = [(f"eager-{f}", base, fmt, False) for f, fmt in fmts]
    if lowp:
        out += [(f"eager-ac-{f}", base32, fmt, True) for f, fmt in fmts]
    for b in backends:
        m = mk(b)
        m.load_state_dict(state)
        out += [(f"{b}-{f}", m, fmt, False) for f, fmt in fmts]
        if lowp:
            m32 = mk(b, torch.float32)
            m32.load_state_dict(state)
            out += [(f"{b}-ac-{f}", m32, fmt, True) for f, fmt in fmts]
    if compile_ref:  # inductor prefers channels_last for convolutions
        # a fresh dynamo cache per shape: every shape recompiles the block's forward (and
        # again for grad mode), and past torch._dynamo.config.recompile_limit dynamo
        # silently runs the later shapes eagerly
        torch._dynamo.reset()
        out.append(("compile-cl", torch.compile(base), torch.channels_last, False))
    return out


def onnxruntime_forward(module: torch.nn.Module, x: torch.Tensor):
    """(forward callable, None) running `module` exported to ONNX (the dynamo exporter, as
    users ship it) in ONNX Runtime on the CPU with torch's thread count; or (None, why not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed (pip install 'msfused[onnx]')"
    import contextlib
    import io
    import warnings
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(module.eval(), (x,), dynamo=True).model_proto
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    name, xn = sess.get_inputs()[0].name, x.contiguous().numpy()
    return (lambda: sess.run(None, {name: xn})), None


def _variant_calls(mod: torch.nn.Module, x0: torch.Tensor, fmt, ac: bool, device: str,
                   dtype: torch.dtype):
    """(forward, training step, the step's input, autocast context) of one variant: the
    forward under no_grad, the step a forward and backward from a fixed output gradient with
    every gradient cleared first (no accumulation into old .grad tensors)."""
    x = (x0.float() if ac else x0).contiguous(memory_format=fmt)
    xg = x.clone().requires_grad_(True)
    cast = (lambda: torch.autocast(device, dtype=dtype)) if ac else contextlib.nullcontext
    with torch.no_grad(), cast():
        gy = torch.randn_like(mod(x))

    def fwd():
        with torch.no_grad(), cast():
            return mod(x)

    def train():
        xg.grad = None
        for p in mod.parameters():
            p.grad = None
        with cast():
            y = mod(xg)
        y.backward(gy)

    return fwd, train, xg, cast


def _peak_mb(fn: Callable[[], object]) -> float:
    """CUDA memory one call allocates at its peak beyond what was allocated before, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base_mem) / 2 ** 20


def bench_shape(shape: Shape, device: str, dtype: torch.dtype, backends: List[str],
                ceilings: Dict[str, float], compile_ref: bool, min_time: float,
                onnxruntime: bool = False) -> List[Row]:
    torch.manual_seed(0)
    elem = torch.finfo(dtype).bits // 8
    x0 = torch.randn(shape.batch, shape.c, shape.h, shape.w, device=device, dtype=dtype)
    fl_f, by_f = flops_forward(shape), bytes_forward(shape, elem)
    fl_t, by_t = 3 * fl_f, bytes_train(shape, elem)
    results: Dict[tuple, tuple] = {}
    jobs: Dict[tuple, Callable[[], object]] = {}
    peaks: Dict[tuple, Optional[float]] = {}
    for name, mod, fmt, ac in _variants(shape, device, dtype, backends, compile_ref):
        fwd, train, xg, cast = _variant_calls(mod, x0, fmt, ac, device, dtype)
        for mode, fn in (("fwd", fwd), ("fwd+bwd", train)):
            jobs[(name, mode)] = fn
            peaks[(name, mode)] = _peak_mb(fn) if device == "cuda" else None
        try:
            with cast():
                saved = saved_bytes_per_block(mod, xg) / 2 ** 20
        except Exception:  # compiled modules hide their saved tensors
            saved = None
        results[(name, "saved")] = saved
    if onnxruntime and device == "cpu" and dtype == torch.float32:
        base = _variants(shape, device, dtype, [], False)[0][1]
        fn, why = onnxruntime_forward(base, x0)
        if fn is None:
            print(f"  (ONNX Runtime skipped: {why})")
        else:
            jobs[("onnxrt", "fwd")] = fn
            peaks[("onnxrt", "fwd")] = None
    for key, (t, tg, nf) in time_interleaved(jobs, device, min_time).items():
        results[key] = (t, peaks[key], tg, nf)
    rows = []
    for mode, fl, by in (("fwd", fl_f, by_f), ("fwd+bwd", fl_t, by_t)):
        floor = floor_seconds(shape, elem, ceilings, mode == "fwd+bwd")
        # the best eager layout (and, for 16-bit dtypes, the better of 16-bit weights and
        # autocast): what a user of plain PyTorch gets at best
        eager = [v for (name, m), v in results.items() if m == mode and name.startswith("eager")]
        best_call = min(e[0] for e in eager)
        best_gpu = min(e[2] for e in eager) if device == "cuda" else None
        for (name, m), val in results.items():
            if m != mode:
                continue
            t, peak, tg, nf = val
            tt = tg if tg is not None else t  # the ratio and the floor on GPU time
            best = best_gpu if tg is not None else best_call
            rows.append(Row(shape.name, name, mode, t * 1e3, best / tt, fl / tt / 1e9,
                            by / tt / 1e9, floor / tt, results.get((name, "saved")), peak,
                            None if tg is None else tg * 1e3,
                            None if tg is None else best_call / t, nf))
    return rows


def git_commit() -> str:
    """The commit measured: MSFUSED_COMMIT if set (a copy of the tree without .git), else git."""
    if os.environ.get("MSFUSED_COMMIT"):
        return os.environ["MSFUSED_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "") or "unknown"
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def format_table(rows: List[Row]) -> str:
    gpu = any(r.gpu_ms is not None for r in rows)
    faults = any(r.faults is not None for r in rows)
    hdr = (f"{'shape':<10} {'variant':<14} {'mode':<8} {'ms':>9} "
           + (f"{'x eager':>8} {'GPU ms':>9} " if gpu else "")
           + f"{'x eager':>8} {'GFLOP/s':>8} {'GB/s':>8} {'floor%':>7} {'saved MB':>9} "
           f"{'peak MB':>8}" + (f" {'faults':>8}" if faults else ""))
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        saved = "" if r.saved_mb is None else f"{r.saved_mb:9.1f}"
        peak = "" if r.peak_mb is None else f"{r.peak_mb:8.1f}"
        mid = ""
        if gpu:
            mid = (f"{r.vs_eager_call or 0:8.2f} {r.gpu_ms or 0:9.3f} " if r.gpu_ms is not None
                   else f"{'':8} {'':9} ")
        nf = "" if r.faults is None else f"{r.faults:8.0f}"
        lines.append(f"{r.shape:<10} {r.variant:<14} {r.mode:<8} {r.ms:9.3f} {mid}"
                     f"{r.vs_eager:8.2f} {r.gflops:8.1f} {r.gbps:8.1f} {100 * r.floor_frac:6.1f}% "
                     f"{saved:>9} {peak:>8}" + (f" {nf:>8}" if faults else ""))
    if gpu:
        lines.append("(first 'ms' and 'x eager': per call as a loop sees it; 'GPU ms', the "
                     "second 'x eager', GFLOP/s, GB/s and floor%: GPU time, cold L2)")
    if faults:
        lines.append("(faults: minor page faults per call, the median: fresh memory the "
                     "kernel maps in during the call, part of its 'ms')")
    return "\n".join(lines)


def summarize(rows: List[Row], backends: List[str]) -> str:
    """Geometric mean over shapes of each variant's speed-up against the best eager layout."""
    lines = ["geometric mean of (best eager time / variant time) over shapes:"]
    variants = sorted({r.variant for r in rows if not r.variant.startswith("eager")})
    for v in variants:
        parts = []
        for mode in ("fwd", "fwd+bwd"):
            xs = [r.vs_eager for r in rows if r.variant == v and r.mode == mode]
            if xs:
                parts.append(f"{mode} {math.exp(sum(map(math.log, xs)) / len(xs)):.2f}x")
        lines.append(f"  {v:<14} " + ", ".join(parts))
    return "\n".join(lines)


def plot_results(result: dict, path: str) -> None:
    """Per shape, each variant's speed-up over the best eager layout (forward, and
    forward+backward), with the floor: the speed-up at which the run's ceilings say the
    block cannot go faster (floor_seconds: bytes over the copy rate, depthwise FLOPs over
    the FP32 rate, GEMM FLOPs over the GEMM rate)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [Row(**r) for r in result["rows"]]
    shapes = list(dict.fromkeys(r.shape for r in rows))
    modes = [m for m in ("fwd", "fwd+bwd") if any(r.mode == m for r in rows)]
    variants = [v for v in dict.fromkeys(r.variant for r in rows) if not v.startswith("eager")]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, mode in zip(axes[0], modes):
        for i, v in enumerate(variants):
            xs, ys = [], []
            for j, sh in enumerate(shapes):
                r = [r for r in rows if r.shape == sh and r.mode == mode and r.variant == v]
                if r:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(r[0].vs_eager)
            if xs:
                ax.bar(xs, ys, width, label=v)
        for j, sh in enumerate(shapes):  # the floor as a speed-up: vs_eager / floor_frac
            r = [r for r in rows if r.shape == sh and r.mode == mode and r.floor_frac > 0]
            if r:
                ax.hlines(r[0].vs_eager / r[0].floor_frac, j - 0.45, j + 0.45, colors="k",
                          linestyles="dashed", label="floor" if j == 0 else None)
        ax.axhline(1.0, color="grey", linewidth=0.8)  # the best eager layout
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(shapes)), shapes, rotation=20)
        ax.set_ylabel("speed-up over the best eager layout")
        ax.set_title(f"{mode}, {result['dtype']}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"{result['device']}; torch {result['torch']}; commit {result['commit']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    if getattr(args, "tf32", True) or args.device != "cuda":
        return _run(args)
    # --no-tf32: float32 convolutions and matmuls in IEEE float32 on CUDA, for eager (cuDNN)
    # and for the fused kernels alike (they read the same flag), restored afterwards
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _run(args)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _run(args) -> dict:
    if getattr(args, "from_results", ""):  # re-plot a results file, measure nothing
        with open(args.from_results) as f:
            result = json.load(f)
        if not args.plot:
            raise SystemExit("msfused bench: --from needs --plot FILE.png")
        plot_results(result, args.plot)
        print(f"plot written to {args.plot}")
        return result
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("msfused bench: --device cuda but no GPU is visible")
    dtype = getattr(torch, args.dtype)
    avail = msfused.available_backends()
    backends = [b for b in (args.backends.split(",") if args.backends else avail)
                if b != "reference" and avail[b].available and device in avail[b].device_types
                and dtype in msfused.backends.get_backend(b).dtypes]
    by_name = {s.name: s for group in SHAPES.values() for s in group}
    shapes = []
    for key in args.shapes.split(","):
        if key in SHAPES:
            shapes += SHAPES[key]
        elif key in by_name:
            shapes.append(by_name[key])
        else:
            raise SystemExit(f"msfused bench: --shapes: unknown group or shape {key!r} "
                             f"(groups {sorted(SHAPES)}, shapes {sorted(by_name)})")
    if args.quick:  # a smoke run: smaller batches, no compile
        shapes = [Shape(s.name, max(1, s.batch // 16), s.c, s.n, s.h, s.w, s.merge, s.stride)
                  for s in shapes]
    ceilings = measure_ceilings(device, dtype if dtype != torch.float64 else torch.float64)
    print(f"device: {device_name(device)}; torch {torch.__version__}; commit {git_commit()}; "
          f"dtype {args.dtype}")
    print(f"ceilings: GEMM ({args.dtype}) {ceilings['gemm_flops'] / 1e9:.1f} GFLOP/s, FP32 "
          f"{ceilings['fp32_flops'] / 1e9:.1f} GFLOP/s, copy "
          f"{ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s; fused backends: {backends}")
    rows: List[Row] = []
    for s in shapes:
        r = bench_shape(s, device, dtype, backends, ceilings, args.compile and not args.quick,
                        args.min_time, onnxruntime=args.onnxruntime and not args.quick)
        rows += r
        print(format_table(r).split("\n", 2)[2] if rows != r else format_table(r), flush=True)
    if device == "cpu" and not args.quick:
        # The CPU is shared: a ceiling measured once at the start can be caught low, and a
        # variant then shows above 100% of its floor. Measured again after the run, the
        # higher of the two counts, and the floor fractions are recomputed with it.
        again = measure_ceilings(device, dtype)
        higher = {k: max(v, again[k]) for k, v in ceilings.items()}
        if higher != ceilings:
            ceilings = higher
            elem = torch.finfo(dtype).bits // 8
            run_shapes = {x.name: x for x in shapes}
            for r in rows:
                tt = (r.gpu_ms if r.gpu_ms is not None else r.ms) / 1e3
                r.floor_frac = floor_seconds(run_shapes[r.shape], elem, ceilings,
                                             r.mode == "fwd+bwd") / tt
            print(f"ceilings measured again after the run, the higher of the two: GEMM "
                  f"{ceilings['gemm_flops'] / 1e9:.1f} GFLOP/s, FP32 "
                  f"{ceilings['fp32_flops'] / 1e9:.1f} GFLOP/s, copy "
                  f"{ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s; floor fractions with them:")
            print(format_table(rows))
    summary = summarize(rows, backends)
    print(summary)
    result = {
        "device": device_name(device), "device_type": device, "torch": torch.__version__,
        "commit": git_commit(), "dtype": args.dtype, "threads": torch.get_num_threads(),
        # whether float32 could run on TF32 tensor cores (CUDA; cuDNN's flag, which the
        # fused kernels follow too)
        "tf32": bool(torch.backends.cudnn.allow_tf32) if device == "cuda" else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": ceilings, "shapes": [asdict(s) for s in shapes],
        "rows": [asdict(r) for r in rows], "summary": summary,
    }
    out = args.out or os.path.join(
        REPO, "benchmarks", "results",
        f"bench-{device}-{args.dtype}-{_dt.datetime.now():%Y%m%d-%H%M%S}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results written to {out}")
    if args.plot:
        plot_results(result, args.plot)
        print(f"plot written to {args.plot}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--shapes", default="paper,mobilenet",
                   help="comma-separated groups (paper, mobilenet) or shape names (e.g. mnet-14)")
    p.add_argument("--backends", default="",
                   help="comma-separated fused backends (default: every available one)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile of the reference")
    p.add_argument("--quick", action="store_true", help="small batches, no compile (smoke test)")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per variant")
    p.add_argument("--out", default="", help="results file (JSON)")
    p.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false",
                   help="skip ONNX Runtime (measured on the CPU in float32 when installed)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="CUDA float32 without TF32 (torch.backends.cudnn/cuda.matmul.allow_tf32 "
                        "off for eager and the fused kernels)")
    p.add_argument("--plot", default="", help="also draw the speed-ups into this PNG")
    p.add_argument("--from", dest="from_results", default="",
                   help="with --plot: draw a results file instead of measuring")


__all__ = ["Shape", "SHAPES", "run", "add_arguments", "flops_forward", "bytes_forward",
           "memory_format_of", "plot_results", "onnxruntime_forward"]
