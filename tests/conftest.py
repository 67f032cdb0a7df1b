"""Shared test settings: hypothesis profiles and device parametrization."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Torch ops are slow to start and the CI machine is small and shared: no per-example
# deadline, and a moderate number of examples per property.
settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Devices the suite runs on: the CPU always, CUDA where it exists.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each available device in turn."""
    return request.param
