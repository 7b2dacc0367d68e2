"""Shared test configuration.

Hypothesis profiles, as in NumPy's own conftest: "ci" is derandomized (the same examples on every run,
so a red CI run is reproducible), "dev" explores more. CI selects "ci" through HYPOTHESIS_PROFILE or
the CI environment variable.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=50,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def rng():
    """A fresh, fixed-seed Generator per test (tests never share RNG state)."""
    return np.random.default_rng(12345)
