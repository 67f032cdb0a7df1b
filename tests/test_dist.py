"""Data-parallel training over 2 gloo processes on loopback: every rank ends with the same
adapters, equal to one process training on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lora_func

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as W

WORKER = Path(__file__).with_name("dist_worker.py")
pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    # nccl wants one GPU per rank: CUDA runs go through torchrun, as docs/distributed.rst says.
    pytest.mark.device_independent("two gloo ranks on loopback with CPU tensors"),
]


def _run_world(mode: str, tmp_path: Path, world: int = 2) -> list[list[torch.Tensor]]:
    store = str(tmp_path / f"{mode}-store")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(rank), str(world), store, str(tmp_path)],
            stdout=subprocess.PIPE,
            env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},  # the ranks talk over loopback only
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:  # a rank that failed leaves the other waiting: end it
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    return [torch.load(tmp_path / f"{mode}-{rank}.pt") for rank in range(world)]


def test_functional_ranks_agree_and_equal_one_process(tmp_path: Path) -> None:
    ranks = _run_world("functional", tmp_path)
    for a, b in zip(ranks[0], ranks[1], strict=True):
        assert torch.equal(a, b)  # every rank applied the same averaged update
    m = W.model()
    x, y = W.data(2)
    alone = lora_func.trainable(W.train_functional(W.adapters(m), m, x, y, lambda g: g))
    start = lora_func.trainable(W.adapters(m))
    for got, want, init in zip(ranks[0], alone, start, strict=True):
        assert not torch.equal(want, init)  # training moved the adapters
        # float64 throughout; the two routes differ only in how the mean over rows is summed
        torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-12)


def test_stateful_ddp_ranks_agree_and_equal_one_process(tmp_path: Path) -> None:
    ranks = _run_world("stateful", tmp_path)
    for a, b in zip(ranks[0], ranks[1], strict=True):
        assert torch.equal(a, b)
    m = W.model()
    x, y = W.data(2)
    alone = W.train_stateful(m, x, y, lambda net: net)
    assert len(alone) == 4  # only A and B of the two layers train; DDP reduces nothing else
    for got, want in zip(ranks[0], alone, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_all_reduce_grads_needs_an_initialised_group() -> None:
    with pytest.raises(ValueError, match="not initialised"):
        lora_func.all_reduce_grads({"w": torch.ones(2)})


def test_all_reduce_grads_rejects_unknown_op() -> None:
    with pytest.raises(ValueError, match="op must be"):
        lora_func.all_reduce_grads({"w": torch.ones(2)}, op="max")
