"""Edge cases across the library; each test pins down a behaviour that once went wrong.

Every test runs on each available device (the ``device`` fixture): modules and random values
are made on the CPU and moved (or made with ``device=device``); tests of what happens with a
tensor on the meta device put the other tensors on ``device``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as P
from torch import nn
from torch.func import functional_call

import lora_func


class _Times(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


@pytest.mark.parametrize("bias_first", [True, False])
def test_remove_lora_while_another_tensor_stays_parametrized(bias_first: bool, device: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).to(device)
    if bias_first:
        P.register_parametrization(layer, "bias", _Times())
    lora_func.apply_lora(layer, r=2, init="gaussian")
    if not bias_first:
        P.register_parametrization(layer, "bias", _Times())
    lora_func.remove_lora(layer, merge=False)
    x = torch.randn(2, 3).to(device)
    assert layer.weight.device == x.device
    # Exact on every device: after remove_lora(merge=False) both sides are the same F.linear of the
    # same tensors (the bias parametrization multiplies by 1.0, which is exact).
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_module_params_refuses_a_zero_alpha_module(device: str) -> None:
    model = nn.Sequential(nn.Linear(3, 4, device=device))
    lora_func.apply_lora(model[0], r=2, alpha=0.0)
    adapters = {"0.weight": lora_func.init((4, 3), r=2, alpha=4.0, init="gaussian", device=device)}
    with pytest.raises(ValueError, match="has alpha 0"):
        lora_func.module_params(model, adapters)


def test_float64_base_with_half_precision_factors_is_not_rounded_to_float32(device: str) -> None:
    W = torch.full((4, 3), 1 + 1e-12, dtype=torch.float64, device=device)
    zero = lora_func.init((4, 3), r=2, init="zeros", dtype=torch.bfloat16, device=device)
    # Exact on every device unless W goes through float32: adding an exact zero changes nothing.
    assert torch.equal(lora_func.merge(W, zero), W)


def test_delta_dtype_does_not_depend_on_stacking(device: str) -> None:
    one = lora_func.init((4, 3), r=2, init="gaussian", dtype=torch.bfloat16, device=device)
    assert lora_func.delta(one).dtype == lora_func.delta(lora_func.stack([one, one])).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["factored", "materialize"])
def test_routing_handles_an_empty_batch(mode: str, device: str) -> None:
    index = torch.zeros(0, dtype=torch.long, device=device)

    def routed(shape: tuple[int, ...]) -> torch.Tensor:
        stacked = lora_func.stack([lora_func.init(shape, r=2, init="gaussian", device=device) for _ in range(3)])
        base = torch.randn(shape).to(device)
        return lora_func.lora_params({"w": base}, {"w": stacked}, index=index, mode=mode)["w"]

    def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    for out, shape in (
        (F.linear(empty(0, 4), routed((5, 4))), (0, 5)),
        (F.linear(empty(0, 3, 4), routed((5, 4))), (0, 3, 5)),
        (F.conv2d(empty(0, 2, 5, 5), routed((6, 2, 3, 3))), (0, 6, 3, 3)),
        (F.embedding(empty(0, 3, dtype=torch.long), routed((10, 4))), (0, 3, 4)),
    ):
        assert out.shape == shape and out.device == index.device


def test_set_adapters_checks_every_weight_before_changing_any(device: str) -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.q = nn.Parameter(torch.ones(4, 3, dtype=torch.int64), requires_grad=False)

    m = Mixed().to(device)
    adapters = {"a.weight": lora_func.init((4, 3), r=2, device=device), "q": lora_func.init((4, 3), r=2, device=device)}
    with pytest.raises(TypeError, match=r"adapters\['q'\] names a torch.int64 weight"):
        lora_func.set_adapters(m, adapters)
    assert not P.is_parametrized(m.a)


def test_assign_grads_checks_devices_before_setting_any(device: str) -> None:
    tree = {"a": lora_func.init((4, 3), r=2, device=device), "b": lora_func.init((4, 3), r=2, device=device)}
    grads = {"a": tree["a"], "b": lora_func.init((4, 3), r=2, device="meta")}
    with pytest.raises(ValueError, match="a gradient is on meta"):
        lora_func.assign_grads(tree, grads)
    assert all(p.grad is None for p in lora_func.trainable(tree))


def test_get_then_set_adapters_keeps_alpha_exactly(device: str) -> None:
    model = nn.Sequential(nn.Linear(3, 4, device=device))
    lora = lora_func.apply_lora(model[0], r=3, alpha=8.0)
    lora_func.set_adapters(model, lora_func.get_adapters(model))
    assert lora.alpha == 8.0 and lora.scaling == 8.0 / 3


def test_a_cpu_scalar_scaling_joins_its_factors_device(device: str) -> None:
    # meta always differs from the CPU scalar's device; `device` does where it is an accelerator.
    for where in ("meta", device):
        lo = lora_func.LoRA(torch.ones(2, 3, device=where), torch.ones(4, 2, device=where), torch.tensor(0.5), (4, 3))
        assert lo.scaling.device == lo.A.device and lo.scaling.device.type == torch.device(where).type
        assert lora_func.stack([lo, lo]).A.shape == (2, 2, 3)


def test_lora_weight_checks_both_factors(device: str) -> None:
    W = torch.randn(4, 3).to(device)
    A, B, one = torch.ones(2, 3, device=device), torch.ones(4, 2, device=device), torch.tensor(1.0, device=device)
    with pytest.raises(ValueError, match="B on meta"):
        lora_func.LoRAWeight(W, A=A, B=torch.ones(4, 2, device="meta"), scaling=one)
    with pytest.raises(TypeError, match="floating-point"):
        lora_func.LoRAWeight(W, A=A.long(), B=B, scaling=one)


def test_lora_weight_requires_grad_when_only_scaling_does(device: str) -> None:
    scaling = torch.tensor(1.0, requires_grad=True, device=device)
    lo = lora_func.init((4, 3), r=2, device=device).replace(scaling=scaling)
    w = lora_func.lora_params({"w": torch.randn(4, 3).to(device)}, {"w": lo})["w"]
    assert w.requires_grad
    out = functional_call(nn.Linear(3, 4, bias=False, device=device), {"weight": w}, (torch.ones(1, 3, device=device),))
    assert out.requires_grad and out.device == scaling.device


def test_saved_files_get_the_mode_a_plain_write_gives(tmp_path, device: str) -> None:
    import os
    import stat

    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    path = tmp_path / "a.safetensors"
    lora_func.save(lora_func.init((4, 3), r=2, device=device), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    os.chmod(path, 0o640)
    lora_func.save(lora_func.init((4, 3), r=2, device=device), path)  # overwriting keeps the file's mode
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_long_file_name_that_fits_the_file_system_saves(tmp_path, device: str) -> None:
    path = tmp_path / ("x" * 230 + ".safetensors")
    lora_func.save(lora_func.init((4, 3), r=2, device=device), path)
    assert lora_func.load(path, device=device).shape == (4, 3)


def test_metadata_must_load_back_as_given(tmp_path, device: str) -> None:
    adapters = lora_func.init((4, 3), r=2, device=device)
    with pytest.raises(TypeError, match="would not load back as given"):
        lora_func.save(adapters, tmp_path / "a.safetensors", metadata={"m": {1: "a"}})
    with pytest.raises(TypeError, match="would not load back as given"):
        lora_func.save(adapters, tmp_path / "a.safetensors", metadata={"t": (1, 2)})
    with pytest.raises(ValueError, match="non-finite scaling"):
        nan = torch.tensor(float("nan"), device=device)
        lora_func.save(adapters.replace(scaling=nan), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_writes_into_a_lora_weight_are_refused_not_lost(device: str) -> None:
    base = torch.randn(4, 3).to(device)
    w = lora_func.lora_params({"w": base}, {"w": lora_func.init((4, 3), r=2, init="gaussian", device=device)})["w"]
    before = w.materialize()
    assert before.device == base.device
    zeros, ones = torch.zeros(4, 3, device=device), torch.ones(4, 3, device=device)
    for write in (lambda: w.add_(1.0), lambda: torch.nn.init.zeros_(w), lambda: w.copy_(zeros)):
        with pytest.raises(ValueError, match="would write into an implicit weight"):
            write()
    with pytest.raises(ValueError, match="would write into an implicit weight"):
        torch.add(ones, 1.0, out=w)
    # Exact on every device: the same materialization of the same tensors, then the same add.
    assert torch.equal(w.materialize(), before)
    assert torch.equal(w + 1.0, before + 1.0)  # out-of-place ops still see the merged weight


def test_init_adapters_refuses_integer_targets(device: str) -> None:
    params = {"w": torch.ones(4, 3, dtype=torch.int64, device=device), "v": torch.ones(4, 3, device=device)}
    with pytest.raises(TypeError, match=r"init_adapters: targets match parameters that are not floating-point"):
        lora_func.init_adapters(params, "*")
