"""Tests of adapters keyed by parameter name: ``init_adapters``, ``effective_params``, ``base_params``.

Every test runs on each available device. Models, inputs and adapters are drawn on the CPU
(CPU generators, or the global seed) and moved, so their values are the same on every
device; a generator handed to ``init_adapters`` lives on the device, as it must.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lora_func
from lora_func import LoRA

seeds = st.integers(0, 2**31 - 1)
ranks = st.integers(1, 4)
alphas = st.floats(-16.0, 16.0, allow_nan=False, allow_infinity=False)


def _model(kind: str, device: str) -> tuple[nn.Module, torch.Tensor]:
    """A small float64 model of each kind LoRA adapts, and an input for it, made on the CPU and moved to ``device``."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(4, 5, generator=gen)
    elif kind == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 3, 2, stride=2))
        x = torch.randn(2, 2, 9, generator=gen)
    elif kind == "conv2d":
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 2, groups=2))
        x = torch.randn(2, 3, 6, 6, generator=gen)
    elif kind == "conv3d":
        model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.ReLU(), nn.Conv3d(3, 2, (1, 2, 1)))
        x = torch.randn(2, 2, 4, 4, 4, generator=gen)
    else:
        model, x = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)), torch.randint(0, 10, (2, 5), generator=gen)
    model = model.to(device=device, dtype=torch.float64)
    return model, x.to(device, torch.float64) if x.is_floating_point() else x.to(device)


KINDS = ["linear", "conv1d", "conv2d", "conv3d", "embedding"]


def _adapters(model: nn.Module, r: int, alpha: float, seed: int, targets: str = "*.weight") -> dict[str, LoRA]:
    """Adapters on every weight with both factors non-zero (gaussian, rescaled to O(1)).

    Drawn on the CPU (from CPU copies of the parameters, with a CPU generator) and moved to
    the parameters' device, so the values are the same on every device.
    """
    cpu = {n: p.detach().cpu() for n, p in model.named_parameters()}
    ad = lora_func.init_adapters(
        cpu, targets, r=r, alpha=alpha, init="gaussian", generator=torch.Generator().manual_seed(seed)
    )
    devices = {n: p.device for n, p in model.named_parameters()}
    return {
        k: v.replace(A=(v.A * 1e3).to(devices[k]), B=(v.B * 1e3).to(devices[k]), scaling=v.scaling.to(devices[k]))
        for k, v in ad.items()
    }


def _merged_reference(W: torch.Tensor, lora: LoRA) -> torch.Tensor:
    """``W + alpha / r * (B @ A).reshape(W.shape)``, written out in float64 on the CPU."""
    s = float(lora.scaling.double())
    return W.detach().cpu().double() + s * (lora.B.cpu().double() @ lora.A.cpu().double()).reshape(W.shape)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter ``name`` of ``model`` by a plain tensor (which may carry a graph)."""
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner)
    delattr(mod, attr)
    setattr(mod, attr, value)


# --- init_adapters ----------------------------------------------------------------------------


def test_init_adapters_keys_follow_parameter_order(device):
    model, _ = _model("linear", device)
    weights = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    assert list(lora_func.init_adapters(model, "*.weight")) == weights
    # Pattern order does not matter, and an overlap does not duplicate a key.
    assert list(lora_func.init_adapters(model, ["2.weight", "0.weight"])) == weights
    assert list(lora_func.init_adapters(model, ["*.weight", "0.*eight"])) == weights
    assert list(lora_func.init_adapters(model, "2.weight")) == ["2.weight"]
    # A mapping of tensors works as well as a module.
    assert list(lora_func.init_adapters(dict(model.named_parameters()), "[02].weight")) == weights


@pytest.mark.parametrize("kind", KINDS)
def test_init_adapters_shapes_and_settings(kind, device):
    model, _ = _model(kind, device)
    adapters = lora_func.init_adapters(model, "*.weight", r=3, alpha=6.0, init="zeros")
    params = dict(model.named_parameters())
    for name, lora in adapters.items():
        assert lora.shape == tuple(params[name].shape)
        assert lora.A.shape == (3, math.prod(params[name].shape[1:]))
        assert lora.B.shape == (params[name].shape[0], 3)
        assert float(lora.scaling) == 2.0
        assert lora.A.device == lora.B.device == lora.scaling.device == params[name].device
        assert bool(lora.A.eq(0).all()) and bool(lora.B.eq(0).all())


def test_init_adapters_generator_reproducible_in_parameter_order(device):
    model, _ = _model("conv2d", device)
    # Generators on the device, as init_adapters needs; each comparison below is of the same
    # draws from the same seed on one device, so torch.equal is exact on every device.
    gen = lambda seed: torch.Generator(device).manual_seed(seed)  # noqa: E731
    a = lora_func.init_adapters(model, "*.weight", r=2, generator=gen(7))
    b = lora_func.init_adapters(model, "*.weight", r=2, generator=gen(7))
    # The draws are those of init() called for each parameter in turn on one generator.
    g7 = gen(7)
    one_by_one = {
        n: lora_func.init(p.shape, 2, generator=g7, dtype=p.dtype, device=device)
        for n, p in model.named_parameters()
        if n.endswith("weight")
    }
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)
        assert torch.equal(a[name].A, one_by_one[name].A)
    assert not torch.equal(
        a["0.weight"].A, lora_func.init_adapters(model, "*.weight", r=2, generator=gen(8))["0.weight"].A
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_init_adapters_follow_parameter_dtype_and_device(dtype, device):
    model, _ = _model("conv1d", device)
    model = model.to(dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    adapters = lora_func.init_adapters(model, "*.weight", r=2, generator=gen)
    for lora in adapters.values():
        assert lora.A.dtype == dtype and lora.B.dtype == dtype
        assert lora.A.device.type == device and lora.scaling.device.type == device
        assert lora.scaling.dtype == torch.promote_types(dtype, torch.float32)


def test_init_adapters_errors(device):
    model, _ = _model("linear", device)
    with pytest.raises(ValueError, match=r"init_adapters: targets \['\*\.kernel'\] match no parameter; parameters are"):
        lora_func.init_adapters(model, "*.kernel")
    with pytest.raises(ValueError, match=r"init_adapters: targets \['3.weight'\] match no parameter"):
        lora_func.init_adapters(model, ["0.weight", "3.weight"])
    with pytest.raises(
        ValueError, match=r"init_adapters: targets match parameters LoRA cannot adapt .*\['0.bias \(6,\)', '2.bias"
    ):
        lora_func.init_adapters(model, "*")
    with pytest.raises(ValueError, match=r"init_adapters: targets is empty"):
        lora_func.init_adapters(model, [])
    with pytest.raises(TypeError, match=r"init_adapters: targets must be a glob pattern or a list of them, got 3"):
        lora_func.init_adapters(model, 3)
    with pytest.raises(TypeError, match=r"init_adapters: module_or_params must be an nn.Module or a mapping"):
        lora_func.init_adapters([model], "*.weight")
    with pytest.raises(ValueError, match=r"init_adapters: r must be a positive int, got 0"):
        lora_func.init_adapters(model, "*.weight", r=0)
    with pytest.raises(ValueError, match=r"init_adapters: alpha must be a finite number, got nan"):
        lora_func.init_adapters(model, "*.weight", alpha=float("nan"))
    with pytest.raises(ValueError, match=r"init_adapters: unknown init 'normal'"):
        lora_func.init_adapters(model, "*.weight", init="normal")


# --- effective_params -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15)  # per kind: 75 examples in all
@given(r=ranks, alpha=alphas, seed=seeds)
def test_functional_call_equals_model_with_merged_weights(device, kind, r, alpha, seed):
    model, x = _model(kind, device)
    params = dict(model.named_parameters())
    adapters = _adapters(model, r, alpha, seed)
    out = torch.func.functional_call(model, lora_func.effective_params(params, adapters), (x,))
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, lora in adapters.items():
            ref_model.get_parameter(name).copy_(_merged_reference(params[name], lora))  # from the CPU
    # float64 throughout, both on the device; the only difference is the order of a few sums.
    torch.testing.assert_close(out, ref_model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15)  # per kind: 75 examples in all
@given(r=ranks, alpha=alphas, seed=seeds)
def test_grad_through_functional_call_equals_autograd(device, kind, r, alpha, seed):
    model, x = _model(kind, device)
    params = dict(model.named_parameters())
    adapters = _adapters(model, r, alpha, seed)
    target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    target = target.to(device)

    def loss(ad):
        y = torch.func.functional_call(model, lora_func.effective_params(params, ad), (x,))
        return (y - target).square().mean()

    grads = torch.func.grad(loss)(adapters)

    # Reference: a copy of the model whose adapted weights are the merged weights, written
    # out from leaf copies of A and B, differentiated with loss.backward(), on the same device
    # (float64 both ways; they differ in the order of a few sums).
    ref_model = copy.deepcopy(model)
    leaves = {}
    for name, lora in adapters.items():
        A, B = lora.A.clone().requires_grad_(), lora.B.clone().requires_grad_()
        leaves[name] = (A, B)
        s = alpha / r
        _set_tensor(ref_model, name, params[name].detach() + s * (B @ A).reshape(lora.shape))
    (ref_model(x) - target).square().mean().backward()
    assert grads.keys() == adapters.keys()
    for name, (A, B) in leaves.items():
        assert isinstance(grads[name], LoRA)
        torch.testing.assert_close(grads[name].A, A.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grads[name].B, B.grad, rtol=1e-9, atol=1e-12)


@st.composite
def conv2d_settings(draw: st.DrawFn):
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return {
        "c_in": c_in,
        "c_out": c_out,
        "k": k,
        "stride": draw(st.integers(1, 2)),
        "padding": draw(st.integers(0, 2)),
        "dilation": draw(st.integers(1, 2)),
        "groups": groups,
        "bias": draw(st.booleans()),
    }


@given(conv2d_settings(), ranks, alphas, seeds)
def test_conv2d_with_lora_equals_conv_with_float64_merged_weight(device, cfg, r, alpha, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(
        cfg["c_in"],
        cfg["c_out"],
        cfg["k"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        bias=cfg["bias"],
    )
    x = torch.randn(2, cfg["c_in"], 7, 7)
    conv = conv.to(device)
    params = dict(conv.named_parameters())
    adapters = _adapters(conv, r, alpha, seed, "weight")
    out = torch.func.functional_call(conv, lora_func.effective_params(params, adapters), (x.to(device),))
    assert out.dtype == torch.float32 and out.device.type == device
    # The reference and its error bound: float64, on the CPU, from the CPU input x.
    lora = adapters["weight"]
    W_eff = _merged_reference(conv.weight, lora)
    b = conv.bias.detach().cpu().double() if cfg["bias"] else None
    kw = {"stride": cfg["stride"], "padding": cfg["padding"], "dilation": cfg["dilation"], "groups": cfg["groups"]}
    ref = F.conv2d(x.double(), W_eff, b, **kw)
    # float32 error bound: the merge (r + 4 roundings) and the conv sum (n terms), each of
    # relative size u, on the magnitude |x| * (|W| + |s| |B| |A|) (+ |bias|).
    n = cfg["c_in"] // cfg["groups"] * cfg["k"][0] * cfg["k"][1]
    s = abs(alpha / r)
    A64, B64 = lora.A.cpu().double(), lora.B.cpu().double()
    mag_w = conv.weight.detach().cpu().double().abs() + s * (B64.abs() @ A64.abs()).reshape(lora.shape)
    mag = F.conv2d(x.double().abs(), mag_w, b.abs() if b is not None else None, **kw)
    u = torch.finfo(torch.float32).eps / 2
    err = (out.cpu().double() - ref).abs()
    assert bool((err <= (n + r + 6) * u * mag + 1e-30).all()), float(err.max())


def test_effective_params_is_pure_and_keeps_other_entries(device):
    model, _ = _model("linear", device)
    params = dict(model.named_parameters())
    snapshot = {k: v.detach().clone() for k, v in params.items()}
    adapters = _adapters(model, 2, 2.0, 0)
    out = lora_func.effective_params(params, {"2.weight": adapters["2.weight"]})
    assert out is not params and list(out) == list(params)
    assert out["0.weight"] is params["0.weight"] and out["0.bias"] is params["0.bias"]
    assert out["2.weight"] is not params["2.weight"]
    for k, v in params.items():
        assert torch.equal(v, snapshot[k])  # against a copy, on the same device: exact anywhere
    assert lora_func.effective_params(params, {}) == params


def test_effective_params_errors(device):
    # On the device, so that no device check fires before the one each case is about.
    model, _ = _model("linear", device)
    params = dict(model.named_parameters())
    adapters = _adapters(model, 2, 2.0, 0)
    where = r"effective_params\(params, adapters\)"
    with pytest.raises(ValueError, match=where + r": adapters \['nope.weight'\] name no parameter in params"):
        lora_func.effective_params(params, {"nope.weight": adapters["0.weight"]})
    with pytest.raises(
        TypeError, match=where + r": adapters must map names to lora_func.LoRA; got \{'0.weight': 'Tensor'\}"
    ):
        lora_func.effective_params(params, {"0.weight": torch.zeros(6, 5, device=device)})
    with pytest.raises(ValueError, match=where + r": adapter '2.weight': merge\(base, lora\): base has shape \(3, 6\)"):
        lora_func.effective_params(params, {"2.weight": adapters["0.weight"]})
    with pytest.raises(TypeError, match=where + r": params must be a mapping of names to tensors, got Sequential"):
        lora_func.effective_params(model, adapters)
    with pytest.raises(TypeError, match=where + r": adapters must be a mapping of names to LoRA, got list"):
        lora_func.effective_params(params, list(adapters.values()))


# --- base_params ------------------------------------------------------------------------------


def test_base_params_plain_names_under_parametrizations(device):
    model, _ = _model("linear", device)
    plain = lora_func.base_params(model)
    assert list(plain) == [n for n, _ in model.named_parameters()]
    W0 = model[0].weight.detach().clone()
    lora_func.apply_lora(model[0], r=2, device=device)
    params = lora_func.base_params(model)
    # The parametrized weight moves after the bias, as in named_parameters().
    assert list(params) == ["0.bias", "0.weight", "2.weight", "2.bias"]
    assert params["0.weight"] is model[0].parametrizations.weight.original
    assert torch.equal(params["0.weight"], W0)  # the untouched original against its copy: exact anywhere
    with pytest.raises(TypeError, match=r"base_params\(module\): module must be an nn.Module, got dict"):
        lora_func.base_params({})
