"""Data-parallel training and sharded sampling on MPI: ``mpiexec -n 2`` against one process.

The MPI runs go through ``tests/mpi_worker.py`` under a real ``mpiexec`` (mpich from the ``mpi`` extra,
installed by CI); one-process runs of the same worker are the reference.
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from difnumpy._validation import SampleGenerators
from difnumpy.checkpoint import load_checkpoint
from difnumpy.distributed import SINGLE, GradientAllreduce, World, default_threads, get_world, launcher_size, shard

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install 'difnumpy[mpi]')")


def _env(threads=1):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_", "NUMBA_ENABLE_CUDASIM"))}
    env["NUMBA_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    return env


def run(n, *args, timeout=300):
    cmd = ([MPIEXEC, "-n", str(n)] if n > 1 else []) + [sys.executable, WORKER, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


# ---------------------------------------------------------------------------------------------- one process


def test_one_process_world_needs_no_mpi(monkeypatch):
    for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    assert launcher_size() == 1 and get_world() is SINGLE and SINGLE.size == 1 and SINGLE.is_root
    monkeypatch.setenv("PMI_SIZE", "4")
    assert launcher_size() == 4
    grads = {"w": np.ones(3, np.float32)}
    got, loss = GradientAllreduce(SINGLE)(grads, 2, 4, loss=0.5)
    assert got is grads and np.all(grads["w"] == 1) and loss == 0.5


def test_shards_and_batch_slices():
    for size in (1, 2, 3, 7):
        parts = [shard(10, World(r, size)) for r in range(size)]
        assert parts[0][0] == 0 and parts[-1][1] == 10
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
    assert [World(r, 4).batch_slice(128) for r in range(4)] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    with pytest.raises(ValueError, match="not divisible by the number of MPI ranks 3"):
        World(0, 3).batch_slice(128)
    assert default_threads(World(0, 2), cores=2) == 1 and default_threads(World(0, 4), cores=2) == 1
    assert default_threads(SINGLE, cores=2) == 2


def test_sample_generators_do_not_depend_on_the_batching():
    a = SampleGenerators(5, range(6)).standard_normal((6, 2, 3), np.float32)
    b = np.concatenate([SampleGenerators(5, range(0, 4)).standard_normal((4, 2, 3), np.float32),
                        SampleGenerators(5, range(4, 6)).standard_normal((2, 2, 3), np.float32)])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[3], np.random.default_rng([5, 3]).standard_normal((2, 3), np.float32))
    with pytest.raises(ValueError, match="one row per sample"):
        SampleGenerators(5, range(6)).standard_normal((5, 2))
    c = SampleGenerators((5, 30), [2]).standard_normal((1, 3))  # a tuple seed: default_rng([5, 30, i])
    np.testing.assert_array_equal(c[0], np.random.default_rng([5, 30, 2]).standard_normal(3))
    with pytest.raises(ValueError, match="seed must be an int >= 0 or a tuple"):
        SampleGenerators(-1, [0])


# ---------------------------------------------------------------------------------------------- under mpiexec


@needs_mpi
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float64", 1e-12)])
def test_two_ranks_train_like_one_process(tmp_path, dtype, rtol):
    steps = 20
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    r1 = run(1, "train", one, dtype, steps)
    r2 = run(2, "train", two, dtype, steps)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    a, b = np.load(one), np.load(two)
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=rtol * 10)
    worst = 0.0
    for k in a.files:
        if k == "losses":
            continue
        scale = max(float(np.abs(a[k]).max()), 1e-30)
        worst = max(worst, float(np.abs(b[k] - a[k]).max()) / scale)
    assert worst < rtol, worst
    assert not np.array_equal(a["p/stem.w"], np.load(one)["m/stem.w"])  # something was trained


@needs_mpi
def test_sharded_sampling_is_bit_identical_for_any_ranks_and_batch(tmp_path):
    one, two = tmp_path / "one.npy", tmp_path / "two.npy"
    r1 = run(1, "sample", one, 7, 7)
    r2 = run(2, "sample", two, 7, 2)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    a, b = np.load(one), np.load(two)
    assert a.shape == (7, 1, 8, 8) and np.abs(a).max() > 0
    np.testing.assert_array_equal(a, b)


@needs_mpi
def test_a_failing_rank_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt.npz"
    t0 = time.perf_counter()
    r = run(2, "fail", ckpt, 6, 3, timeout=120)
    elapsed = time.perf_counter() - t0
    assert r.returncode != 0
    assert r.stderr.count("rank 1 fails at step 3") == 1, r.stderr  # printed once, by the rank that raised
    assert elapsed < 60
    # intact (written atomically): the last step both ranks finished, or the one before if the abort came
    # while rank 0 was writing it
    tr = load_checkpoint(ckpt)
    assert tr.step_count in (2, 3)


@needs_mpi
def test_resume_on_two_ranks_from_a_one_process_checkpoint(tmp_path):
    from difnumpy import Schedule, Trainer
    from difnumpy.checkpoint import save_checkpoint
    sys.path.insert(0, HERE)
    try:
        import mpi_worker
    finally:
        sys.path.remove(HERE)
    x = mpi_worker.data(10)
    tr = Trainer(mpi_worker.model(), Schedule.from_name("cosine", 100), lr=1e-2, rng=0, ema_decay=0.9)
    for i in range(4):
        tr.step(x[i])
    path = tmp_path / "at4.npz"
    save_checkpoint(path, tr)
    straight = tmp_path / "straight.npz"
    assert run(1, "train", straight, "float32", 10).returncode == 0
    resumed = tmp_path / "resumed.npz"
    r = run(2, "train", resumed, "float32", 10, path)
    assert r.returncode == 0, r.stderr
    a, b = np.load(straight), np.load(resumed)
    np.testing.assert_allclose(b["losses"], a["losses"][4:], rtol=1e-4)
    for k in a.files:
        if k != "losses":
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5 * float(np.abs(a[k]).max()), err_msg=k)


@needs_mpi
def test_batch_not_divisible_by_ranks_is_refused(tmp_path):
    r = run(2, "batch", tmp_path / "x", 5, timeout=120)
    assert r.returncode != 0
    assert "batch_size 5 is not divisible by the number of MPI ranks 2" in r.stderr


# ---------------------------------------------------------------------------------------------- the CLI under mpiexec
TRAIN = ["--steps", "6", "--batch-size", "16", "--checkpoint-every", "3", "--base-channels", "8", "--timesteps", "100",
         "--no-progress"]


def cli(n, *args, timeout=300, env=None, code=None):
    """``[mpiexec -n N] python -m difnumpy ARGS`` (or, with ``code``, ``python -c CODE ARGS``)."""
    launch = [MPIEXEC, "-n", str(n)] if n > 1 else []
    prog = ["-c", code] if code else ["-m", "difnumpy"]
    return subprocess.run(launch + [sys.executable, *prog, *map(str, args)], capture_output=True, text=True,
                          env={**_env(), **(env or {})}, timeout=timeout)


def _params(path):
    z = np.load(path)
    return {k: z[k] for k in z.files if k.startswith(("params/", "ema/"))}


def test_configure_threads(monkeypatch):
    import numba

    from difnumpy.distributed import configure_threads
    before = numba.get_num_threads()
    try:
        monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
        assert configure_threads(SINGLE) == before  # one process: unchanged
        assert configure_threads(World(0, 64)) == 1 == numba.get_num_threads()  # cores // ranks, at least 1
        monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
        assert configure_threads(World(0, 64)) == 1  # set by the user: kept
        with pytest.raises(ValueError, match="threads must be in 1.."):
            configure_threads(SINGLE, numba.config.NUMBA_NUM_THREADS + 1)
    finally:
        numba.set_num_threads(before)


@needs_mpi
def test_cli_train_on_two_ranks_equals_one_process_and_only_rank0_writes(tmp_path):
    r1 = cli(1, "train", "--out", tmp_path / "one", *TRAIN)
    r2 = cli(2, "train", "--out", tmp_path / "two", *TRAIN)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("completed: step 6") == 1  # rank 0 alone reports
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    a, b = _params(tmp_path / "one" / "checkpoint.npz"), _params(tmp_path / "two" / "checkpoint.npz")
    assert a and list(a) == list(b)
    for k in a:
        # atol: biases in front of a GroupNorm get a zero gradient, rounding noise only (~1e-7 after Adam)
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    la = [r["loss"] for r in map(eval, open(tmp_path / "one" / "log.jsonl"))]  # noqa: S307 - our own JSON lines
    lb = [r["loss"] for r in map(eval, open(tmp_path / "two" / "log.jsonl"))]  # noqa: S307
    np.testing.assert_allclose(lb, la, rtol=1e-5)  # the global loss, not rank 0's half


@needs_mpi
def test_cli_resume_with_another_number_of_ranks_continues_exactly(tmp_path):
    straight = cli(1, "train", "--out", tmp_path / "straight", *TRAIN)
    first = cli(1, "train", "--out", tmp_path / "run", *TRAIN[:-1], "--no-progress", "--steps", "3")
    assert straight.returncode == 0 and first.returncode == 0, first.stderr
    r = cli(2, "train", "--out", tmp_path / "run", "--resume", "--steps", "6", "--no-progress")
    assert r.returncode == 0, r.stderr
    a, b = _params(tmp_path / "straight" / "checkpoint.npz"), _params(tmp_path / "run" / "checkpoint.npz")
    assert a and list(a) == list(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


@needs_mpi
def test_cli_sample_and_evaluate_are_the_same_for_any_ranks_and_batch_size(tmp_path):
    assert cli(1, "train", "--out", tmp_path / "run", *TRAIN).returncode == 0
    ckpt = tmp_path / "run" / "checkpoint.npz"
    common = ["--checkpoint", ckpt, "-n", 7, "--steps", 10, "--no-progress", "--method", "ddpm"]
    r1 = cli(1, "sample", *common, "--out", tmp_path / "s1", "--batch-size", 7)
    r2 = cli(2, "sample", *common, "--out", tmp_path / "s2", "--batch-size", 2)
    r3 = cli(1, "sample", *common, "--out", tmp_path / "s3", "--batch-size", 3)
    for r in (r1, r2, r3):
        assert r.returncode == 0, r.stderr
    assert r2.stdout.count("7 samples") == 1
    a = np.load(tmp_path / "s1" / "samples.npy")
    assert a.shape == (7, 1, 8, 8) and len(np.unique(a[:, 0, 0, 0])) == 7
    np.testing.assert_array_equal(np.load(tmp_path / "s2" / "samples.npy"), a)
    np.testing.assert_array_equal(np.load(tmp_path / "s3" / "samples.npy"), a)
    # sample i's noise is (seed, i): the first 4 of 7 are the 4 samples of -n 4
    r4 = cli(1, "sample", *common[:2], "-n", 4, *common[4:], "--out", tmp_path / "s4")
    assert r4.returncode == 0, r4.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "s4" / "samples.npy"), a[:4])
    inp = ["--checkpoint", ckpt, "--images", "test", "-n", 5, "--mask", "bottom", "--steps", 5, "--jump-length", 2,
           "--jump-n-sample", 2, "--no-progress"]
    i1 = cli(1, "inpaint", *inp, "--out", tmp_path / "i1", "--batch-size", 5)
    i2 = cli(2, "inpaint", *inp, "--out", tmp_path / "i2", "--batch-size", 2)
    assert i1.returncode == 0 and i2.returncode == 0, i2.stderr
    assert i2.stdout.count("5 images inpainted") == 1
    np.testing.assert_array_equal(np.load(tmp_path / "i2" / "inpainted.npy"), np.load(tmp_path / "i1" / "inpainted.npy"))
    ev = ["--checkpoint", ckpt, "-n", 20, "--steps", 5, "--bpd-timesteps", 0, "--no-progress"]
    e1 = cli(1, "evaluate", *ev, "--json", tmp_path / "e1.json")
    e2 = cli(2, "evaluate", *ev, "--json", tmp_path / "e2.json", "--batch-size", 3)
    assert e1.returncode == 0 and e2.returncode == 0, e2.stderr
    assert e2.stdout.count("wrote") == 1
    import json
    j1, j2 = (json.load(open(tmp_path / f)) for f in ("e1.json", "e2.json"))
    for k, v in j1.items():
        if isinstance(v, float) and k != "sampling_s":
            assert j2[k] == v, k  # the same samples, scored once: the same numbers


@needs_mpi
def test_cli_errors_under_mpiexec_are_printed_once_and_stop_every_rank(tmp_path):
    r = cli(2, "train", "--out", tmp_path / "odd", *TRAIN[:2], "--batch-size", "15", *TRAIN[4:], timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("batch_size 15 is not divisible by the number of MPI ranks 2") == 1, r.stderr
    assert not (tmp_path / "odd" / "checkpoint.npz").exists()
    r = cli(2, "sample", "--checkpoint", tmp_path / "missing.npz", "--out", tmp_path / "s", timeout=120)
    assert r.returncode == 1 and r.stderr.count("does not exist") == 1, r.stderr
    r = cli(2, "demo", "--out", tmp_path / "d", timeout=120)
    assert r.returncode == 2 and r.stderr.count("demo runs in one process") == 1, r.stderr


# rank 1 raises in its 5th step, after the checkpoint of step 3 (a fault after the set-up)
_FAIL_AT_5 = """
import sys
from difnumpy.cli import main
from difnumpy.distributed import get_world
from difnumpy.trainer import Trainer
step = Trainer.step
def failing(self, *a, **k):
    if get_world().rank == 1 and self.step_count == 4:
        raise OSError("rank 1 lost its disk at step 5")
    return step(self, *a, **k)
Trainer.step = failing
sys.exit(main(sys.argv[1:]))
"""


@needs_mpi
def test_cli_a_rank_that_raises_stops_every_rank_and_keeps_the_checkpoint(tmp_path):
    t0 = time.perf_counter()
    r = cli(2, "train", "--out", tmp_path / "run", *TRAIN, code=_FAIL_AT_5, timeout=120)
    elapsed = time.perf_counter() - t0
    assert r.returncode != 0
    assert r.stderr.count("rank 1 lost its disk at step 5") == 1, r.stderr
    assert "rank 1 of 2" in r.stderr
    assert elapsed < 60
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz").step_count == 3  # the last good one, intact


@needs_mpi
def test_cli_ctrl_c_on_the_launcher_stops_every_rank_after_the_same_step(tmp_path):
    import signal
    out = tmp_path / "run"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "difnumpy", "train", "--out", str(out), "--steps", "100000",
           "--batch-size", "16", "--checkpoint-every", "1000", "--base-channels", "8", "--timesteps", "100",
           "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or os.path.getsize(out / "log.jsonl") == 0:
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode != 0
    assert stdout.count("interrupted: step") == 1, (stdout, stderr)
    tr = load_checkpoint(out / "checkpoint.npz")  # saved after the step every rank stopped at
    assert tr.step_count > 10 and f"interrupted: step {tr.step_count} " in stdout


@needs_mpi
def test_cli_time_budget_stops_every_rank_after_the_same_step(tmp_path):
    r = cli(2, "train", "--out", tmp_path / "run", "--minutes", "0.05", "--steps", "100000", *TRAIN[2:], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("time_budget: step") == 1, r.stdout
    step = load_checkpoint(tmp_path / "run" / "checkpoint.npz").step_count
    assert step > 1 and f"time_budget: step {step} " in r.stdout


@needs_mpi
def test_cli_divergence_on_two_ranks_is_reported_once_with_its_status(tmp_path):
    r = cli(2, "train", "--out", tmp_path / "run", "--lr", "1e30", "--warmup-steps", "0", "--checkpoint-every", "1",
            "--steps", "50", "--batch-size", "16", "--base-channels", "8", "--timesteps", "100", "--no-progress",
            timeout=300)
    assert r.returncode == 3, r.stderr  # EXIT_DIVERGED, as in one process
    assert r.stderr.count("training diverged at step") == 1, r.stderr
    assert "Warning" not in r.stderr
    step = load_checkpoint(tmp_path / "run" / "checkpoint.npz").step_count
    assert f"the last good checkpoint (step {step})" in r.stderr
