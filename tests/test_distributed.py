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
    assert GradientAllreduce(SINGLE)(grads, 2, 4) is grads and np.all(grads["w"] == 1)


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
