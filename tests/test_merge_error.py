"""merge_error: what folding an adapter into the weight costs, measured on the user's inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_func


def _layer(dtype: torch.dtype) -> tuple[torch.nn.Linear, lora_func.LoRAParam, torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 32).to(dtype)
    lora = lora_func.apply_lora(layer, r=4, alpha=4.0, init="gaussian")
    with torch.no_grad():
        lora.B.normal_(std=0.01)
        lora.A.normal_(std=0.1)
    return layer, lora, torch.randn(16, 128).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_the_difference_written_out(dtype: torch.dtype) -> None:
    layer, lora, x = _layer(dtype)
    W, b = layer.parametrizations.weight.original, layer.bias
    with torch.no_grad():
        merged_weight = (W.double() + lora.scaling * (lora.B.double() @ lora.A.double())).to(dtype)
        merged = F.linear(x, merged_weight, b)
        unmerged = F.linear(x, W, b) + F.linear(F.linear(x, lora.A) * lora.scaling, lora.B)
    want = float((merged.double() - unmerged.double()).abs().max())
    got = lora_func.merge_error(layer, inputs=x)
    # Both sides round the same values the same way, except where float32 accumulation in
    # merge and the float64 sum above round differently: at most one unit in the last place
    # of the weight, times |x| summed over the 128 inputs.
    ulp = torch.finfo(dtype).eps * float(merged_weight.abs().max())
    assert abs(got - want) <= ulp * float(x.abs().sum(-1).max()) + 1e-7
    if dtype == torch.float32:
        assert got < 1e-5  # merging in float32 costs only rounding
    else:
        assert got > 0  # a half-precision weight cannot hold the update exactly


def test_the_model_is_not_changed() -> None:
    layer, _, x = _layer(torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    cls = type(layer)
    lora_func.merge_error(layer, inputs=(x,))
    assert type(layer) is cls and lora_func.get_adapters(layer).keys() == {"weight"}
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_plain_model_with_adapters_given() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16)
    adapters = lora_func.init_adapters(model, "0.weight", r=2, init="gaussian")
    adapters = {k: a.replace(B=torch.randn_like(a.B)) for k, a in adapters.items()}
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert lora_func.merge_error(model, adapters, x) > 0


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        lora_func.merge_error(lambda x: x, {}, torch.ones(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no adapters"):
        lora_func.merge_error(torch.nn.Linear(2, 2), None, torch.ones(1, 2))


def test_adapter_errors_name_merge_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"merge_error.*adapters must be a mapping"):
        lora_func.merge_error(model, [lora_func.init((4, 3), r=1)], torch.ones(1, 3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"merge_error.*must map names to lora_func\.LoRA"):
        lora_func.merge_error(model, {"0.weight": "x"}, torch.ones(1, 3))  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"merge_error.*0\.wieght"):
        lora_func.merge_error(model, {"0.wieght": lora_func.init((4, 3), r=1)}, torch.ones(1, 3))
