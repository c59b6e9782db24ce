"""Test configuration.

Without a GPU, the tests run the Triton kernels on CPU tensors through Triton's interpreter: the
documented switch LORAMIX_BACKEND=triton + TRITON_INTERPRET=1 is set here, before the package is
imported, unless the caller chose otherwise.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LORAMIX_BACKEND", "triton")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], derandomize=True,
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

import loramix_kernels  # noqa: E402,F401


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny shapes: more threads only add overhead and contend
    with the other test workers); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
