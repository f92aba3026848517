"""The benchmark harness (msfused bench): its arithmetic, which variants a 16-bit run
measures and what the ratios are taken against (no timing here: performance lives in
`msfused bench`)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from msfused.benchmark import (SHAPES, Row, Shape, bench_shape, bytes_forward, bytes_train,
                               floor_seconds, flops_forward, flops_split, format_table,
                               time_interleaved)

MNET14 = {s.name: s for g in SHAPES.values() for s in g}["mnet-14"]


def test_flops_split_counts_the_depthwise_and_the_gemms():
    s = MNET14  # add, C=256, N=128, 14x14, batch 32: a projection (C_out 128 != 256)
    dw, gemm = flops_split(s)
    px = 32 * 14 * 14
    assert dw == 2 * px * 27 * 256
    assert gemm == 2 * px * (2 * 128 * 256 + 128 * 256)
    assert flops_forward(s) == dw + gemm


def test_floor_is_the_largest_of_the_three_terms():
    s, elem = MNET14, 2
    dw, gemm = flops_split(s)
    by_f, by_t = bytes_forward(s, elem), bytes_train(s, elem)
    huge = 1e30
    bw_bound = {"gemm_flops": huge, "fp32_flops": huge, "copy_bytes_per_s": 1e9}
    dw_bound = {"gemm_flops": huge, "fp32_flops": 1e6, "copy_bytes_per_s": huge}
    mm_bound = {"gemm_flops": 1e6, "fp32_flops": 1e6, "copy_bytes_per_s": huge}
    assert floor_seconds(s, elem, bw_bound, False) == by_f / 1e9
    assert floor_seconds(s, elem, bw_bound, True) == by_t / 1e9
    assert floor_seconds(s, elem, dw_bound, False) == dw / 1e6
    assert floor_seconds(s, elem, mm_bound, True) == 3 * gemm / 1e6
    # a CPU whose 16-bit GEMM is slower than its float32 one: kernels may multiply 16-bit
    # data in float32, so the floor takes the faster rate
    slow16 = {"gemm_flops": 1e5, "fp32_flops": 1e6, "copy_bytes_per_s": huge}
    assert floor_seconds(s, elem, slow16, True) == 3 * gemm / 1e6
    # a results file from before the FP32 ceiling: the GEMM rate stands in for it
    old = {"gemm_flops": 1e6, "copy_bytes_per_s": huge}
    assert floor_seconds(s, elem, old, False) == max(dw, gemm) / 1e6


def test_gpu_rows_show_both_timings():
    cpu = Row("mnet-14", "cpp-cl", "fwd", 1.0, 2.0, 1.0, 1.0, 0.5)
    gpu = Row("mnet-14", "cuda-cl", "fwd", 0.5, 3.0, 1.0, 1.0, 0.5, gpu_ms=0.1, vs_eager_call=1.5)
    assert "GPU ms" not in format_table([cpu])
    table = format_table([gpu])
    assert "GPU ms" in table and "0.100" in table and "1.50" in table


def test_old_results_files_still_load():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                        "bench-cpu-float32-onnx.json")
    with open(path) as f:
        rows = [Row(**r) for r in json.load(f)["rows"]]
    assert rows and all(r.gpu_ms is None for r in rows)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bench_shape_variants_and_best_eager(dtype):
    s = Shape("tiny", 2, 8, 8, 6, 6, "add")
    ceilings = {"gemm_flops": 1e11, "copy_bytes_per_s": 1e10}
    rows = bench_shape(s, "cpu", dtype, ["cpp"], ceilings, compile_ref=False, min_time=0.0)
    names = {r.variant for r in rows}
    eager, fused = {"eager-nchw", "eager-cl"}, {"cpp-nchw", "cpp-cl"}
    if dtype == torch.bfloat16:  # 16-bit weights and autocast, for eager and the fused op
        eager |= {"eager-ac-nchw", "eager-ac-cl"}
        fused |= {"cpp-ac-nchw", "cpp-ac-cl"}
    assert names == eager | fused
    for mode in ("fwd", "fwd+bwd"):
        mine = [r for r in rows if r.mode == mode]
        best = min(r.ms for r in mine if r.variant in eager)
        for r in mine:
            assert r.vs_eager == pytest.approx(best / r.ms)


def test_variants_take_turns():
    # interleaved timing: after each job's warm-up, every round runs every job once (a turn
    # of min_time / rounds = 0 s is one call), so a slow spell of a shared machine falls on
    # all of them alike
    log = []
    jobs = {("a", "fwd"): lambda: log.append("a"), ("b", "fwd"): lambda: log.append("b")}
    out = time_interleaved(jobs, "cpu", min_time=0.0, rounds=4)
    assert log == ["a"] * 3 + ["b"] * 3 + ["a", "b"] * 4
    assert set(out) == set(jobs)
    assert all(t >= 0 and tg is None for t, tg, _ in out.values())


# Run in a process of its own: in one CI run, inside a pytest worker that had run other
# tests first, the fresh 64 MiB tensor counted 0 faults a call (which earlier test left the
# process that way was not found); in a process of its own it counts 16385 on that machine.
FAULTS_PROBE = """
import torch
from msfused.benchmark import time_interleaved
kept = torch.zeros(1 << 24)
jobs = {("fresh", "fwd"): lambda: torch.ones(1 << 24),
        ("kept", "fwd"): lambda: kept.fill_(1.0)}
out = time_interleaved(jobs, "cpu", min_time=0.0, rounds=3)
print(out[("fresh", "fwd")][2], out[("kept", "fwd")][2])
"""


def test_cpu_timings_count_page_faults():
    # the minor page faults of each call, the median: a job that touches a fresh 64 MiB
    # buffer every call faults at least once per 4 KiB page (2 MiB with huge pages), one
    # that reuses a mapped buffer about never; the table shows them in their own column
    run = subprocess.run([sys.executable, "-c", FAULTS_PROBE], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    fresh, kept_faults = (float(v) for v in run.stdout.split()[-2:])
    assert fresh >= 64 * 1024 // 2048 and kept_faults < 4, (fresh, kept_faults)
    row = Row("mnet-14", "eager-cl", "fwd", 1.0, 1.0, 1.0, 1.0, 0.5, faults=fresh)
    table = format_table([row])
    assert "faults" in table.splitlines()[0] and f"{fresh:8.0f}" in table


def _bench_args(*argv):
    import argparse
    from msfused import benchmark
    p = argparse.ArgumentParser()
    benchmark.add_arguments(p)
    return p.parse_args(list(argv))


def test_no_tf32_flag_restores_the_flags():
    """`msfused bench --device cuda --no-tf32` turns cuDNN's and matmul's TF32 off for the run
    (eager and the fused kernels read them) and puts them back, also when the run fails
    (here: no GPU, or an unknown shape)."""
    from msfused import benchmark
    args = _bench_args("--device", "cuda", "--no-tf32", "--shapes", "no-such-shape")
    assert args.tf32 is False and _bench_args().tf32 is True
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    seen = {}
    real = benchmark._run

    def spy(a):
        seen["flags"] = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        return real(a)

    benchmark._run = spy
    try:
        with pytest.raises(SystemExit):
            benchmark.run(args)
    finally:
        benchmark._run = real
    assert seen["flags"] == (False, False)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_no_tf32_run_records_it(tmp_path):
    from msfused import benchmark
    out = str(tmp_path / "r.json")
    r = benchmark.run(_bench_args("--device", "cuda", "--quick", "--shapes", "mnet-14",
                                  "--no-tf32", "--no-onnxruntime", "--min-time", "0",
                                  "--out", out))
    assert r["tf32"] is False
    with open(out) as f:
        assert json.load(f)["tf32"] is False
