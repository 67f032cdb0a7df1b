"""Shared test settings: hypothesis profiles, and the devices the suite runs on.

Every test either takes the ``device`` fixture, and so runs once on each available device
(the CPU always, CUDA where it exists), or says why it does not with
``@pytest.mark.device_independent("reason")`` (a module may say it once, in ``pytestmark``);
tests of CUDA-only behaviour take ``@requires_cuda``. A test that does none of these fails
with a message saying so, so that no test silently runs on the CPU alone. (Doctests, in
``lora_func/`` and ``docs/``, run the documentation as written: on the CPU.)

On CUDA, TF32 is switched off for the session: the tolerances of the float32 tests are derived
from float32 rounding (``2**-24``), which TF32 (``2**-11``) would exceed by design.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import HealthCheck, settings

# Torch ops are slow to start and the CI machine is small and shared: no per-example
# deadline, and a moderate number of examples per property.
settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

pytest_plugins = ["pytester"]  # tests/test_suite.py runs small suites under this file's rules

#: Devices the suite runs on: the CPU always, CUDA where it exists.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

#: Marks a test of CUDA-only behaviour; skipped without CUDA.
requires_cuda = pytest.mark.cuda


def to_device(tree: Any, device: str | torch.device) -> Any:
    """``tree`` (adapters, tensors, containers of them) with every tensor leaf copied to ``device``."""
    return torch_pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def rng_states(device: str) -> list[torch.Tensor]:
    """The global generators' states that a draw on ``device`` could advance: the CPU's, and
    the device's own where it has one (CPU byte tensors: compare them with ``torch.equal``)."""
    states = [torch.random.get_rng_state()]
    if torch.device(device).type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


@pytest.fixture(scope="session", params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each available device in turn (session scope: a plain string, safe under hypothesis)."""
    return request.param


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device_independent(reason): runs once, not on each device; the reason says why")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not isinstance(item, pytest.Function) or "device" in item.fixturenames:
        return
    mark = item.get_closest_marker("device_independent")
    if mark is not None:
        if not (mark.args and isinstance(mark.args[0], str) and mark.args[0].strip()):
            pytest.fail(f"{item.nodeid}: device_independent needs a reason, as its first argument", pytrace=False)
        return
    if item.get_closest_marker("cuda") is None:
        pytest.fail(
            f"{item.nodeid} neither takes the `device` fixture nor is marked device_independent(reason) "
            "or requires_cuda: say on which devices it runs",
            pytrace=False,
        )
