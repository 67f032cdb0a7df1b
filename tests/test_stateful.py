"""Tests of the stateful layer: LoRAParam, apply_lora, remove_lora, and the bridge to the core.

Compatibility with the documented original is checked against ``_RefLoRAParam`` below, a
small re-statement of its documented behaviour; numerics against float64 references with
error bounds derived from the length of each reduction.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as P
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_func
from lora_func import LoRA, LoRAParam, apply_lora, get_adapters, module_params, remove_lora, set_adapters

from .conftest import requires_cuda, rng_states

# --- the documented original, restated --------------------------------------------------------


class _RefLoRAParam(nn.Module):
    """What the documented ``fovi.utils.lora.LoRAParam`` does, written out for comparison.

    B is made before A (both zero, float32), then filled according to ``init``; the
    forward adds ``(alpha / r) * (B @ A)`` reshaped to the weight.
    """

    def __init__(self, weight_shape: Any, r: int = 8, alpha: float = 8.0, init: str = "zeros", device: Any = "cpu"):
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.is_conv = len(weight_shape) > 2
        self.B = nn.Parameter(torch.zeros(weight_shape[0], r, device=device))
        self.A = nn.Parameter(torch.zeros(r, math.prod(weight_shape[1:]), device=device))
        if init == "kaimingA_zeroB":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.A, std=1e-4)
            nn.init.normal_(self.B, std=1e-4)
        elif init != "zeros":
            raise ValueError(init)

    def forward(self, W_base: torch.Tensor) -> torch.Tensor:
        return W_base + self.scaling * (self.B @ self.A).view(W_base.shape)


def _ref_apply(module: nn.Module, name: str = "weight", r: int = 8, alpha: float = 8.0, init: str = "kaimingA_zeroB"):
    base = getattr(module, name)
    base.requires_grad_(False)
    lora = _RefLoRAParam(tuple(base.shape), r=r, alpha=alpha, init=init, device=base.device)
    P.register_parametrization(module, name, lora)
    return lora


def _ref_remove(module: nn.Module, name: str = "weight", merge: bool = True) -> None:
    P.remove_parametrizations(module, name, leave_parametrized=merge)


class _Net(nn.Module):
    """A conv and a linear head: 4-D and 2-D weights under LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(27, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _prepare(net: _Net, apply: Callable[..., Any], init: str) -> None:
    apply(net.conv, "weight", r=2, alpha=4.0, init=init)
    apply(net.fc, "weight", r=3, alpha=1.5, init=init)


_LORA_KEYS = [
    "conv.bias",
    "conv.parametrizations.weight.original",
    "conv.parametrizations.weight.0.B",
    "conv.parametrizations.weight.0.A",
    "fc.bias",
    "fc.parametrizations.weight.original",
    "fc.parametrizations.weight.0.B",
    "fc.parametrizations.weight.0.A",
]


@pytest.mark.parametrize("init", lora_func.INITS)
def test_same_seed_same_factors_and_outputs_as_the_original(device: str, init: str) -> None:
    # The nets are drawn on the CPU and moved; the factors are drawn on the device, from its
    # global generator (seeded by manual_seed too), by both implementations alike.
    torch.manual_seed(1234)
    ref = _Net().to(device)
    _prepare(ref, _ref_apply, init)
    torch.manual_seed(1234)
    new = _Net().to(device)
    _prepare(new, apply_lora, init)
    ref_sd, new_sd = ref.state_dict(), new.state_dict()
    assert sorted(new_sd) == sorted(ref_sd) == sorted(_LORA_KEYS)
    for key in ref_sd:
        assert new_sd[key].dtype == ref_sd[key].dtype == torch.float32, key
        assert torch.equal(new_sd[key], ref_sd[key]), key
    # Both consumed the global generator alike: the next draws agree as well.
    torch.manual_seed(1234)
    _prepare(_Net().to(device), _ref_apply, init)
    after_ref = torch.rand(8, device=device)
    torch.manual_seed(1234)
    _prepare(_Net().to(device), apply_lora, init)
    assert torch.equal(torch.rand(8, device=device), after_ref)
    x = torch.randn(5, 2, 5, 5).to(device)
    # Exact on every device: at these sizes apply_lora's forward merges (the cheaper route,
    # chosen from shapes alone), so both run W + s * (B @ A) and the same conv/linear kernels.
    assert torch.equal(new(x), ref(x))


def _randomize_factors(module: nn.Module, seed: int) -> None:
    """Give every A and B random values of order 1 (as after training), so the update matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith((".0.A", ".0.B")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("direction", ["original_to_new", "new_to_original"])
def test_state_dict_loads_strictly_across_implementations(device: str, direction: str) -> None:
    torch.manual_seed(0)
    src = _Net().to(device)
    _prepare(src, _ref_apply if direction == "original_to_new" else apply_lora, "kaimingA_zeroB")
    _randomize_factors(src, seed=1)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(99)  # a different base and different factors before loading
    dst = _Net().to(device)
    _prepare(dst, apply_lora if direction == "original_to_new" else _ref_apply, "gaussian")
    dst.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert all(t.device.type == torch.device(device).type for t in dst.state_dict().values())
    x = torch.randn(4, 2, 5, 5).to(device)
    y_src, y_dst = src(x), dst(x)
    assert not torch.equal(y_src, _base_output(src, x))  # the adapters change the output
    # float32, bit for bit on every device: at these sizes apply_lora's forward merges (a
    # route chosen from shapes alone), so both run the same formula and kernels in the same order.
    assert torch.equal(y_dst, y_src)


def _base_output(net: _Net, x: torch.Tensor) -> torch.Tensor:
    conv_w = net.conv.parametrizations.weight.original
    fc_w = net.fc.parametrizations.weight.original
    return F.linear(torch.tanh(F.conv2d(x, conv_w, net.conv.bias)).flatten(1), fc_w, net.fc.bias)


def test_attributes_match_the_original(device: str) -> None:
    for shape in [(4, 3), (4, 3, 2), (4, 3, 2, 2), (4, 3, 2, 1, 2)]:
        torch.manual_seed(5)  # seeds the device's global generator too: both draw there
        ref = _RefLoRAParam(shape, r=3, alpha=6.0, init="gaussian", device=device)
        torch.manual_seed(5)
        new = LoRAParam(shape, r=3, alpha=6.0, init="gaussian", device=device)
        assert isinstance(new.r, int) and new.r == ref.r == 3
        assert isinstance(new.alpha, float) and new.alpha == ref.alpha == 6.0
        assert new.scaling == ref.scaling == 2.0
        assert new.is_conv is ref.is_conv is (len(shape) > 2)
        for name in ("A", "B"):
            got, want = getattr(new, name), getattr(ref, name)
            assert isinstance(got, nn.Parameter) and got.requires_grad
            assert got.shape == want.shape and got.dtype == torch.float32 and got.device == want.device
            assert got.device.type == torch.device(device).type
            assert torch.equal(got, want)
        # B is registered before A, as in the original (state-dict order).
        assert [n for n, _ in new.named_parameters()] == ["B", "A"]


@settings(max_examples=25)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=5).map(tuple),
    r=st.integers(1, 6),
    alpha=st.floats(-64, 64, allow_nan=False, width=32),
    init=st.sampled_from(lora_func.INITS),
    seed=st.integers(0, 2**31 - 1),
)
def test_lora_param_draws_and_forward_match_the_original(device, shape, r, alpha, init, seed) -> None:
    torch.manual_seed(seed)
    ref = _RefLoRAParam(shape, r=r, alpha=alpha, init=init, device=device)
    torch.manual_seed(seed)
    new = LoRAParam(shape, r=r, alpha=alpha, init=init, device=device)
    assert torch.equal(new.A, ref.A) and torch.equal(new.B, ref.B)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # values of order 1, so that the update shows in the output
        for name in ("A", "B"):
            value = torch.randn(getattr(new, name).shape, generator=g).to(device)
            getattr(new, name).copy_(value)
            getattr(ref, name).copy_(value)
    W = torch.randn(shape, generator=g).to(device)
    # Exact on every device: both compute W + s * (B @ A).view(shape), the same ops in the same order.
    assert torch.equal(new(W), ref(W))


def test_inits_are_the_documented_strategies(device: str) -> None:
    shape = (64, 16, 3)  # fan-in 48
    zeros = LoRAParam(shape, r=4, init="zeros", device=device)
    assert not zeros.A.any() and not zeros.B.any()
    kaiming = LoRAParam(shape, r=4, init="kaimingA_zeroB", device=device)
    # kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(48)
    assert kaiming.A.abs().max() <= bound and kaiming.A.abs().max() > 0.8 * bound
    assert not kaiming.B.any()
    gauss = LoRAParam(shape, r=4, init="gaussian", device=device)
    for t in (gauss.A, gauss.B):
        assert t.all() and 0.5e-4 < float(t.detach().std()) < 2e-4  # std 1e-4, 192 or 256 draws


# --- stateful forward == functional merge == float64 reference ---------------------------------

KINDS = ("linear", "conv1d", "conv2d", "conv3d", "embedding")


def _make_layer(kind: str, out: int, inp: int, k: int, dtype: torch.dtype, g: torch.Generator, device: str):
    """A layer, an input for it, and ``f(x, W, b)``, the layer's computation with a given weight.

    The layer and the input are drawn on the CPU (the global generator and ``g``) and moved
    to ``device``: the same values on every device.
    """
    if kind == "embedding":
        layer = nn.Embedding(out, inp, dtype=dtype)
        x = torch.randint(0, out, (7,), generator=g)
        return layer.to(device), x.to(device), lambda x, W, b: F.embedding(x, W)
    if kind == "linear":
        layer = nn.Linear(inp, out, dtype=dtype)
        x = torch.randn(3, inp, generator=g, dtype=dtype)
        return layer.to(device), x.to(device), lambda x, W, b: F.linear(x, W, b)
    nd = int(kind[4])
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd](inp, out, k, padding=1, dtype=dtype)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    x = torch.randn(2, inp, *([k + 1] * nd), generator=g, dtype=dtype)
    return conv.to(device), x.to(device), lambda x, W, b: fn(x, W, b, padding=1)


@st.composite
def _layers(draw):
    kind = draw(st.sampled_from(KINDS))
    dims = dict(out=draw(st.integers(1, 6)), inp=draw(st.integers(1, 6)), k=draw(st.integers(1, 3)))
    return kind, dims


@given(
    layer=_layers(),
    r=st.integers(1, 5),
    alpha=st.floats(-32, 32, allow_nan=False).filter(lambda a: a != 0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_stateful_forward_equals_functional_merge_and_float64_reference(device, layer, r, alpha, dtype, seed) -> None:
    kind, dims = layer
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    module, x, f = _make_layer(kind, **dims, dtype=dtype, g=g, device=device)
    lora = apply_lora(module, r=r, alpha=alpha)
    assert lora.A.dtype == lora.B.dtype == dtype
    assert lora.A.device == lora.B.device == module.parametrizations.weight.original.device
    with torch.no_grad():
        lora.A.copy_(torch.randn(lora.A.shape, generator=g, dtype=dtype))
        lora.B.copy_(torch.randn(lora.B.shape, generator=g, dtype=dtype))
    W = module.parametrizations.weight.original
    b = getattr(module, "bias", None)

    # Reference in float64 on the CPU, written out: W + (alpha / r) * B @ A, reshaped to W's shape.
    s = alpha / r
    A64, B64 = lora.A.detach().cpu().double(), lora.B.detach().cpu().double()
    W64 = W.detach().cpu().double()
    W_ref = W64 + s * (B64 @ A64).reshape(W.shape)
    W_abs = W64.abs() + abs(s) * (B64.abs() @ A64.abs()).reshape(W.shape)
    # Rounding: r + 2 roundings in the update, then a reduction of length in_flat (+ bias),
    # each contributing at most eps relative to the sum of magnitudes.
    eps = torch.finfo(dtype).eps
    n = math.prod(W.shape[1:]) + 1
    merged = module.weight.detach()
    assert merged.dtype == dtype and merged.shape == W.shape and merged.device == W.device
    torch.testing.assert_close(merged.cpu().double(), W_ref, rtol=0, atol=float((r + 2) * eps * W_abs.max()))
    # The stateful weight is the functional core's merge of the same adapter (both on the device).
    functional = lora_func.merge(W, get_adapters(module)["weight"])
    torch.testing.assert_close(merged, functional, rtol=0, atol=float(2 * eps * W_abs.max()))

    y = module(x).detach().cpu()
    xd = x.cpu() if kind == "embedding" else x.cpu().double()
    bd = None if b is None else b.detach().cpu().double()
    y_ref = f(xd, W_ref, bd)
    y_abs = f(xd if kind == "embedding" else xd.abs(), W_abs, None if bd is None else bd.abs())
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=float((n + r + 3) * eps * y_abs.max()))


# --- remove_lora ----------------------------------------------------------------------------------


@given(
    layer=_layers(),
    r=st.integers(1, 4),
    merge=st.booleans(),
    base_trainable=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_remove_lora_round_trips(device, layer, r, merge, base_trainable, dtype, seed) -> None:
    kind, dims = layer
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    module, x, _ = _make_layer(kind, **dims, dtype=dtype, g=g, device=device)
    module.weight.requires_grad_(base_trainable)
    W0 = module.weight.detach().clone()
    lora = apply_lora(module, r=r, alpha=3.0, init="gaussian")
    assert not module.parametrizations.weight.original.requires_grad  # frozen while adapted
    with torch.no_grad():
        lora.B.copy_(torch.randn(lora.B.shape, generator=g, dtype=dtype))
    effective = module.weight.detach().clone()
    y_adapted = module(x).detach()
    assert not torch.equal(effective, W0)

    remove_lora(module, merge=merge)

    assert not P.is_parametrized(module) and not hasattr(module, "parametrizations")
    assert sorted(module.state_dict()) == sorted(["weight"] + (["bias"] if kind != "embedding" else []))
    weight = module._parameters["weight"]
    assert type(weight) is nn.Parameter and weight.dtype == dtype and weight.device == W0.device
    assert weight.requires_grad is base_trainable  # restored either way
    if merge:
        # The weight the parametrization computed, kept as it was (no recomputation drift);
        # exact on every device: the same function of the same tensors, evaluated again.
        assert torch.equal(weight.detach(), effective)
        # The adapted layer ran the factored form, the merged one runs W': equal up to rounding.
        torch.testing.assert_close(module(x).detach(), y_adapted)
    else:
        assert torch.equal(weight.detach(), W0)  # the original tensor, bit for bit
    assert lora_func.get_adapters(module) == {}


def test_merged_weight_trains_as_a_plain_parameter(device: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).to(device)
    lora = apply_lora(layer, init="gaussian")
    remove_lora(layer, merge=True)
    layer(torch.randn(4, 3).to(device)).sum().backward()
    assert layer.weight.grad is not None and lora.A.grad is None  # the LoRA is gone from the graph


def test_remove_lora_check_finite_refuses_to_merge_nan_and_changes_nothing(device: str) -> None:
    layer = nn.Linear(3, 2).to(device)
    lora = apply_lora(layer, init="gaussian")
    with torch.no_grad():
        lora.B[0, 0] = float("nan")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"remove_lora\(module, 'weight'\): the merged weight has 3 non-finite values .* nothing was merged",
    ):
        remove_lora(layer, check_finite=True)
    assert P.is_parametrized(layer, "weight")
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)  # bit for bit, NaN included
    remove_lora(layer, merge=False, check_finite=True)  # nothing is merged: nothing to check
    assert torch.isfinite(layer.weight).all()


# --- errors ---------------------------------------------------------------------------------------


def test_apply_twice_is_an_error(device: str) -> None:
    layer = nn.Linear(3, 2).to(device)
    apply_lora(layer, r=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"apply_lora\(module, 'weight'\): weight already has a LoRA parametrization; call remove_lora"
    ):
        apply_lora(layer, r=4)
    assert len(layer.parametrizations.weight) == 1
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())


def test_remove_without_lora_is_an_error(device: str) -> None:
    layer = nn.Linear(3, 2).to(device)
    with pytest.raises(ValueError, match=r"remove_lora\(module, 'weight'\): weight has no LoRA parametrization"):
        remove_lora(layer)
    apply_lora(layer)
    remove_lora(layer)
    with pytest.raises(ValueError, match="has no LoRA parametrization"):
        remove_lora(layer)  # a second removal


class _Double(nn.Module):
    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return 2 * W


def test_remove_with_other_parametrizations_is_an_error(device: str) -> None:
    layer = nn.Linear(3, 2).to(device)
    P.register_parametrization(layer, "weight", _Double())
    with pytest.raises(ValueError, match="has no LoRA parametrization"):
        remove_lora(layer)
    apply_lora(layer)  # LoRA after another parametrization is allowed
    with pytest.raises(ValueError, match=r"other parametrizations besides LoRA \(\['_Double', 'LoRAParam'\]\)"):
        remove_lora(layer)


@pytest.mark.device_independent("name and type checks of the arguments, made before any tensor is read")
@pytest.mark.parametrize("fn", [apply_lora, remove_lora])
def test_unknown_parameter_name_is_an_error(fn) -> None:
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"Linear has no parameter 'wieght'; its parameters are \['weight', 'bias'\]"):
        fn(layer, "wieght")
    with pytest.raises(TypeError, match="param_name must be a str, got int"):
        fn(layer, 0)
    with pytest.raises(TypeError, match=r"module must be an nn\.Module, got Tensor"):
        fn(torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 0}, ValueError, "r must be a positive int, got 0"),
        ({"r": 2.0}, TypeError, "r must be a positive int, got 2.0"),
        ({"alpha": float("inf")}, ValueError, "alpha must be a finite number, got inf"),
        ({"alpha": "8"}, TypeError, "alpha must be a finite number, got '8'"),
        ({"init": "xavier"}, ValueError, "unknown init 'xavier'; expected one of"),
    ],
)
@pytest.mark.device_independent("r, alpha and init are checked before any tensor is made or read")
def test_invalid_hyperparameters_are_errors(kwargs, error, match) -> None:
    layer = nn.Linear(3, 2)
    with pytest.raises(error, match=r"LoRAParam: " + match):
        LoRAParam((2, 3), **kwargs)
    with pytest.raises(error, match=r"apply_lora\(module, 'weight'\): " + match):
        apply_lora(layer, **kwargs)
    assert not P.is_parametrized(layer) and layer.weight.requires_grad  # nothing changed


@pytest.mark.device_independent("the weight's shape is checked before any tensor is made or read")
def test_unsupported_weight_shapes_are_errors() -> None:
    with pytest.raises(ValueError, match=r"LoRAParam: unsupported weight shape \(3,\)"):
        LoRAParam((3,))
    with pytest.raises(ValueError, match=r"LoRAParam: unsupported weight shape \(1, 1, 1, 1, 1, 1\)"):
        LoRAParam((1,) * 6)
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"apply_lora\(module, 'bias'\): unsupported weight shape \(2,\)"):
        apply_lora(layer, "bias")
    assert layer.bias.requires_grad


@pytest.mark.device_independent("merge's type is checked before any tensor is read")
def test_remove_lora_merge_must_be_a_bool() -> None:
    layer = nn.Linear(3, 2)
    apply_lora(layer)
    with pytest.raises(TypeError, match=r"remove_lora\(module, 'weight'\): merge must be a bool, got str"):
        remove_lora(layer, merge="no")
    assert P.is_parametrized(layer, "weight")


# --- devices and dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_apply_lora_follows_the_weights_device_and_dtype(device: str, dtype: torch.dtype) -> None:
    layer = nn.Conv2d(3, 4, 2).to(device=device, dtype=dtype)
    lora = apply_lora(layer, r=2, init="gaussian")
    for t in (lora.A, lora.B):
        assert t.device == layer.parametrizations.weight.original.device and t.dtype == dtype
    assert layer.weight.dtype == dtype
    assert layer(torch.randn(1, 3, 3, 3, dtype=dtype).to(device)).dtype == dtype


def test_apply_lora_with_an_explicit_device(device: str) -> None:
    layer = nn.Linear(3, 2).to(device)
    lora = apply_lora(layer, device=device)
    assert lora.A.device == lora.B.device == layer.parametrizations.weight.original.device
    assert lora.A.device.type == torch.device(device).type
    with pytest.raises(
        ValueError, match=r"apply_lora\(module, 'weight'\): device meta differs from the weight's device " + device
    ):
        apply_lora(nn.Linear(3, 2).to(device), device="meta")
    with pytest.raises(ValueError, match=r"apply_lora\(module, 'weight'\): device 'gpu0' is not a valid torch device"):
        apply_lora(nn.Linear(3, 2).to(device), device="gpu0")


@pytest.mark.device_independent("the default device on a machine without CUDA; skipped where CUDA exists")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_lora_param_default_device_is_cpu_without_cuda() -> None:
    p = LoRAParam((4, 3))
    assert p.A.device.type == p.B.device.type == "cpu"


@pytest.mark.device_independent("the errors of a machine without CUDA; skipped where CUDA exists")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize("cuda_device", ["cuda", "cuda:0", torch.device("cuda")])
def test_explicit_cuda_without_cuda_is_an_error(cuda_device: Any) -> None:
    with pytest.raises(ValueError, match=r"LoRAParam: device=.*cuda.* but CUDA is not available; pass device='cpu'"):
        LoRAParam((4, 3), device=cuda_device)
    with pytest.raises(ValueError, match=r"apply_lora\(module, 'weight'\): device=.* but CUDA is not available"):
        apply_lora(nn.Linear(3, 4), device=cuda_device)


@requires_cuda
def test_lora_param_default_device_is_cuda_when_available() -> None:
    p = LoRAParam((4, 3))
    assert p.A.device.type == p.B.device.type == "cuda"


@requires_cuda
def test_apply_lora_refuses_a_device_other_than_the_weights() -> None:
    with pytest.raises(ValueError, match=r"device cuda(:0)? differs from the weight's device cpu"):
        apply_lora(nn.Linear(3, 2), device="cuda")
    layer = nn.Linear(3, 2, device="cuda")
    assert apply_lora(layer, device="cuda").A.device == layer.parametrizations.weight.original.device


@requires_cuda
def test_state_dict_from_cuda_loads_into_the_original_on_cpu() -> None:
    torch.manual_seed(0)
    src = _Net().cuda()
    _prepare(src, apply_lora, "gaussian")
    _randomize_factors(src, seed=2)
    dst = _Net()
    _prepare(dst, _ref_apply, "zeros")
    dst.load_state_dict({k: v.cpu() for k, v in src.state_dict().items()}, strict=True)
    x = torch.randn(3, 2, 5, 5)
    # Different devices: equal up to float32 rounding of reductions of length 27.
    torch.testing.assert_close(src(x.cuda()).cpu(), dst(x), rtol=1e-5, atol=1e-5)


# --- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_stock_optimizer_over_all_parameters_trains_only_a_and_b(device, optimizer) -> None:
    torch.manual_seed(0)
    # Biases are not frozen by apply_lora (only the adapted weight is, as documented),
    # so the model has none: every parameter is either a frozen base or a factor.
    model = nn.Sequential(nn.Conv1d(2, 4, 3, bias=False), nn.Flatten(), nn.Linear(12, 3, bias=False)).to(device)
    for layer in (model[0], model[2]):
        apply_lora(layer, r=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(8, 2, 5).to(device), torch.randn(8, 3).to(device)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(".original"):
            assert torch.equal(after[key], value), key
        else:
            assert key.endswith((".0.A", ".0.B")) and not torch.equal(after[key], value), key
    assert losses[-1] < losses[0]


# --- the bridge: get_adapters / set_adapters / module_params ------------------------------------


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5, dtype=dtype), nn.Tanh(), nn.Linear(5, 3, dtype=dtype))


def _snapshot(module: nn.Module) -> dict[str, Any]:
    """Everything set_adapters could change: tensors, parametrized weights, LoRA hyper-parameters."""
    loras = {n: (p.r, p.alpha, p.scaling) for n, p in module.named_modules() if isinstance(p, LoRAParam)}
    tensors = {k: v.clone() for k, v in module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    return {"tensors": tensors, "loras": loras, "flags": flags}


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["loras"] == b["loras"] and a["flags"] == b["flags"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k, v in a["tensors"].items():
        assert v.dtype == b["tensors"][k].dtype and torch.equal(v, b["tensors"][k]), k


def test_get_adapters_keys_and_values(device: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 2)), _mlp()).to(device)
    apply_lora(model[0][0], r=2, alpha=5.0, init="gaussian")
    apply_lora(model[1][2], r=4, alpha=2.0, init="gaussian")
    adapters = get_adapters(model)
    assert list(adapters) == ["0.0.weight", "1.2.weight"]
    assert list(adapters) == list(lora_func.init_adapters(model, ["0.0.weight", "1.2.weight"]))
    for name, lora in adapters.items():
        layer = model.get_submodule(name.removesuffix(".weight"))
        param = layer.parametrizations.weight[0]
        assert isinstance(lora, LoRA) and lora.shape == tuple(layer.weight.shape) and lora.r == param.r
        assert torch.equal(lora.A, param.A) and torch.equal(lora.B, param.B)
        assert not lora.A.requires_grad and not lora.B.requires_grad  # detached, like state_dict()
        assert lora.A.data_ptr() == param.A.data_ptr()  # shares storage, as documented
        assert float(lora.scaling) == param.scaling and lora.scaling.dtype == torch.float32
        assert lora.A.device == lora.B.device == lora.scaling.device == param.A.device
    assert float(adapters["0.0.weight"].scaling) == 2.5 and float(adapters["1.2.weight"].alpha) == 2.0
    assert get_adapters(_mlp().to(device)) == {}


def test_set_adapters_applies_lora_where_missing_and_copies_values(device: str) -> None:
    torch.manual_seed(0)
    model = _mlp().to(device)
    apply_lora(model[0], r=2, alpha=1.0)
    W2 = model[2].weight.detach().clone()
    new = lora_func.init_adapters(model, "*.weight", r=2, alpha=6.0, init="gaussian")
    new = {k: v.replace(B=torch.randn(v.B.shape).to(device)) for k, v in new.items()}
    rng = rng_states(device)
    set_adapters(model, new)
    assert all(map(torch.equal, rng_states(device), rng))  # no random draws, on the CPU or the device
    assert P.is_parametrized(model[2], "weight") and not model[2].parametrizations.weight.original.requires_grad
    assert torch.equal(model[2].parametrizations.weight.original, W2)
    got = get_adapters(model)
    for name in new:
        assert torch.equal(got[name].A, new[name].A) and torch.equal(got[name].B, new[name].B)
        assert torch.equal(got[name].scaling, new[name].scaling)
    param = model[0].parametrizations.weight[0]
    assert param.scaling == 3.0 and param.alpha == 6.0
    copied = got["0.weight"].A.clone()
    new["0.weight"].A.add_(1.0)  # values were copied: the module does not see later changes
    assert torch.equal(model[0].parametrizations.weight[0].A, copied)
    x = torch.randn(4, 6).to(device)
    W0 = lora_func.merge(model[0].parametrizations.weight.original, got["0.weight"])
    W2m = lora_func.merge(W2, got["2.weight"])
    expected = F.linear(torch.tanh(F.linear(x, W0, model[0].bias)), W2m, model[2].bias)
    # Exact on every device: at these sizes the module's forward merges (a route chosen from
    # shapes alone) with the same formula as merge, in the same order, and scaling 3.0 is
    # exact both as the module's float and as the adapter's float32 tensor.
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def _bad_adapter_sets(device: str) -> list[tuple[dict[str, LoRA], str]]:
    """Adapter sets that set_adapters refuses, with the refusal; on ``device``, as the model is."""

    def init(shape: tuple[int, ...], r: int, **kwargs: Any) -> LoRA:
        return lora_func.init(shape, r=r, device=device, **kwargs)

    good = init((5, 6), r=2, init="gaussian")
    return [
        (
            {"0.weight": good, "2.weight": lora_func.stack([init((3, 5), r=2)] * 2)},
            r"adapters\['2.weight'\] is a stack of \(2,\) adapters; pick one with lora_func.unstack",
        ),
        (
            {"2.weight": init((3, 5), r=2), "0.weight": init((5, 6), r=3)},
            r"adapters\['0.weight'\] has rank 3 but the module's LoRA has rank 2; call remove_lora",
        ),
        (
            {"0.weight": good, "2.weight": init((3, 6), r=2)},
            r"adapters\['2.weight'\] is for shape \(3, 6\) but the weight has shape \(3, 5\)",
        ),
        (
            {"0.weight": good, "1.weight": init((3, 5), r=2)},
            r"adapters\['1.weight'\] names no parameter of the module",
        ),
        (
            {"0.weight": good, "2.wieght": init((3, 5), r=2)},
            r"adapters\['2.wieght'\] names no parameter of the module",
        ),
        (
            {"0.weight": good.replace(scaling=torch.tensor(float("nan"), device=device))},
            r"adapters\['0.weight'\] has non-finite scaling nan",
        ),
    ]


@pytest.mark.parametrize("case", range(6))
def test_set_adapters_errors_leave_the_module_unchanged(device: str, case: int) -> None:
    torch.manual_seed(0)
    model = _mlp().to(device)
    apply_lora(model[0], r=2, alpha=4.0, init="gaussian")
    adapters, match = _bad_adapter_sets(device)[case]
    assert all(t.device == model[0].bias.device for a in adapters.values() for t in (a.A, a.B, a.scaling))
    before = _snapshot(model)
    # ".*": the checks may gather several problems under one heading.
    with pytest.raises(ValueError, match=r"set_adapters\(module, adapters\): .*" + match):
        set_adapters(model, adapters)
    _assert_same(_snapshot(model), before)
    assert not P.is_parametrized(model[2])


@pytest.mark.device_independent("type checks of the arguments, made before any tensor is read")
def test_set_adapters_type_errors() -> None:
    model = _mlp()
    with pytest.raises(TypeError, match=r"set_adapters\(module, adapters\): adapters must be a mapping"):
        set_adapters(model, [lora_func.init((5, 6), r=2)])
    with pytest.raises(TypeError, match=r"adapters\['0.weight'\] must be a lora_func.LoRA, got Tensor"):
        set_adapters(model, {"0.weight": torch.zeros(5, 6)})
    with pytest.raises(TypeError, match=r"set_adapters\(module, adapters\): module must be an nn.Module"):
        set_adapters({}, {})
    assert not P.is_parametrized(model[0])


@settings(max_examples=20)
@given(
    alphas=st.tuples(st.floats(0.25, 64), st.floats(0.25, 64)),
    r=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
# s * (1 / s) is not 1 for these s = alpha / r (in float32 and float64): a ratio s / s taken
# as a product with the reciprocal, as CUDA divides by a Python number, would change B.
@example(alphas=(5.3, 9.7), r=3, dtype=torch.float32, seed=0)
@example(alphas=(5.3, 9.7), r=3, dtype=torch.float64, seed=0)
def test_module_params_functional_call_equals_the_stateful_forward(device, alphas, r, dtype, seed) -> None:
    torch.manual_seed(seed)
    model = _mlp(dtype).to(device)
    for i, layer in enumerate((model[0], model[2])):
        apply_lora(layer, r=r, alpha=alphas[i], init="gaussian")
    _randomize_factors(model, seed)
    x = torch.randn(4, 6, dtype=dtype).to(device)
    before = _snapshot(model)
    # The module's own adapters: the same computation, bit for bit, on every device (B is
    # passed as B * (s / s), and s / s is exactly 1 when it is a true division).
    params = module_params(model, get_adapters(model))
    for i in (0, 2):
        assert torch.equal(params[f"{i}.parametrizations.weight.0.B"], model[i].parametrizations.weight[0].B)
    own = torch.func.functional_call(model, params, (x,))
    assert torch.equal(own, model(x))

    def randn(t: torch.Tensor) -> torch.Tensor:  # drawn on the CPU: the same values on every device
        return torch.randn(t.shape, dtype=t.dtype).to(t.device)

    # Other adapters (other alpha): equal to the module after set_adapters, up to the
    # rounding of B * (scaling / module scaling) (one rounding per element of B, then a
    # reduction of length 6 and 5).
    other = {k: v.replace(A=randn(v.A), B=randn(v.B), scaling=v.scaling * 3.5) for k, v in get_adapters(model).items()}
    y_func = torch.func.functional_call(model, module_params(model, other), (x,))
    _assert_same(_snapshot(model), before)  # module_params changed nothing
    set_adapters(model, other)
    with torch.no_grad():
        y_mod = model(x)
    tol = 50 * torch.finfo(dtype).eps * float(y_mod.abs().max() + 1)
    torch.testing.assert_close(y_func.detach(), y_mod, rtol=tol, atol=tol)


def test_module_params_errors(device: str) -> None:
    model = _mlp().to(device)
    apply_lora(model[0], r=2)
    with pytest.raises(ValueError, match=r"adapters\['2.weight'\] names no weight with LoRA; weights with LoRA"):
        module_params(model, {"2.weight": lora_func.init((3, 5), r=2, device=device)})
    with pytest.raises(ValueError, match=r"adapters\['0.weight'\] has shape \(5, 6\) and rank 3, but the module's"):
        module_params(model, {"0.weight": lora_func.init((5, 6), r=3, device=device)})
    with pytest.raises(TypeError, match=r"module_params\(module, adapters\): adapters must be a mapping"):
        module_params(model, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bridge_vmap_grad_equals_a_stateful_loop_and_the_chosen_adapter_goes_back(
    device: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    model = _mlp(dtype).to(device)
    apply_lora(model[0], r=2, alpha=8.0)
    apply_lora(model[2], r=3, alpha=8.0)
    x, y = torch.randn(16, 6, dtype=dtype).to(device), torch.randn(16, 3, dtype=dtype).to(device)
    start = get_adapters(model)
    alphas = [0.5, 2.0, 8.0, 32.0]
    g = torch.Generator().manual_seed(1)

    def noise(t: torch.Tensor) -> torch.Tensor:  # drawn on the CPU: the same values on every device
        return 0.3 * torch.randn(t.shape, generator=g, dtype=dtype).to(t.device)

    copies = [
        {
            k: v.replace(A=v.A + noise(v.A), B=noise(v.B), scaling=torch.full_like(v.scaling, a / v.r))
            for k, v in start.items()
        }
        for a in alphas
    ]
    stacked = lora_func.stack(copies)

    def loss(adapters: dict[str, LoRA]) -> torch.Tensor:
        return F.mse_loss(torch.func.functional_call(model, module_params(model, adapters), (x,)), y)

    grads, losses = torch.func.vmap(torch.func.grad_and_value(loss))(stacked)

    # Same math, different rounding order (batched matmuls; B enters as B * s / s_module):
    # float32 agrees to a few units in the 5th digit, float64 to ~1e-12.
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for k, adapters in enumerate(lora_func.unstack(stacked)):
        set_adapters(model, adapters)
        model.zero_grad()
        stateful_loss = F.mse_loss(model(x), y)
        stateful_loss.backward()
        torch.testing.assert_close(losses[k], stateful_loss.detach(), **tol)
        for name in start:
            param = model.get_submodule(name.removesuffix(".weight")).parametrizations.weight[0]
            assert param.scaling == pytest.approx(alphas[k] / param.r)
            torch.testing.assert_close(grads[name].A[k], param.A.grad, **tol)
            torch.testing.assert_close(grads[name].B[k], param.B.grad, **tol)
            # W = W0 + s * B @ A, so sum(dL/dB * B) = s * dL/ds.
            torch.testing.assert_close(grads[name].scaling[k], (param.B.grad * param.B).sum() / param.scaling, **tol)
        assert model[0].parametrizations.weight.original.grad is None  # the base stays frozen

    # One functional step on all K adapters (A and B only), then put the best one back.
    trained = {
        name: lora.replace(A=lora.A - 0.1 * grads[name].A, B=lora.B - 0.1 * grads[name].B)
        for name, lora in stacked.items()
    }
    outputs = torch.func.vmap(lambda a: torch.func.functional_call(model, module_params(model, a), (x,)))(trained)
    new_losses = ((outputs - y) ** 2).mean(dim=(1, 2))
    best = int(new_losses.argmin())
    chosen = lora_func.unstack(trained)[best]
    set_adapters(model, chosen)
    got = get_adapters(model)
    for name in chosen:
        assert torch.equal(got[name].A, chosen[name].A) and torch.equal(got[name].B, chosen[name].B)
        assert torch.equal(got[name].scaling, chosen[name].scaling)
    with torch.no_grad():
        y_model = model(x)
        # The module's scaling is now the adapter's: module_params passes B through unchanged.
        assert torch.equal(y_model, torch.func.functional_call(model, module_params(model, chosen), (x,)))
    torch.testing.assert_close(y_model, outputs[best].detach(), **tol)
    assert float(F.mse_loss(y_model, y)) < float(losses[best].detach())  # the step helped, and it was kept
