"""Training K adapters in one vmap with one stock optimizer == training each alone.

Every test runs on each available device (the ``device`` fixture). Models and data are made
on the CPU from fixed seeds and moved, so they are the same on every device; adapters drawn
by lora_func use generators on the model's device (``torch.Generator(device)``), and the
routes compared with each other draw from the same device's generator.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

import lora_func

SEEDS, ALPHAS, STEPS, MAX_NORM = [3, 5, 7], [1.0, 4.0, 32.0], 4, 0.05


def _model(kind: str, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 model and a batch per adapter, built on the CPU from fixed seeds, on ``device``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(len(SEEDS), 10, 6, generator=g, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
        x = torch.randn(len(SEEDS), 10, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (len(SEEDS), 10), generator=g)
    return model.double().requires_grad_(False).to(device), x.to(device), y.to(device)


def _train(model, adapters, x, y, step) -> torch.Tensor:
    """STEPS Adam steps with per-adapter clipping; returns the per-step losses."""
    opt = torch.optim.Adam(lora_func.trainable(adapters), lr=0.05)
    losses = []
    for _ in range(STEPS):
        grads, loss = step(adapters, x, y)
        lora_func.assign_grads(adapters, grads)
        opt.step()
        losses.append(loss)
    return torch.stack(losses)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_k_adapters_trained_together_equal_each_trained_alone(kind: str, device: str) -> None:
    model, x, y = _model(kind, device)
    params = dict(model.named_parameters())

    def loss(adapters, xb, yb):
        out = functional_call(model, lora_func.effective_params(params, adapters), (xb,))
        return nn.functional.cross_entropy(out, yb)

    def together(adapters, xb, yb):
        grads, losses = vmap(grad_and_value(loss))(adapters, xb, yb)
        clipped, _ = lora_func.clip_per_adapter(grads, MAX_NORM)
        return clipped, losses

    stacked = lora_func.init_stack(model, "*.weight", seeds=SEEDS, alphas=ALPHAS, r=2, init="gaussian")
    start = lora_func.pick(stacked, 0)
    losses = _train(model, stacked, x, y, together)
    assert losses.shape == (STEPS, len(SEEDS))

    for k, (seed, alpha) in enumerate(zip(SEEDS, ALPHAS, strict=True)):
        # init_stack draws adapter k from torch.Generator(<model's device>).manual_seed(seeds[k]).
        alone = lora_func.init_adapters(
            model, "*.weight", r=2, alpha=alpha, init="gaussian", generator=torch.Generator(device).manual_seed(seed)
        )
        leaves = lora_func.trainable(alone)

        def one(adapters, xb, yb):
            g, value = grad_and_value(loss)(adapters, xb, yb)
            lora_func.assign_grads(adapters, g)
            torch.nn.utils.clip_grad_norm_(lora_func.trainable(adapters), MAX_NORM)  # torch's own, alone
            return {n: a.replace(A=a.A.grad, B=a.B.grad) for n, a in adapters.items()}, value

        alone_losses = _train(model, alone, x[k], y[k], one)
        # float64 throughout: vmap and the loop differ only in summation order
        torch.testing.assert_close(losses[:, k], alone_losses, rtol=1e-10, atol=1e-12)
        for got, want in zip(lora_func.trainable(lora_func.pick(stacked, k)), leaves, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert not torch.equal(lora_func.pick(stacked, 0)["0.weight"].B, start["0.weight"].B)  # it trained


@given(
    scales=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=4),
    max_norm=st.floats(1e-2, 10.0),
    seed=st.integers(0, 2**16),
)
def test_clip_per_adapter_equals_clip_grad_norm_alone(device, scales, max_norm, seed) -> None:
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, then moved: the same values on every device
    k = len(scales)
    s = torch.tensor(scales, dtype=torch.float64).view(k, 1, 1)
    grads = {
        "a": lora_func.LoRA((torch.randn(k, 2, 5, generator=g, dtype=torch.float64) * s).to(device),
                            torch.randn(k, 3, 2, generator=g, dtype=torch.float64).to(device),
                            torch.ones(k, device=device), (3, 5)),
        "b": lora_func.LoRA(torch.randn(k, 1, 4, generator=g, dtype=torch.float64).to(device),
                            (torch.randn(k, 2, 1, generator=g, dtype=torch.float64) * s).to(device),
                            torch.ones(k, device=device), (2, 4)),
    }  # fmt: skip
    before = [t.clone() for t in lora_func.trainable(grads)]
    clipped, norms = lora_func.clip_per_adapter(grads, max_norm)
    assert norms.device == grads["a"].A.device
    # pure (exact on every device: clones compared with the leaves they were cloned from)
    assert all(torch.equal(a, b) for a, b in zip(before, lora_func.trainable(grads), strict=True))
    for i in range(k):
        alone = [t[i].clone().requires_grad_() for t in before]  # on device, like the stack
        for t in alone:
            t.grad = t.detach().clone()
        total = torch.nn.utils.clip_grad_norm_(alone, max_norm)  # torch's own, same device
        torch.testing.assert_close(norms[i], total, rtol=1e-12, atol=0)
        for got, t in zip(lora_func.trainable(lora_func.pick(clipped, i)), alone, strict=True):
            torch.testing.assert_close(got, t.grad, rtol=1e-12, atol=1e-300)


def test_init_stack_equals_init_adapters_per_seed(device: str) -> None:
    model, _, _ = _model("linear", device)
    stacked = lora_func.init_stack(model, "*.weight", seeds=[1, 2], alphas=2.0, r=3)
    for k, seed in enumerate([1, 2]):
        gen = torch.Generator(device).manual_seed(seed)  # the generator init_stack uses: the model's device
        want = lora_func.init_adapters(model, "*.weight", r=3, alpha=2.0, generator=gen)
        got = lora_func.pick(stacked, k)
        for a, b in zip(lora_func.trainable(got), lora_func.trainable(want), strict=True):
            # Exact on every device: the same draws from the same generator state, then copies.
            assert a.device == b.device and torch.equal(a, b)


def test_pick_copies(device: str) -> None:
    stacked = lora_func.stack([lora_func.init((3, 2), r=1, init="gaussian", device=device) for _ in range(2)])
    one = lora_func.pick(stacked, -1)
    one.A.add_(1.0)
    assert not torch.equal(one.A, stacked.A[1])


def test_errors(device: str) -> None:
    model, _, _ = _model("linear", device)
    with pytest.raises(ValueError, match="seeds must be a non-empty list"):
        lora_func.init_stack(model, "*.weight", seeds=[])
    with pytest.raises(TypeError, match="seeds must be ints"):
        lora_func.init_stack(model, "*.weight", seeds=[1.5])
    with pytest.raises(ValueError, match="alphas has 1 values but there are 2 seeds"):
        lora_func.init_stack(model, "*.weight", seeds=[1, 2], alphas=[1.0])
    one = {"w": lora_func.init((3, 2), r=1, device=device)}
    with pytest.raises(ValueError, match="not stacked"):
        lora_func.clip_per_adapter(one, 1.0)
    stacked = lora_func.stack([one, one])
    with pytest.raises(ValueError, match="max_norm must be a positive finite number"):
        lora_func.clip_per_adapter(stacked, float("nan"))
    with pytest.raises(ValueError, match=r"holds no lora_func\.LoRA"):
        lora_func.adapter_norms({"w": torch.ones(2, 2, 2, device=device)})
    with pytest.raises(ValueError, match="grads holds adapters"):
        lora_func.assign_grads(one, {"v": one["w"]})
    with pytest.raises(ValueError, match="a gradient has shape"):
        lora_func.assign_grads(one, {"w": stacked["w"]})
    with pytest.raises(ValueError, match="out of range"):
        lora_func.pick(stacked, 2)
    with pytest.raises(TypeError, match="k must be an int"):
        lora_func.pick(stacked, 0.0)  # type: ignore[arg-type]


def test_grad_of_loss_matches_assign_grads_route(device: str) -> None:
    # assign_grads hands exactly torch.func.grad's values to the optimizer
    adapters = {"w": lora_func.init((3, 2), r=1, init="gaussian", dtype=torch.float64, device=device)}
    x = torch.randn(4, 2, dtype=torch.float64).to(device)
    zero = torch.zeros(3, 2, dtype=torch.float64, device=device)
    g = grad(lambda a: (x @ lora_func.merge(zero, a["w"]).T).square().sum())(adapters)
    lora_func.assign_grads(adapters, g)
    # Exact on every device: .grad is a copy of the same tensor, not a second computation.
    assert torch.equal(adapters["w"].A.grad, g["w"].A) and torch.equal(adapters["w"].B.grad, g["w"].B)
