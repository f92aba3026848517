"""The benchmark harness (msfused bench): which variants a 16-bit run measures and what the
ratios are taken against."""
import pytest
import torch

from msfused.benchmark import Shape, bench_shape


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
