"""The cpu backend keeps glibc from returning freed pages between passes (difnumpy.kernels.cpu._malloc).

Each check runs in a fresh interpreter (the setting is process-wide and made once, on import). A "pass"
allocates eight 1 MiB arrays and frees them together, as a U-Net pass does with its activations: with
glibc's defaults the freed heap top is given back and the next pass faults its 2048 pages in again.
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

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


def _run(**env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PASS_FAULTS], env=full, capture_output=True, text=True, check=True)
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
