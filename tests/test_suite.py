"""The suite's own rule (tests/conftest.py): every test says on which devices it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import DEVICES

pytestmark = pytest.mark.device_independent("runs a small pytest session in a temporary directory")

CONFTEST = Path(__file__).with_name("conftest.py").read_text(encoding="utf-8")


def test_a_test_that_does_not_say_where_it_runs_fails(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_sample="""
        import pytest

        def test_on_each_device(device):
            assert device in ("cpu", "cuda")

        @pytest.mark.device_independent("pure Python")
        def test_once():
            pass

        @pytest.mark.cuda
        def test_cuda_only():
            import torch
            assert torch.cuda.is_available()

        def test_unmarked():
            pass

        @pytest.mark.device_independent
        def test_marked_without_a_reason():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    # The device test runs once per device; the CUDA-only test passes with CUDA, is skipped without.
    cuda = torch.cuda.is_available()
    result.assert_outcomes(passed=len(DEVICES) + 1 + cuda, skipped=int(not cuda), errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_unmarked neither takes the `device` fixture nor is marked device_independent(reason)*",
            "*test_marked_without_a_reason: device_independent needs a reason*",
        ],
        consecutive=False,
    )
