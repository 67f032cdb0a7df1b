"""One rank of the data-parallel tests in test_dist.py (run as a script, one process per rank).

Usage: python dist_worker.py MODE RANK WORLD STORE OUTDIR, MODE in {functional, stateful};
STORE is a file path the ranks meet at (a FileStore: no TCP port to race for).
Both modes train on this rank's shard of a batch that tests/test_dist.py rebuilds whole.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.func import functional_call, grad, vmap

import lora_func

K, N, D, STEPS = 3, 8, 6, 4  # adapters, rows per rank, width, optimizer steps


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh(), torch.nn.Linear(D, 3))
    return m.double()


def data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-adapter data for the whole world: x (K, world*N, D), y (K, world*N)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K, world * N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (K, world * N), generator=g)
    return x, y


def adapters(m: torch.nn.Module) -> dict:
    trees = [
        lora_func.init_adapters(
            m, "*.weight", r=2, alpha=2.0**k, init="gaussian", generator=torch.Generator().manual_seed(k)
        )
        for k in range(K)
    ]
    return lora_func.stack(trees)


def train_functional(stacked: dict, m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduce) -> dict:
    """STEPS Adam steps of K adapters in one vmap; `reduce` averages gradients over ranks."""
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(a, xb, yb):
        out = functional_call(m, lora_func.effective_params(params, a), (xb,))
        return torch.nn.functional.cross_entropy(out, yb)

    leaves = [p.requires_grad_() for p in lora_func.trainable(stacked)]
    opt = torch.optim.Adam(leaves, lr=1e-2)
    for _ in range(STEPS):
        grads = reduce(vmap(grad(loss))(stacked, x, y))
        for p, g in zip(leaves, lora_func.trainable(grads), strict=True):
            p.grad = g
        opt.step()
    return stacked


def train_stateful(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, wrap) -> list[torch.Tensor]:
    """STEPS Adam steps of one apply_lora adapter per layer (adapter 0's data)."""
    torch.manual_seed(2)
    m.requires_grad_(False)  # the usual recipe: freeze the model, then add adapters
    for layer in (m[0], m[2]):
        lora_func.apply_lora(layer, r=2, init="gaussian")
    trainable = [p for p in m.parameters() if p.requires_grad]
    net = wrap(m)
    opt = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[0]), y[0]).backward()
        opt.step()
    return [p.detach() for p in trainable]


def main() -> None:
    mode, rank, world, store, outdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, y = data(world)
    shard = slice(rank * N, (rank + 1) * N)
    x, y = x[:, shard], y[:, shard]
    m = model()
    if mode == "functional":
        result = lora_func.trainable(train_functional(adapters(m), m, x, y, lora_func.all_reduce_grads))
    else:
        ddp = torch.nn.parallel.DistributedDataParallel
        result = train_stateful(m, x, y, ddp)
    torch.save([t.detach().clone() for t in result], f"{outdir}/{mode}-{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
