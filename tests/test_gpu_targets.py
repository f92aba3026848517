"""tools/gpu/targets.py: the CUDA issues' targets computed from `msfused bench` results
(what the next GPU run's note reports), on made-up results with known answers."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools", "gpu"))
import targets  # noqa: E402


def _row(shape, variant, mode, ms, gpu_ms, vs_eager, floor, peak):
    return dict(shape=shape, variant=variant, mode=mode, ms=ms, gpu_ms=gpu_ms,
                vs_eager=vs_eager, floor_frac=floor, peak_mb=peak)


def _results(speed, compile_rows=True):
    """Two shapes; the fused op `speed` times eager's GPU time, torch.compile 2x eager's;
    the per-call times (ms) deliberately different so that using them would show."""
    rows = []
    for shape, eager_gpu in (("mnet-56", 1.0), ("mnet-28", 4.0)):
        for mode in ("fwd", "fwd+bwd"):
            rows.append(_row(shape, "eager-cl", mode, 50.0, eager_gpu, 1.0, 0.05, 100.0))
            rows.append(_row(shape, "eager-nchw", mode, 60.0, 2 * eager_gpu, 0.5, 0.02, 80.0))
            rows.append(_row(shape, "cuda-cl", mode, 40.0, eager_gpu / speed, speed,
                             0.6 if shape == "mnet-56" else 0.4, 20.0))
            if compile_rows:
                rows.append(_row(shape, "compile-cl", mode, 45.0, eager_gpu / 2, 2.0, 0.1, 90.0))
    return dict(device="test", torch="x", commit="c", dtype="bfloat16", rows=rows,
                shapes=[dict(name="mnet-56"), dict(name="mnet-28")])


def test_targets_from_results():
    ev = targets.evaluate([_results(6.0)], "cuda-cl")
    fwd = {name: (v, met) for name, v, _, met in ev["fwd"]["targets"]}
    assert fwd["x eager (geomean)"] == (pytest.approx(6.0), True)
    assert fwd["x torch.compile (geomean)"][0] == pytest.approx(3.0)  # GPU times: 2x eager / 6x
    assert fwd["floor fraction at mnet-56"] == (0.6, True)
    assert fwd["floor fraction at mnet-28"] == (0.4, False)
    train = {name: (v, met) for name, v, _, met in ev["fwd+bwd"]["targets"]}
    assert train["x eager (geomean)"] == (pytest.approx(6.0), True)
    # 20 MB against the least eager peak, 80 MB (eager-nchw): 0.25 <= 0.30
    assert train["peak memory / eager's (worst shape)"] == (pytest.approx(0.25), True)
    assert list(ev["fwd"]["shapes"]) == ["mnet-56", "mnet-28"]  # the file's order


def test_targets_missed_and_without_compile():
    ev = targets.evaluate([_results(3.0, compile_rows=False)], "cuda-cl")
    fwd = {name: (v, met) for name, v, _, met in ev["fwd"]["targets"]}
    assert fwd["x eager (geomean)"] == (pytest.approx(3.0), False)
    assert "x torch.compile (geomean)" not in fwd  # no compile rows: not reported, not met
    train = {name: (v, met) for name, v, _, met in ev["fwd+bwd"]["targets"]}
    assert train["x eager (geomean)"] == (pytest.approx(3.0), False)
    out = targets.report(ev, "cuda-cl")
    assert "MISS x eager (geomean): 3.00 (target >= 5.0)" in out
    assert targets.evaluate([_results(3.0)], "triton-cl") == {}
    assert math.isclose(targets._geomean([2.0, 8.0]), 4.0)
