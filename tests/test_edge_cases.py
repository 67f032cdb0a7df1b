"""Edge cases across the library; each test pins down a behaviour that once went wrong."""

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
def test_remove_lora_while_another_tensor_stays_parametrized(bias_first: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    if bias_first:
        P.register_parametrization(layer, "bias", _Times())
    lora_func.apply_lora(layer, r=2, init="gaussian")
    if not bias_first:
        P.register_parametrization(layer, "bias", _Times())
    lora_func.remove_lora(layer, merge=False)
    x = torch.randn(2, 3)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_module_params_refuses_a_zero_alpha_module() -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    lora_func.apply_lora(model[0], r=2, alpha=0.0)
    adapters = {"0.weight": lora_func.init((4, 3), r=2, alpha=4.0, init="gaussian")}
    with pytest.raises(ValueError, match="has alpha 0"):
        lora_func.module_params(model, adapters)


def test_float64_base_with_half_precision_factors_is_not_rounded_to_float32() -> None:
    W = torch.full((4, 3), 1 + 1e-12, dtype=torch.float64)
    zero = lora_func.init((4, 3), r=2, init="zeros", dtype=torch.bfloat16)
    assert torch.equal(lora_func.merge(W, zero), W)


def test_delta_dtype_does_not_depend_on_stacking() -> None:
    one = lora_func.init((4, 3), r=2, init="gaussian", dtype=torch.bfloat16)
    assert lora_func.delta(one).dtype == lora_func.delta(lora_func.stack([one, one])).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["factored", "materialize"])
def test_routing_handles_an_empty_batch(mode: str) -> None:
    index = torch.zeros(0, dtype=torch.long)

    def routed(shape: tuple[int, ...]) -> torch.Tensor:
        stacked = lora_func.stack([lora_func.init(shape, r=2, init="gaussian") for _ in range(3)])
        return lora_func.lora_params({"w": torch.randn(shape)}, {"w": stacked}, index=index, mode=mode)["w"]

    assert F.linear(torch.randn(0, 4), routed((5, 4))).shape == (0, 5)
    assert F.linear(torch.randn(0, 3, 4), routed((5, 4))).shape == (0, 3, 5)
    assert F.conv2d(torch.randn(0, 2, 5, 5), routed((6, 2, 3, 3))).shape == (0, 6, 3, 3)
    assert F.embedding(torch.zeros(0, 3, dtype=torch.long), routed((10, 4))).shape == (0, 3, 4)


def test_set_adapters_checks_every_weight_before_changing_any() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.q = nn.Parameter(torch.ones(4, 3, dtype=torch.int64), requires_grad=False)

    m = Mixed()
    adapters = {"a.weight": lora_func.init((4, 3), r=2), "q": lora_func.init((4, 3), r=2)}
    with pytest.raises(TypeError, match=r"adapters\['q'\] names a torch.int64 weight"):
        lora_func.set_adapters(m, adapters)
    assert not P.is_parametrized(m.a)


def test_assign_grads_checks_devices_before_setting_any() -> None:
    tree = {"a": lora_func.init((4, 3), r=2), "b": lora_func.init((4, 3), r=2)}
    grads = {"a": tree["a"], "b": lora_func.init((4, 3), r=2, device="meta")}
    with pytest.raises(ValueError, match="a gradient is on meta"):
        lora_func.assign_grads(tree, grads)
    assert all(p.grad is None for p in lora_func.trainable(tree))


def test_get_then_set_adapters_keeps_alpha_exactly() -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    lora = lora_func.apply_lora(model[0], r=3, alpha=8.0)
    lora_func.set_adapters(model, lora_func.get_adapters(model))
    assert lora.alpha == 8.0 and lora.scaling == 8.0 / 3


def test_a_cpu_scalar_scaling_joins_its_factors_device() -> None:
    lo = lora_func.LoRA(torch.ones(2, 3, device="meta"), torch.ones(4, 2, device="meta"), torch.tensor(0.5), (4, 3))
    assert lo.scaling.device.type == "meta"
    assert lora_func.stack([lo, lo]).A.shape == (2, 2, 3)


def test_lora_weight_checks_both_factors() -> None:
    W = torch.randn(4, 3)
    with pytest.raises(ValueError, match="B on meta"):
        lora_func.LoRAWeight(W, A=torch.ones(2, 3), B=torch.ones(4, 2, device="meta"), scaling=torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        lora_func.LoRAWeight(W, A=torch.ones(2, 3, dtype=torch.long), B=torch.ones(4, 2), scaling=torch.tensor(1.0))


def test_lora_weight_requires_grad_when_only_scaling_does() -> None:
    lo = lora_func.init((4, 3), r=2).replace(scaling=torch.tensor(1.0, requires_grad=True))
    w = lora_func.lora_params({"w": torch.randn(4, 3)}, {"w": lo})["w"]
    assert w.requires_grad
    out = functional_call(nn.Linear(3, 4, bias=False), {"weight": w}, (torch.ones(1, 3),))
    assert out.requires_grad


def test_saved_files_get_the_mode_a_plain_write_gives(tmp_path) -> None:
    import os
    import stat

    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    path = tmp_path / "a.safetensors"
    lora_func.save(lora_func.init((4, 3), r=2), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    os.chmod(path, 0o640)
    lora_func.save(lora_func.init((4, 3), r=2), path)  # overwriting keeps the file's mode
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_long_file_name_that_fits_the_file_system_saves(tmp_path) -> None:
    path = tmp_path / ("x" * 230 + ".safetensors")
    lora_func.save(lora_func.init((4, 3), r=2), path)
    assert lora_func.load(path).shape == (4, 3)


def test_metadata_must_load_back_as_given(tmp_path) -> None:
    adapters = lora_func.init((4, 3), r=2)
    with pytest.raises(TypeError, match="would not load back as given"):
        lora_func.save(adapters, tmp_path / "a.safetensors", metadata={"m": {1: "a"}})
    with pytest.raises(TypeError, match="would not load back as given"):
        lora_func.save(adapters, tmp_path / "a.safetensors", metadata={"t": (1, 2)})
    with pytest.raises(ValueError, match="non-finite scaling"):
        lora_func.save(adapters.replace(scaling=torch.tensor(float("nan"))), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_writes_into_a_lora_weight_are_refused_not_lost() -> None:
    w = lora_func.lora_params({"w": torch.randn(4, 3)}, {"w": lora_func.init((4, 3), r=2, init="gaussian")})["w"]
    before = w.materialize()
    for write in (lambda: w.add_(1.0), lambda: torch.nn.init.zeros_(w), lambda: w.copy_(torch.zeros(4, 3))):
        with pytest.raises(ValueError, match="would write into an implicit weight"):
            write()
    with pytest.raises(ValueError, match="would write into an implicit weight"):
        torch.add(torch.ones(4, 3), 1.0, out=w)
    assert torch.equal(w.materialize(), before)
    assert torch.equal(w + 1.0, before + 1.0)  # out-of-place ops still see the merged weight


def test_init_adapters_refuses_integer_targets() -> None:
    params = {"w": torch.ones(4, 3, dtype=torch.int64), "v": torch.ones(4, 3)}
    with pytest.raises(TypeError, match=r"init_adapters: targets match parameters that are not floating-point"):
        lora_func.init_adapters(params, "*")
