"""Keep the benchmark scripts from rotting: run each main() with the tiniest settings (--smoke).

These check structure (keys present, numbers positive and finite), not speed. One thread each, so the
shared CI machine is not oversubscribed.
"""
import json
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
        assert r["warmup_steps"] >= 5 and isinstance(r["warmup_stable"], bool)
        if "cpu/torch" in r:  # the ratio sits beside both sides' absolute images/s
            assert r["cpu/torch"] == pytest.approx(r["images_per_s"] / r["torch_images_per_s"])
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
    b, steps_b = bench_sample.torch_loop(model, schedule, x_T, "ddim", 20)
    assert len(steps_a) == len(steps_b) == 20
    np.testing.assert_allclose(a, b, atol=1e-5)
    # and DPM-Solver++(2M): the same multistep update at the same timesteps
    a, steps_a = bench_sample.difnumpy_loop(model, schedule, x_T, "dpmpp_2m", 15)
    b, steps_b = bench_sample.torch_loop(model, schedule, x_T, "dpmpp_2m", 15)
    assert len(steps_a) == len(steps_b) == 15
    assert np.abs(a - x_T).max() > 0.1  # the loop did something
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class _FakeClock:
    """A clock the contenders advance by their own scripted step times: the warm-up logic is tested exactly."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def __call__(self):
        return self.now

    def contender(self, name, durations):
        it = iter(durations)

        def step():
            self.log.append(name)
            self.now += next(it)
        return step


def test_warm_until_stable_waits_until_the_step_time_settles():
    """A contender that needs several steps to settle (like PyTorch's allocator and thread pool; one untimed call
    of warm-up used to leave it cold) is warmed until two successive 3-step medians agree within 5 %; the
    timing after that sees the settled step time, not the cold ones."""
    from _common import time_interleaved, warm_until_stable

    clock = _FakeClock()
    cold = [9.0] + [5.0, 4.0, 3.0, 2.2, 1.6, 1.3, 1.1] + [1.0] * 100  # untimed call, 7 settling steps, settled
    fns = {"torch": clock.contender("torch", cold), "numba": clock.contender("numba", [7.0] + [2.0] * 100)}
    rep = warm_until_stable(fns, clock=clock)
    assert rep["torch"]["stable"] and rep["numba"]["stable"]
    # after 10 steps the block medians are 1.3 and 1.0 (23 % apart), after 11 1.1 and 1.0 (9 %), after 12 equal
    assert rep["torch"]["steps"] == 12 and rep["torch"]["median_s"] == 1.0
    assert rep["numba"]["steps"] == rep["torch"]["steps"]  # interleaved: the stable one keeps running beside
    times = time_interleaved(fns, 5, clock=clock)
    assert times["torch"] == [1.0] * 5 and times["numba"] == [2.0] * 5
    # alternation, with the order reversed every other round
    assert clock.log[:6] == ["torch", "numba", "numba", "torch", "torch", "numba"]


def test_warm_until_stable_minimum_and_budget():
    from _common import warm_until_stable

    clock = _FakeClock()
    rep = warm_until_stable({"a": clock.contender("a", [1.0] * 100)}, clock=clock)
    assert rep["a"]["steps"] == 6 and rep["a"]["stable"]  # at least 5 steps and two 3-step blocks
    rep = warm_until_stable({"a": clock.contender("a", [1.0] * 100)}, min_steps=8, clock=clock)
    assert rep["a"]["steps"] == 8
    # never settles: the budget ends the warm-up and the report says so
    clock = _FakeClock()
    rep = warm_until_stable({"a": clock.contender("a", [1.0, 2.0, 1.0, 1.0, 2.0, 2.0] * 50)}, max_steps=20,
                            clock=clock)
    assert rep["a"]["steps"] == 20 and not rep["a"]["stable"]
    clock = _FakeClock()
    rep = warm_until_stable({"a": clock.contender("a", [1.0, 2.0, 1.0, 1.0, 2.0, 2.0] * 50)}, max_seconds=10.5,
                            clock=clock)
    assert not rep["a"]["stable"] and 7 <= rep["a"]["steps"] <= 9
    with pytest.raises(ValueError, match="rtol"):
        warm_until_stable({"a": lambda: None}, rtol=0.0)


def test_run_interleaved_per_contender_repeats():
    from _common import run_interleaved

    clock = _FakeClock()
    fns = {"slow": clock.contender("slow", [10.0] * 5), "fast": clock.contender("fast", [1.0] * 5)}
    res = run_interleaved(fns, {"slow": 1, "fast": 3}, clock=clock)
    assert [t for t, _ in res["slow"]] == [10.0] and [t for t, _ in res["fast"]] == [1.0] * 3
    assert clock.log == ["slow", "fast", "fast", "fast"]


def test_bench_train_smoke(tmp_path):
    import bench_train
    out = tmp_path / "t.json"
    rows, conv = bench_train.main(["--smoke", "--threads", "1", "--json", str(out)])
    assert out.exists()
    assert {(r["size"], r["phase"]) for r in rows} == {("8x8", "train"), ("8x8", "forward")}
    names = ["cpu"] + (["torch"] if bench_train.torch is not None else [])
    for r in rows:
        for name in names:
            assert _positive(r[name]), (name, r)
            assert r[f"{name}_warmup_steps"] >= 5 and isinstance(r[f"{name}_stable"], bool)
        if "torch" in names:  # the ratio is reported beside both sides' absolute images/s
            assert r["cpu/torch"] == pytest.approx(r["cpu"] / r["torch"])
            if r["phase"] == "train":  # and each side's share of the matmul rate, in (0, 100] %
                assert 0 < r["cpu_%matmul"] <= 100 and 0 < r["torch_%matmul"] <= 100
    if bench_train.torch is not None:  # PyTorch's FLOP counter: 61.9 MFLOP per 8x8 training image (issue 15)
        assert bench_train.train_flops_per_image(8) == pytest.approx(61.94e6, rel=1e-3)
    assert len(conv) == 1 and _positive(conv[0]["numba_fwd"]) and _positive(conv[0]["sgemm"])
    saved = json.loads(out.read_text())  # the matmul rate at its best: measured before and after the models
    assert len(saved["sgemm_runs"]) == 2 and saved["sgemm_gflops"] == max(saved["sgemm_runs"]) > 0


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


def test_bench_solvers_quick(tmp_path):
    import bench_solvers
    out = tmp_path / "r.json"
    res = bench_solvers.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--json", str(out)])
    assert out.exists() and (tmp_path / "quality_vs_nfe.png").exists()
    rows = res["rows"]
    assert (tmp_path / "quality_vs_nfe.md").read_text().count("\n| ") == len(rows) + 1  # header + rows
    assert {r["method"] for r in rows} == set(bench_solvers.METHODS)
    assert {(r["label"], r["nfe"]) for r in rows} >= {("dpmpp_2m", 5), ("dpmpp_2m", 10), ("heun", 9), ("ddim", 50)}
    assert sum(r["defaults"] for r in rows) == 6
    for r in rows:
        assert _positive(r["fd"]) and r["seconds"] >= 0 and r["n"] == 16
    assert _positive(res["summary"]["dpmpp_2m_10_vs_ddim50"])


@pytest.mark.skipif(__import__("shutil").which("mpiexec") is None, reason="no mpiexec (the mpi extra)")
def test_bench_distributed_quick(tmp_path):
    import json

    import bench_distributed
    out = tmp_path / "d.json"
    assert bench_distributed.main(["--quick", "--batch", "16", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert all(_positive(v) for v in res["median_images_per_s"].values())
    # every gradient, then the loss and the stop flag: one buffer, one call per step
    assert _positive(res["ratio_2x1_over_1x2"]) and res["allreduce_bytes"] == (410_721 + 2) * 4
