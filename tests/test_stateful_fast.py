"""apply_lora's factored forward: same results as rebuilding W + s*BA, without rebuilding it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_func

LAYERS = {
    "linear": (lambda: nn.Linear(64, 48), lambda g: torch.randn(3, 64, generator=g, dtype=torch.float64)),
    "conv1d": (
        lambda: nn.Conv1d(8, 16, 3, padding=1),
        lambda g: torch.randn(2, 8, 5, generator=g, dtype=torch.float64),
    ),
    "conv2d": (
        lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect"),
        lambda g: torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64),
    ),
    "conv3d": (
        lambda: nn.Conv3d(4, 8, 2, dilation=2),
        lambda g: torch.randn(1, 4, 5, 5, 5, generator=g, dtype=torch.float64),
    ),
    "embedding": (lambda: nn.Embedding(100, 32, padding_idx=0), lambda g: torch.randint(0, 100, (2, 3), generator=g)),
}


def _prepared(kind: str, device: str) -> tuple[nn.Module, torch.Tensor, lora_func.LoRAParam]:
    """A float64 layer with LoRA on ``device``, and an input; every value drawn on the CPU, then moved."""
    torch.manual_seed(0)
    make, data = LAYERS[kind]
    layer = make().double().to(device)
    lora = lora_func.apply_lora(layer, r=4, alpha=8.0, init="gaussian")
    with torch.no_grad():  # order 1, from the CPU's global generator (as normal_() in place on the CPU)
        lora.B.copy_(torch.randn(lora.B.shape, dtype=lora.B.dtype))
        lora.A.copy_(torch.randn(lora.A.shape, dtype=lora.A.dtype))
    return layer, data(torch.Generator().manual_seed(1)).to(device), lora


def _merged_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same layer with W + s*(B@A) written out in float64 as its weight."""
    chain = layer.parametrizations.weight
    lora = chain[0]
    W = chain.original + lora.scaling * (lora.B @ lora.A).view(chain.original.shape)
    return _call_plain(layer, x, W)


def _call_plain(layer: nn.Module, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    cls = type(layer).__bases__[0]
    if cls is nn.Linear:
        return F.linear(x, W, layer.bias)
    if cls is nn.Embedding:
        return F.embedding(x, W, layer.padding_idx)
    return layer._conv_forward(x, W, layer.bias)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_factored_forward_equals_the_merged_weight_in_outputs_and_gradients(
    device: str, kind: str, monkeypatch
) -> None:
    layer, x, lora = _prepared(kind, device)
    calls, merges = [], []
    lora.register_forward_hook(lambda *_: calls.append(1))
    update = lora_func._weight._update
    monkeypatch.setattr(lora_func._weight, "_update", lambda *a: merges.append(1) or update(*a))
    y = layer(x)
    assert calls == []  # the parametrization never ran
    if kind in ("linear", "embedding"):
        # few tokens, wide layer: "auto" takes the factored form, W + s*BA is never built
        assert merges == []
    y.square().sum().backward()
    got = (lora.A.grad.clone(), lora.B.grad.clone())
    lora.A.grad = lora.B.grad = None

    y_ref = _merged_output(layer, x)  # float64 on the device
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)  # float64: rounding only
    y_ref.square().sum().backward()
    torch.testing.assert_close(got, (lora.A.grad, lora.B.grad), rtol=1e-10, atol=1e-12)


def test_state_dict_weight_and_other_modules_are_unchanged(device: str) -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(64, 48).to(device), nn.Linear(64, 48).to(device)
    before = type(b).forward
    lora = lora_func.apply_lora(a, r=4, init="gaussian")
    assert type(b).forward is before and type(b) is nn.Linear
    assert sorted(a.state_dict()) == [
        "bias",
        "parametrizations.weight.0.A",
        "parametrizations.weight.0.B",
        "parametrizations.weight.original",
    ]
    W = a.parametrizations.weight.original + lora.scaling * lora.B @ lora.A
    # module.weight still evaluates the parametrization. Exact on every device: scaling is
    # 8 / 4 = 2, a power of two, so (s * B) @ A here is s * (B @ A) there, bit for bit.
    assert lora.scaling == 2.0 and torch.equal(a.weight, W)
    lora_func.remove_lora(a, merge=False)
    assert type(a) is nn.Linear and type(a).forward is before


def test_subclass_with_its_own_forward_keeps_it(device: str) -> None:
    class Doubled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * F.linear(x, self.weight, self.bias)

    layer = Doubled(16, 8).to(device)
    lora = lora_func.apply_lora(layer, r=2, init="gaussian")
    calls = []
    lora.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 16).to(device)
    y = layer(x)
    assert calls == [1]  # its own forward, through the parametrization
    torch.testing.assert_close(y, 2 * F.linear(x, layer.weight, layer.bias))


def test_a_second_parametrization_falls_back_to_the_plain_path(device: str) -> None:
    class Twice(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    layer = nn.Linear(16, 8).to(device)
    lora_func.apply_lora(layer, r=2, init="gaussian")
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Twice())
    x = torch.randn(2, 16).to(device)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_deepcopy_of_a_prepared_layer_runs_the_same(device: str) -> None:
    layer, x, _ = _prepared("linear", device)
    twin = copy.deepcopy(layer)
    assert twin.parametrizations.weight.original.device == layer.parametrizations.weight.original.device
    # Exact on every device: the same forward of equal tensors, run twice.
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)


def test_removing_lora_from_a_deep_copy_leaves_the_original_working(device: str) -> None:
    # copy.deepcopy of a parametrized module shares its class with the copy; changing the
    # copy's parametrizations must not reach the original. The exact comparisons are of the
    # same forward of equal tensors, run again: exact on every device.
    layer, x, _ = _prepared("linear", device)
    y = layer(x)
    twin, other = copy.deepcopy(layer), copy.deepcopy(layer)
    lora_func.remove_lora(twin, merge=True)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    torch.testing.assert_close(twin(x), y)
    assert lora_func.get_adapters(layer).keys() == {"weight"}
    lora_func.remove_lora(layer, merge=False)  # and the other way round
    torch.testing.assert_close(other(x), y, rtol=0, atol=0)


class TwoWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.randn(4, 3))
        self.v = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.u) + F.linear(x, self.v)


def test_adding_lora_to_a_deep_copy_leaves_the_original_alone(device: str) -> None:
    torch.manual_seed(0)
    module = TwoWeights().to(device)
    lora_func.apply_lora(module, "u", r=2, init="gaussian")
    twin = copy.deepcopy(module)
    lora_func.apply_lora(twin, "v", r=2, init="gaussian")
    x = torch.randn(2, 3).to(device)
    assert not torch.nn.utils.parametrize.is_parametrized(module, "v")
    # Exact on every device: TwoWeights' own forward, written out again with the same tensors.
    torch.testing.assert_close(module(x), F.linear(x, module.u) + F.linear(x, module.v), rtol=0, atol=0)
    assert lora_func.get_adapters(module).keys() == {"u"} and lora_func.get_adapters(twin).keys() == {"u", "v"}


def test_set_adapters_keeps_a_float32_adapter_float32_over_a_bf16_model(device: str) -> None:
    model = nn.Sequential(nn.Linear(8, 4)).to(device=device, dtype=torch.bfloat16)
    adapters = lora_func.init_adapters(model, "0.weight", r=2, init="gaussian", dtype=torch.float32)
    lora_func.set_adapters(model, adapters)
    lora = model[0].parametrizations.weight[0]
    assert lora.A.dtype == torch.float32 and lora.A.device == model[0].bias.device
    assert torch.equal(lora.A, adapters["0.weight"].A)
    assert model[0].weight.dtype == torch.bfloat16  # the effective weight stays in the model's dtype
