"""The numba CPU kernels give the same bits with any number of threads (issue 14, item 4).

Outputs written per image or per chunk are the same whoever computes them; weight gradients are summed
per fixed part and then in part order; a batch is split into shares that depend on its size only. Each
test runs the kernels with 1 thread and with more, and asserts bit-identical results.

Two ways to set the thread count: ``numba.set_num_threads`` (what a user does; needs a machine where
numba has at least 2 threads) and patching ``_threads._nthreads`` (the kernels' own pool of Python
threads then splits the work 2 or 3 ways on any machine, also one with a single core).
"""
import threading

import numba
import numpy as np
import pytest

from difnumpy.kernels import cpu, reference as ref
from difnumpy.kernels.cpu import _threads, conv as cpu_conv, groupnorm as cpu_gn, winograd as cpu_wino

DTYPES = [np.float32, np.float64]
NUMBA_THREADS = int(numba.config.NUMBA_NUM_THREADS)


@pytest.fixture(autouse=True)
def _split_small_calls(monkeypatch):
    """The cases here are small: let every kernel call share its work (the path under test), whatever its size."""
    monkeypatch.setattr(_threads, "SPLIT_MIN_FLOPS", 0.0)


def test_small_kernel_calls_stay_on_one_thread(monkeypatch):
    """Below SPLIT_MIN_FLOPS a call runs on one thread (a worker's wake-up would cost more than it saves);
    from it on, on up to one thread per unit of work."""
    monkeypatch.setattr(_threads, "SPLIT_MIN_FLOPS", 4e7)
    monkeypatch.setattr(_threads, "_nthreads", lambda: 4)
    assert _threads._split_threads(8, 3.9e7) == 1
    assert _threads._split_threads(8, 4e7) == 4
    assert _threads._split_threads(3, 1e9) == 3
    calls = []
    real = _threads._run_split
    monkeypatch.setattr(_threads, "_run_split", lambda k, nt, *a: (calls.append(nt), real(k, nt, *a))[1])
    rng = np.random.default_rng(0)
    small = rng.standard_normal((4, 8, 8, 8)).astype(np.float32)  # 4 images: 4 units, ~0.6 MFLOP
    cpu.conv2d_forward(small, rng.standard_normal((8, 8, 3, 3)).astype(np.float32), np.zeros(8, np.float32), 1, 1)
    big = rng.standard_normal((4, 64, 28, 28)).astype(np.float32)  # ~100 MFLOP in 4 units (F(4x4): 1 image each)
    cpu.conv2d_forward(big, rng.standard_normal((64, 64, 3, 3)).astype(np.float32), np.zeros(64, np.float32), 1, 1)
    assert calls == [1, 4]


def _set_threads_patched(monkeypatch, k):
    monkeypatch.setattr(_threads, "_nthreads", lambda: k)


def _run_with(how, k, fn):
    """fn() with k threads, set the way ``how`` says ("numba" or "patched")."""
    if how == "numba":
        prev = numba.get_num_threads()
        numba.set_num_threads(k)
        try:
            return fn()
        finally:
            numba.set_num_threads(prev)
    with pytest.MonkeyPatch.context() as mp:
        _set_threads_patched(mp, k)
        return fn()


def _ways():
    ways = [("patched", 2), ("patched", 3)]
    if NUMBA_THREADS >= 2:
        ways.insert(0, ("numba", 2))
    return ways


WAYS = _ways()


def _assert_same_bits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


# (N, C, H, W, F, K, stride, padding) with enough images for several chunks and parts
CONV_CASES = [
    (48, 6, 8, 8, 8, 3, 1, 1),    # Winograd (or the wide-row im2col with USE_WINOGRAD off)
    (19, 3, 9, 7, 5, 3, 1, 1),    # Winograd with partial tiles, an odd number of chunks
    (19, 40, 16, 16, 48, 3, 1, 1),  # F(4x4) Winograd forward in several chunks
    (40, 6, 6, 6, 4, 1, 1, 0),    # 1x1
    (36, 4, 10, 10, 6, 3, 2, 1),  # general im2col (stride 2)
    (30, 3, 7, 7, 4, 5, 1, 2),    # "same" 5x5: wide-row im2col
]
# every case with Winograd on; the 3x3 stride-1 ones also with it off (the flag changes nothing else)
CONV_RUNS = [(c, True) for c in CONV_CASES] + [(c, False) for c in CONV_CASES if c[5:] == (3, 1, 1)]


@pytest.mark.parametrize("way", WAYS, ids=lambda w: f"{w[0]}{w[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,winograd", CONV_RUNS)
def test_conv_kernels_same_bits_with_any_thread_count(case, winograd, dtype, way, monkeypatch):
    N, C, H, W, F, K, s, p = case
    rng = np.random.default_rng(N + C + H)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, K, K)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    Ho, Wo = (H + 2 * p - K) // s + 1, (W + 2 * p - K) // s + 1
    dout = rng.standard_normal((N, F, Ho, Wo)).astype(dtype)
    monkeypatch.setattr(cpu_conv, "USE_WINOGRAD", winograd)  # the flag is read in cpu.conv
    monkeypatch.setattr(cpu_conv, "_WINO_MIN_C", 1)  # Winograd for every channel count here
    assert (cpu_conv._conv_mode(K, K, s, p, C) == 3) == (winograd and K == 3 and s == 1 and p == 1)
    if C == 40:
        assert cpu_wino._wino_plan(N, C, F, H, W, np.dtype(dtype).itemsize)[:1] == (True,)
        assert cpu_wino._wino_plan(N, C, F, H, W, np.dtype(dtype).itemsize)[3] < N

    def run():
        return (cpu.conv2d_forward(x, w, b, s, p), cpu.conv2d_backward_input(dout, w, x.shape, s, p),
                *cpu.conv2d_backward_weight(dout, x, w.shape, s, p))

    one = _run_with("patched", 1, run)
    many = _run_with(*way, run)
    _assert_same_bits(one, many)
    # and it is the convolution (not merely a reproducible wrong answer)
    want = (ref.conv2d_forward(x, w, b, s, p), ref.conv2d_backward_input(dout, w, x.shape, s, p),
            *ref.conv2d_backward_weight(dout, x, w.shape, s, p))
    tol = 3e-5 if dtype == np.float32 else 1e-11
    for g, r in zip(many, want):
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g / scale, r / scale, rtol=tol, atol=tol)


def test_reduction_parts_do_not_depend_on_threads(monkeypatch):
    """The fixed parts of a summed reduction depend on the number of chunks only."""
    sizes = [_threads._parts(n) for n in range(0, 100)]
    for k in (1, 2, 3, 16):
        _set_threads_patched(monkeypatch, k)
        assert [_threads._parts(n) for n in range(0, 100)] == sizes
    assert sizes[0] == sizes[1] == sizes[3] == 1 and sizes[4] == 2 and max(sizes) == _threads._MAX_PARTS
    assert all(n // p >= _threads._PART_CHUNKS for n, p in enumerate(sizes) if n >= _threads._PART_CHUNKS)


@pytest.mark.parametrize("way", WAYS, ids=lambda w: f"{w[0]}{w[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_same_bits_with_any_thread_count(dtype, way, monkeypatch):
    shape, groups = (6, 8, 48, 32), 2  # above _GN_PARALLEL_MIN as set here: the split path
    monkeypatch.setattr(cpu_gn, "_GN_PARALLEL_MIN", 1 << 16)
    assert np.prod(shape) >= cpu_gn._GN_PARALLEL_MIN
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma, beta = rng.standard_normal(8).astype(dtype), rng.standard_normal(8).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)

    def run():
        out, mean, rstd = cpu.group_norm_silu_forward(x, gamma, beta, groups, 1e-5, True)
        return (out, mean, rstd) + cpu.group_norm_silu_backward(dout, x, gamma, beta, mean, rstd, groups, True)

    _assert_same_bits(_run_with("patched", 1, run), _run_with(*way, run))


@pytest.mark.parametrize("way", WAYS, ids=lambda w: f"{w[0]}{w[1]}")
def test_elementwise_and_layout_kernels_same_bits_with_any_thread_count(way, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 6, 8, 8)).astype(np.float32)
    y = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.standard_normal((9, 6)).astype(np.float32)
    flat = x.reshape(9, -1)

    def run():
        loss, dpred = cpu.mse_loss(x, y)
        e = x.copy()
        cpu.ema_update(e, y, 0.99)
        return (cpu.silu_forward(x), cpu.silu_backward(y, x), cpu.add_(x.copy(), y), cpu.axpy_(x.copy(), y, 0.3),
                cpu.scale_(x.copy(), -1.5), cpu.add_channel_bias_(x.copy(), t), cpu.sum_hw(x),
                np.array([cpu.sumsq(x), loss]), dpred, e, cpu.q_sample(flat, flat, np.ones(9), np.ones(9)),
                cpu.upsample_nearest2x_forward(x), cpu.upsample_nearest2x_backward(cpu.upsample_nearest2x_forward(x)),
                cpu.concat_channels([x, y]), *cpu.split_channels(cpu.concat_channels([x, y]), (6, 6)))

    _assert_same_bits(_run_with("patched", 1, run), _run_with(*way, run))


# ---- the batch split: fixed shares, results in share order ----


def test_batch_shares_depend_on_the_batch_size_only(monkeypatch):
    S, m = _threads.SHARE_IMAGES, _threads._MIN_SHARE
    sizes = (1, 2 * m - 1, 2 * m, 2 * m + 1, S - 1, S, S + 1, 2 * S, 2 * S + 1, 4 * S + 3, 1000)
    want = {n: cpu.batch_shares(n) for n in sizes}
    for k in (1, 2, 3, 7):
        _set_threads_patched(monkeypatch, k)
        assert {n: cpu.batch_shares(n) for n in want} == want
    assert want[1] is None and want[2 * m - 1] is None
    for n, shares in want.items():
        if shares is None:
            continue
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a < b for a, b in shares) and all(p[1] == q[0] for p, q in zip(shares, shares[1:]))
        sizes = [b - a for a, b in shares]
        assert max(sizes) <= S and max(sizes) - min(sizes) <= 1 and min(sizes) >= m  # balanced
        assert len(shares) == max(2, -(-n // S))
    assert want[2 * S] == [(0, S), (S, 2 * S)] and len(want[2 * S + 1]) == 3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_run_shares_spreads_shares_over_threads_in_share_order(k, monkeypatch):
    _set_threads_patched(monkeypatch, k)
    shares = [(0, 3), (3, 5), (5, 9), (9, 10), (10, 14)]
    seen = []
    barrier = threading.Barrier(min(k, len(shares)), timeout=10)

    def fn(i, a, b):
        if i < k:  # the first k shares meet: they must run on k threads at once
            barrier.wait()
        seen.append((threading.get_ident(), numba.get_num_threads()))
        return (i, a, b)

    assert cpu.run_shares(fn, shares) == [(i, a, b) for i, (a, b) in enumerate(shares)]
    assert len({tid for tid, _ in seen}) == min(k, len(shares))
    assert all(n == 1 for _, n in seen)  # kernels inside a share run single-threaded


def test_run_shares_reraises_after_all_shares_ran(monkeypatch):
    _set_threads_patched(monkeypatch, 2)
    done = []

    def fn(i, a, b):
        done.append(i)
        if i in (1, 3):
            raise FloatingPointError(f"share {i}")
        return i

    with pytest.raises(FloatingPointError, match="share 1"):
        cpu.run_shares(fn, [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert sorted(done) == [0, 1, 2, 3]


@pytest.mark.parametrize("way", WAYS, ids=lambda w: f"{w[0]}{w[1]}")
def test_unet_forward_backward_same_bits_with_any_thread_count(way, monkeypatch):
    """The whole U-Net pass (a batch of several shares) on backend="cpu": the same output, input gradient
    and parameter gradients, bit for bit, with 1 thread and with more."""
    from difnumpy.nn.unet import UNet
    n = 21
    monkeypatch.setattr(_threads, "SHARE_IMAGES", 8)  # read at call time: three shares of 7
    assert len(cpu.batch_shares(n)) == 3
    rng = np.random.default_rng(0)
    m = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=4,
             dtype=np.float32, backend="cpu", rng=0)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    t = rng.integers(0, 1000, n)
    dout = rng.standard_normal(x.shape).astype(np.float32)

    def run():
        out, cache = m.forward(x, t)
        grads, dx = m.backward(dout, cache, return_input_grad=True)
        return [out, dx] + [grads[k] for k in sorted(grads)]

    _assert_same_bits(_run_with("patched", 1, run), _run_with(*way, run))


@pytest.mark.parametrize("k", [1, 2])
def test_step_scope_holds_blas_to_one_thread_with_any_thread_count(k, monkeypatch):
    """Small GEMMs on several BLAS threads made a one-thread forward pass 2x slower (README: threads):
    a model pass holds BLAS to one thread whatever numba's thread count, and restores it afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    _set_threads_patched(monkeypatch, k)

    def blas_threads():
        return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}

    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        if blas_threads() != {2}:
            pytest.skip("this BLAS does not take a thread count of 2")
        with _threads.step_scope():
            with _threads.step_scope():  # nested scopes: one limit
                assert blas_threads() == {1}
            assert blas_threads() == {1}
        assert blas_threads() == {2}


@pytest.mark.parametrize("way", WAYS, ids=lambda w: f"{w[0]}{w[1]}")
def test_unet_pass_same_bits_with_prefetched_filter_transforms(way, monkeypatch):
    """A batch too small to share out: its filter transforms are made on an idle thread while the pass runs
    (prefetch_conv3x3_filters); output and gradients are the same bits as without the prefetch."""
    from difnumpy.nn.unet import UNet
    n = 2
    assert cpu.batch_shares(n) is None
    m = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=4,
             dtype=np.float32, backend="cpu", rng=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)  # F(4x4) at 8x8, F(2x2) at 4x4
    t = rng.integers(0, 1000, n)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    started = []
    real = _threads.prefetch
    monkeypatch.setattr(_threads, "prefetch", lambda e, f: started.append(real(e, f)) or started[-1])

    def run():
        out, cache = m.forward(x, t)
        grads, dx = m.backward(dout, cache, return_input_grad=True)
        return [out, dx] + [grads[k] for k in sorted(grads)]

    with_prefetch = _run_with(*way, run)
    assert len(started) == 2 and min(started) >= 4  # forward and backward: the ResBlocks' and resampling convs
    monkeypatch.setattr(_threads, "prefetching", lambda: False)
    _assert_same_bits(with_prefetch, _run_with(*way, run))


def test_derived_takes_a_prefetched_transform_or_makes_it_itself(monkeypatch):
    """An entry the prefetch job has made is taken as is; one it has not is made by the caller, marked taken,
    and then skipped by the job. Both are the bits of the plain transform."""
    _set_threads_patched(monkeypatch, 2)
    rng = np.random.default_rng(2)
    w0, w1 = (rng.standard_normal((6, 5, 3, 3)).astype(np.float32) for _ in range(2))
    go, done = threading.Event(), threading.Event()
    outs = tuple(np.empty((36, 30 + cpu_wino._WINO_PAD), np.float32) for _ in range(2))
    fours = np.array([True, True])

    def fill(state):
        go.wait(10)
        cpu_wino._wino_transform_many((w0, w1), fours, np.array([False, False]), outs, state)
        done.set()

    with _threads.step_scope():
        assert _threads.prefetching()
        assert _threads.prefetch([(("wino", True, False), w0, outs[0]), (("wino", True, False), w1, outs[1])], fill) == 2
        state = _threads._DERIVED.store[(("wino", True, False), id(w0))][1].state
        mine = cpu_wino._wino_filters(w0, four=True)  # the job is held back: made here
        assert state[0] == _threads._TAKEN and mine is not outs[0]
        go.set()
        assert done.wait(10)
        assert state.tolist() == [_threads._TAKEN, _threads._DONE]
        assert cpu_wino._wino_filters(w1, four=True) is outs[1]
        assert not _threads.missing(("wino", True, False), w1) and _threads.missing(("wino", False, False), w1)
    np.testing.assert_array_equal(mine[:, :30], cpu_wino._wino_transform(w0, four=True)[:, :30])  # (then padding)
    np.testing.assert_array_equal(outs[1][:, :30], cpu_wino._wino_transform(w1, four=True)[:, :30])
    assert not _threads.prefetching()  # outside a pass's scope
