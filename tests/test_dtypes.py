"""Every route across base dtypes (float32, bfloat16, float16) and adapter dtypes (the base's,
or float32 via ``dtype=``), against float64 references computed here from the same values.

Routes: stateful (``apply_lora`` forward), materialized (``effective_params`` +
``functional_call``), factored and auto (``lora_params(..., mode=...)`` + ``functional_call``);
layers: Linear, Conv2d, Embedding.

Tolerances are elementwise rounding bounds. With ``u`` the unit roundoff of the dtype a route
computes in (``2**-24`` float32, ``2**-8`` bfloat16, ``2**-11`` float16; TF32 ``2**-11`` where
CUDA uses it for float32), every rounding a route makes to an intermediate ``t`` costs at most
``u·|t|``, and every intermediate is bounded elementwise by ``mag``, the same computation done
in float64 on absolute values with ``|W| + s·|B|·|A|`` for the weight (``|B @ A| <= |B|·|A|``, so
this bounds the merged and the factored form alike). Inputs, weights, factors and cotangents are
positive here, so no sum cancels and ``mag`` equals ``|reference|``: the bounds are relative to the
result itself (3% for bfloat16, 0.4% float16, 2e-6 float32 forward), tight enough to catch a wrong
scaling or a lost rounding step, where mixed signs would let cancellation make them vacuous. (The
sign of a value takes no code path of its own.) A forward makes at most 7 roundings (A and
B cast to the base dtype, ``x·Aᵀ``, the scaling, ``·Bᵀ``, the base product, the sum; the
materialized route fewer), so ``8·u·mag`` bounds it; sums of ``n`` products accumulate in float32
on CPU (``n·2**-24·mag``; on CUDA half types may reduce in their own precision: ``n·u·mag``).
Gradients go through about twice as many roundings (the cotangent through ``B`` then the
scaling then the product with ``x``, the weight-gradient of the merged route, the cast back to
the adapter's dtype) and embedding gradients accumulate in the base dtype, so they get
``16·u·mag`` (plus ``n·u·mag`` for half-type embeddings): looser, as their ``u`` is 2**13 to 2**16 times
float32's.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lora_func

R, ALPHA = 4, 8.0
SCALING = ALPHA / R

#: (base dtype, adapter dtype): adapters in the base dtype, or kept in float32.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]
DTYPE_IDS = [f"{str(b)[6:]}-adapters_{str(a)[6:]}" for b, a in DTYPES]
ROUTES = ["stateful", "materialized", "factored", "auto"]


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor, int]:
    """A float64 layer, its input, and the longest sum of products in its forward or backward."""
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        torch.manual_seed(0)
        return nn.Linear(24, 16, dtype=torch.float64), torch.randn(5, 24, generator=g, dtype=torch.float64), 24
    if kind == "conv2d":
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 8, 3, padding=1, dtype=torch.float64)
        return conv, torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64), 2 * 6 * 6
    torch.manual_seed(0)
    emb = nn.Embedding(10, 12, dtype=torch.float64)
    return emb, torch.randint(0, 10, (2, 5), generator=g), 10


def _reference(kind: str, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output in float64 for a given (merged) weight, written out per layer."""
    if kind == "linear":
        return x @ weight.T + layer.bias.double()
    if kind == "conv2d":
        return F.conv2d(x, weight, layer.bias.double(), padding=1)
    return weight[x]


def _abs_reference(kind: str, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if kind == "linear":
        return x.abs() @ weight.T + layer.bias.double().abs()
    if kind == "conv2d":
        return F.conv2d(x.abs(), weight, layer.bias.double().abs(), padding=1)
    return weight[x]


def unit_roundoff(dtype: torch.dtype, device: str, conv: bool = False) -> float:
    """Half the machine epsilon of ``dtype``; TF32's where CUDA computes float32 in TF32."""
    u = torch.finfo(dtype).eps / 2
    if device.startswith("cuda") and dtype == torch.float32:
        tf32 = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
        if tf32:
            u = 2.0**-11
    return u


def accumulation_roundoff(dtype: torch.dtype, device: str) -> float:
    """The unit roundoff of the sums inside products: float32, or the half type itself on CUDA
    when cuBLAS may reduce in reduced precision."""
    if device.startswith("cuda") and dtype in (torch.float16, torch.bfloat16):
        return torch.finfo(dtype).eps / 2
    return 2.0**-24


def _probe(kind: str, dtype: torch.dtype, device: str) -> None:
    """Skip, naming the reason, where this torch has no kernel for the layer in ``dtype``."""
    layer, x, _ = _layer(kind)
    layer = layer.to(device=device, dtype=dtype)
    xin = x.to(device) if kind == "embedding" else x.to(device=device, dtype=dtype)
    try:
        layer(xin).float().sum().backward()
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch {torch.__version__} has no {device} {dtype} kernel for {kind}: {err}")


class Case:
    """One layer in one base dtype with one adapter, its values fixed, and the float64 reference."""

    def __init__(self, kind: str, base_dtype: torch.dtype, adapter_dtype: torch.dtype, device: str) -> None:
        _probe(kind, base_dtype, device)
        self.kind, self.device = kind, device
        self.base_dtype, self.adapter_dtype = base_dtype, adapter_dtype
        layer64, x64, self.n = _layer(kind)
        with torch.no_grad():  # positive values: see the module docstring
            for p in layer64.parameters():
                p.abs_()
        if kind != "embedding":
            x64 = x64.abs() + 0.5
        self.layer = layer64.to(device=device, dtype=base_dtype).requires_grad_(False)
        self.x = x64.to(device) if kind == "embedding" else x64.to(device=device, dtype=base_dtype)
        W = self.layer.weight
        out_f, in_flat = W.shape[0], W[0].numel()
        g = torch.Generator().manual_seed(1)
        # Nonzero B and a delta comparable to W, so that an error in the update shows.
        self.A_val = ((torch.rand(R, in_flat, generator=g, dtype=torch.float64) + 0.5) / in_flat).to(adapter_dtype)
        self.B_val = ((torch.rand(out_f, R, generator=g, dtype=torch.float64) + 0.5) * 0.5).to(adapter_dtype)
        y_shape = self.reference()[0].shape
        cotangent = torch.rand(y_shape, generator=g, dtype=torch.float64) + 0.5
        self.cotangent = cotangent.to(device=device, dtype=base_dtype)

    def reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 output, |output| bound, and the float64 leaves A and B (for gradients)."""
        A = self.A_val.double().to(self.device).requires_grad_()
        B = self.B_val.double().to(self.device).requires_grad_()
        W = self.layer.weight.double()
        x = self.x if self.kind == "embedding" else self.x.double()
        weight = W + SCALING * (B @ A).view(W.shape)
        y = _reference(self.kind, self.layer, x, weight)
        mag = _abs_reference(self.kind, self.layer, x, W.abs() + SCALING * (B.abs() @ A.abs()).view(W.shape).detach())
        return y, mag.detach(), A, B

    def reference_grads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 gradients of <cotangent, y> w.r.t. A and B, and elementwise bounds of them."""
        y, _, A, B = self.reference()
        gA, gB = torch.autograd.grad((y * self.cotangent.double()).sum(), (A, B))
        # |dL/dW| <= the same vjp on absolute values; then dA = s·Bᵀ·dW, dB = s·dW·Aᵀ.
        W_abs = self.layer.weight.double().abs().requires_grad_()
        x = self.x if self.kind == "embedding" else self.x.double()
        y_abs = _abs_reference(self.kind, self.layer, x, W_abs)
        (dW,) = torch.autograd.grad((y_abs * self.cotangent.double().abs()).sum(), (W_abs,))
        dW = dW.reshape(dW.shape[0], -1)
        return gA, gB, SCALING * B.detach().abs().T @ dW, SCALING * dW @ A.detach().abs().T

    def tolerance(self, mag: torch.Tensor, k: int, accumulate_in_base: bool = False) -> torch.Tensor:
        u = unit_roundoff(self.base_dtype, self.device, conv=self.kind == "conv2d")
        u_acc = accumulation_roundoff(self.base_dtype, self.device)
        if accumulate_in_base and self.kind == "embedding" and self.base_dtype != torch.float32:
            u_acc = u
        return (k * u + self.n * u_acc) * mag + 1e-30

    def run(self, route: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The route's output, the effective weight it used, and the adapter leaves A and B."""
        if route == "stateful":
            module = copy.deepcopy(self.layer)
            lora = lora_func.apply_lora(module, r=R, alpha=ALPHA, init="zeros", dtype=self.adapter_dtype)
            with torch.no_grad():
                lora.A.copy_(self.A_val)
                lora.B.copy_(self.B_val)
            return module(self.x), module.weight, lora.A, lora.B
        params = dict(self.layer.named_parameters())
        (adapter,) = lora_func.init_adapters(
            params, "weight", r=R, alpha=ALPHA, init="zeros", dtype=self.adapter_dtype
        ).values()
        A = self.A_val.to(self.device).requires_grad_()
        B = self.B_val.to(self.device).requires_grad_()
        adapter = adapter.replace(A=A, B=B)
        if route == "materialized":
            new = lora_func.effective_params(params, {"weight": adapter})
        else:
            new = lora_func.lora_params(params, {"weight": adapter}, mode=route)
        return functional_call(self.layer, new, (self.x,)), new["weight"], A, B


def _case(kind: str, dtypes: tuple[torch.dtype, torch.dtype], device: str) -> Case:
    return Case(kind, dtypes[0], dtypes[1], device)


KINDS = ["linear", "conv2d", "embedding"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_forward_matches_float64(dtypes: Any, kind: str, route: str, device: str) -> None:
    case = _case(kind, dtypes, device)
    y, weight, A, B = case.run(route)
    assert y.dtype == case.base_dtype
    assert weight.dtype == case.base_dtype  # the effective weight stays in the base dtype
    assert A.dtype == B.dtype == case.adapter_dtype
    ref, mag, _, _ = case.reference()
    err = (y.double() - ref.detach()).abs()
    tol = case.tolerance(mag, k=8)
    assert bool((err <= tol).all()), f"max err/tol {float((err / tol).max()):.3g}"
    # The update matters at this size: dropping it would fail the bound.
    y_base = _reference(
        kind, case.layer, case.x if kind == "embedding" else case.x.double(), case.layer.weight.double()
    )
    assert not bool(((y_base - ref.detach()).abs() <= tol).all())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_gradients_match_float64(dtypes: Any, kind: str, route: str, device: str) -> None:
    case = _case(kind, dtypes, device)
    y, _, A, B = case.run(route)
    gA, gB = torch.autograd.grad((y * case.cotangent).float().sum(), (A, B))
    assert gA.dtype == gB.dtype == case.adapter_dtype
    refA, refB, magA, magB = case.reference_grads()
    for name, got, ref, mag in (("A", gA, refA, magA), ("B", gB, refB, magB)):
        err = (got.double() - ref).abs()
        tol = case.tolerance(mag, k=16, accumulate_in_base=True)
        if case.adapter_dtype != case.base_dtype:  # the gradient is also rounded to float32
            tol = tol + 2.0**-24 * mag
        assert bool((err <= tol).all()), f"d{name}: max err/tol {float((err / tol).max()):.3g}"
        assert float(ref.abs().max()) > 0  # a zero gradient would pass any bound


@pytest.mark.parametrize("bad", [torch.int64, "float32", torch.complex64])
def test_init_adapters_rejects_bad_dtype(bad: Any, device: str) -> None:
    with pytest.raises(TypeError, match=r"init_adapters: dtype must be None or a floating-point torch.dtype"):
        lora_func.init_adapters(nn.Linear(3, 4, device=device), "weight", dtype=bad)


@pytest.mark.parametrize("bad", [torch.int64, "float32", torch.complex64])
def test_apply_lora_rejects_bad_dtype_and_changes_nothing(bad: Any, device: str) -> None:
    layer = nn.Linear(3, 4, device=device)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match=r"apply_lora\(module, 'weight'\): dtype must be None or a floating-point"):
        lora_func.apply_lora(layer, dtype=bad)
    assert type(layer) is nn.Linear and layer.weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_dtype_default_is_the_weights(device: str) -> None:
    layer = nn.Linear(3, 4, dtype=torch.float16, device=device)
    assert lora_func.init_adapters(layer, "weight")["weight"].B.dtype == torch.float16
    assert lora_func.apply_lora(layer).A.dtype == torch.float16
    assert layer.weight.dtype == torch.float16
