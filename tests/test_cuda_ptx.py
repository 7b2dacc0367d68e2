"""Every CUDA kernel compiles for real hardware: sm_80 and sm_90 (A100, H100/H200 class), float32 and float64.

``numba.cuda.compile_ptx`` runs NVVM from the ``numba-cuda[cu13]`` wheels, so no GPU is needed. The kernels
come from the backend's registry (``difnumpy.kernels.cuda._runtime.KERNELS``: every kernel is made by a
registered builder, and tests/test_cuda.py checks that every launch is a registered kernel with its
registered argument types), so a new kernel cannot be left out. The float32 builds must contain no
``.f64`` instruction (a float64 constant or a float64 intermediate would show as one); every float64
build does contain some, so the check can fail.

Runs in a subprocess without the simulator (``DIFNUMPY_CUDA_COMPILE_ONLY=1``), with or without
``NUMBA_ENABLE_CUDASIM`` in this process; one subprocess per compute capability, side by side. About
a minute on a 2-core machine (140 builds: 35 kernels x 2 dtypes x 2 targets, measured 50 s).
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (the cuda extra)")

_PTX_SCRIPT = textwrap.dedent("""
    import sys, time, types
    import numpy as np
    import numba.cuda.dispatcher as D
    from numba import cuda
    import difnumpy.kernels.cuda  # noqa: F401 (registers every kernel)
    from difnumpy.kernels.cuda import _runtime as rt
    cc = tuple(int(v) for v in sys.argv[1].split("."))
    # device functions are compiled for "the current device"; there is none here: pretend it is cc
    D.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    print("REGISTRY", *sorted(rt.KERNELS), flush=True)
    for name, spec in sorted(rt.KERNELS.items()):
        for dt in (np.float32, np.float64):
            t0 = time.perf_counter()
            ptx, _ = cuda.compile_ptx(spec.build(np.dtype(dt)), spec.argtypes(rt.kernel_types(dt)), cc=cc)
            target = [ln.split()[1] for ln in ptx.splitlines() if ln.startswith(".target")][0]
            print(target, np.dtype(dt).name, name, ptx.count(".f64"), f"{time.perf_counter() - t0:.2f}", flush=True)
""")
TARGETS = {"8.0": "sm_80", "9.0": "sm_90"}


def test_every_kernel_compiles_for_sm80_and_sm90_and_float32_has_no_f64():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["DIFNUMPY_CUDA_COMPILE_ONLY"] = "1"
    t0 = time.perf_counter()
    procs = {cc: subprocess.Popen([sys.executable, "-c", _PTX_SCRIPT, cc], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for cc in TARGETS}
    outs = {cc: p.communicate(timeout=600) for cc, p in procs.items()}
    for cc, p in procs.items():
        if p.returncode != 0:
            err = outs[cc][1].strip()
            if any(s in err for s in ("NVVM", "nvvm", "NVRTC", "libdevice")):
                pytest.skip(f"numba.cuda.compile_ptx is not usable here (needs NVVM and NVRTC): {err.splitlines()[-1]}")
            raise AssertionError(f"compile_ptx for cc {cc} failed:\n{err[-3000:]}")
    registry, rows = None, []
    for cc in TARGETS:
        for line in outs[cc][0].splitlines():
            if line.startswith("REGISTRY"):
                registry = line.split()[1:]
            else:
                rows.append(line.split())
    print(f"compiled {len(rows)} PTX builds of {len(registry)} kernels in {time.perf_counter() - t0:.1f} s")
    assert len(registry) >= 30  # the registry was filled (every family module imported)
    built = {(target, dt, name): int(f64) for target, dt, name, f64, _ in rows}
    want = {(t, dt, name) for t in TARGETS.values() for dt in ("float32", "float64") for name in registry}
    assert set(built) == want
    f32 = {k: v for k, v in built.items() if k[1] == "float32" and v}
    assert not f32, f"float64 instructions in float32 kernels: {f32}"
    # the check can fail: every float64 build shows .f64 (loads, stores, arithmetic)
    f64 = [k for k, v in built.items() if k[1] == "float64" and v == 0]
    assert not f64, f"float64 builds without .f64: {f64}"
