"""merge_error: what folding an adapter into the weight costs, measured on the user's inputs.

Every test runs on each available device (the ``device`` fixture): layers, adapters and inputs
are made on the CPU from a fixed seed (the same values on every device) and then moved, so a
model prepared with ``apply_lora`` is also checked to keep working after ``.to(device)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_func


def _layer(dtype: torch.dtype, device: str) -> tuple[torch.nn.Linear, lora_func.LoRAParam, torch.Tensor]:
    """A LoRA-parametrized linear layer and an input, drawn on the CPU, then moved to ``device``."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 32).to(dtype)
    lora = lora_func.apply_lora(layer, r=4, alpha=4.0, init="gaussian")
    with torch.no_grad():
        lora.B.normal_(std=0.01)
        lora.A.normal_(std=0.1)
    x = torch.randn(16, 128).to(dtype)
    layer.to(device)  # moves the base weight and the parametrization's A and B together
    assert lora.A.device == lora.B.device == layer.parametrizations.weight.original.device
    return layer, lora, x.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_the_difference_written_out(dtype: torch.dtype, device: str) -> None:
    layer, lora, x = _layer(dtype, device)
    W, b = layer.parametrizations.weight.original, layer.bias
    # Written out on the device (the same kernels the model runs on), the merged weight in float64.
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


def test_the_model_is_not_changed(device: str) -> None:
    layer, _, x = _layer(torch.bfloat16, device)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    cls = type(layer)
    lora_func.merge_error(layer, inputs=(x,))
    assert type(layer) is cls and lora_func.get_adapters(layer).keys() == {"weight"}
    after = layer.state_dict()
    # Exact on every device: clones compared with the tensors they were cloned from.
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.device == x.device for v in after.values())


def test_plain_model_with_adapters_given(device: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16).to(device)
    adapters = lora_func.init_adapters(model, "0.weight", r=2, init="gaussian")  # on the weight's device
    # B drawn on the CPU (torch's global generator, seeded above), then moved to the adapter's device.
    adapters = {k: a.replace(B=torch.randn(a.B.shape, dtype=a.B.dtype).to(device)) for k, a in adapters.items()}
    x = torch.randn(4, 8, dtype=torch.bfloat16).to(device)
    assert adapters["0.weight"].A.device == x.device
    assert lora_func.merge_error(model, adapters, x) > 0


def test_errors(device: str) -> None:
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        lora_func.merge_error(lambda x: x, {}, torch.ones(1, device=device))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no adapters"):
        lora_func.merge_error(torch.nn.Linear(2, 2, device=device), None, torch.ones(1, 2, device=device))


def test_adapter_errors_name_merge_error(device: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4, device=device))
    x = torch.ones(1, 3, device=device)
    with pytest.raises(TypeError, match=r"merge_error.*adapters must be a mapping"):
        lora_func.merge_error(model, [lora_func.init((4, 3), r=1, device=device)], x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"merge_error.*must map names to lora_func\.LoRA"):
        lora_func.merge_error(model, {"0.weight": "x"}, x)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"merge_error.*0\.wieght"):
        lora_func.merge_error(model, {"0.wieght": lora_func.init((4, 3), r=1, device=device)}, x)
