"""The cpu backend keeps glibc from returning freed pages between passes (difnumpy.kernels.cpu._malloc).

Each check runs in a fresh interpreter (the setting is process-wide and made once, on import). A "pass"
allocates eight 1 MiB arrays and frees them together, as a U-Net pass does with its activations: with
glibc's defaults the freed heap top is given back and the next pass faults its 2048 pages in again. A pass
in a pool thread (a batch share's) is checked too: glibc's per-thread arenas unmap their heaps once empty.
"""
import os
import subprocess
import sys

import pytest

PASS_FAULTS = r"""
import resource, numpy as np
import difnumpy.kernels.cpu
from difnumpy.kernels.cpu import _malloc
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_pass():
    blocks = [np.ones(1 << 18, np.float32) for _ in range(8)]
    del blocks
for _ in range(3):
    one_pass()
f0 = faults()
for _ in range(20):
    one_pass()
print(_malloc._state["tuned"], (faults() - f0) / 20)
"""

THREAD_PASS_FAULTS = r"""
import resource, numpy as np
from concurrent.futures import ThreadPoolExecutor
import difnumpy.kernels.cpu
from difnumpy.kernels.cpu import _malloc
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_pass():  # a batch share's pass in a pool thread: 40 blocks of 4 MiB, freed together
    blocks = [np.ones(1 << 20, np.float32) for _ in range(40)]
    del blocks
pool = ThreadPoolExecutor(1)
for _ in range(3):
    pool.submit(one_pass).result()
f0 = faults()
for _ in range(10):
    pool.submit(one_pass).result()
print(_malloc._state["arenas"], (faults() - f0) / 10)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


def _run(script=PASS_FAULTS, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", script], env=full, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", float(faults)


def test_tuned_malloc_reuses_the_pages_of_the_last_pass():
    tuned, faults = _run()
    assert tuned
    assert faults < 64  # 8 MiB = 2048 pages: (almost) none faulted in again


def test_untuned_malloc_faults_every_pass_and_the_opt_out_works():
    """The same passes with the setting turned off fault in (about) all 2048 pages: the check above can fail."""
    tuned, faults = _run(DIFNUMPY_TUNE_MALLOC="0")
    assert not tuned
    assert faults > 1024


def test_the_users_own_glibc_setting_stands():
    tuned, _ = _run(MALLOC_TRIM_THRESHOLD_="131072")
    assert not tuned


def test_a_pool_threads_pass_reuses_its_pages_too():
    """A batch share's thread allocates from the main heap (one arena): glibc's per-thread arenas unmap their
    64 MiB heaps once empty, whatever the trim threshold, and a 160 MiB pass faulted ~5000 pages each time."""
    arenas, faults = _run(THREAD_PASS_FAULTS)
    assert arenas
    assert faults < 64


def test_per_thread_arenas_fault_the_pool_threads_pass_in_again():
    """The user's own MALLOC_ARENA_MAX stands (the thresholds are still set): with several arenas the thread's
    pass faults its pages in again, so the check above can fail."""
    arenas, faults = _run(THREAD_PASS_FAULTS, MALLOC_ARENA_MAX="8")
    assert not arenas
    assert faults > 1024
