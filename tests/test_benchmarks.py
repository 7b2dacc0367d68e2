"""Keep the benchmark scripts from rotting: run each main() with the tiniest settings (--smoke).

These check structure (keys present, numbers positive and finite), not speed. One thread each, so the
shared CI machine is not oversubscribed.
"""
import math
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_bench_sample_smoke(tmp_path):
    import bench_sample
    out = tmp_path / "s.json"
    res = bench_sample.main(["--smoke", "--threads", "1", "--json", str(out)])
    assert out.exists()
    rows = res["rows"]
    assert {(r["impl"], r["method"], r["steps"]) for r in rows if r["impl"] == "cpu"} >= {
        ("cpu", "DDPM", 1000), ("cpu", "DDIM", 50)}
    for r in rows:
        assert {"impl", "method", "steps", "batch", "seconds", "images_per_s", "extrapolated"} <= set(r)
        assert _positive(r["seconds"]) and _positive(r["images_per_s"])
    # smoke extrapolates DDPM-1000 from a few steps and must say so
    assert all(r["extrapolated"] for r in rows if r["method"] == "DDPM")
    s = res["summary"]
    for k in ("cpu_ddim50_vs_ddpm1000_speedup", "model_forward_s", "ddpm_loop_overhead_step_s",
              "ddim_loop_overhead_step_s", "predicted_speedup"):
        assert _positive(s[k]), k
    assert 0 < s["ddpm_overhead_fraction"] < 1


def test_torch_loop_matches_difnumpy():
    """The PyTorch baseline loop does the same DDIM maths as difnumpy.sample (same x_T, same model)."""
    pytest.importorskip("torch")
    import bench_sample
    import difnumpy
    schedule = difnumpy.Schedule.from_name("linear", 1000)
    x_T = np.random.default_rng(0).standard_normal((3, 1, 4, 4), dtype=np.float32)

    def model(x, t):
        return x * 0.3

    a, steps_a = bench_sample.difnumpy_loop(model, schedule, x_T, "ddim", 20)
    b, steps_b = bench_sample.torch_loop(model, schedule.alphas_cumprod, x_T, "ddim", 20)
    assert len(steps_a) == len(steps_b) == 20
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bench_scaling_smoke(tmp_path):
    import bench_scaling
    png = tmp_path / "scaling.png"
    res = bench_scaling.main(["--smoke", "--threads", "1", "--plot", str(png)])
    assert png.exists() and png.stat().st_size > 1000
    assert {r["sweep"] for r in res["rows"]} == {"batch", "size", "steps"}
    for r in res["rows"]:
        assert _positive(r["cpu_s"])
    assert {"batch_cpu", "size_cpu", "steps_cpu"} <= set(res["slopes"])
    assert all(math.isfinite(v) for v in res["slopes"].values())


def test_fit_slope_exact():
    import bench_scaling
    x = np.array([1, 2, 4, 8.0])
    assert bench_scaling.fit_slope(x, 3 * x ** 2) == pytest.approx(2.0)


def test_bench_memory_smoke():
    import bench_memory
    res = bench_memory.main(["--smoke", "--threads", "1"])
    kinds = {r["kind"] for r in res["rows"]}
    assert kinds == {"train", "sample"}
    for r in res["rows"]:
        assert {"peak_MB", "required_MB", "ratio", "baseline_MB"} <= set(r)
        assert _positive(r["required_MB"]) and _positive(r["baseline_MB"]) and _positive(r["ratio"])


def test_required_elements_counts():
    """The analytic training minimum scales linearly in N and matches the architecture's known counts."""
    import bench_memory
    a, b = bench_memory.required_elements(2, 8, 8), bench_memory.required_elements(4, 8, 8)
    assert b["saved"] == 2 * a["saved"] and b["live_peak"] == 2 * a["live_peak"]
    # the largest live set at 8x8: the last up ResBlock's concat (96 ch) + GN output + conv1 output (32 ch)
    assert a["live_peak"] == 2 * 64 * (96 + 96 + 32)


def test_run_all_summary(tmp_path):
    import run_all
    out = tmp_path / "all.json"
    res = run_all.main(["--smoke", "--threads", "1", "--only", "sample", "memory", "--json", str(out)])
    assert not res["errors"], res["errors"]
    assert out.exists()
    figs = {r["figure"] for r in res["summary"]}
    assert "DDIM-50 vs DDPM-1000 wall-clock speedup" in figs
    assert any(f.startswith("peak RSS / required") for f in figs)
    assert all(r["status"] in ("met", "NOT met", "-") for r in res["summary"])
