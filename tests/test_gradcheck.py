"""Gradients checked against finite differences (``torch.autograd.gradcheck``, float64).

Every differentiable entry point: :func:`lora_func.merge` (2- to 5-D weights, single and
stacked adapters) and :func:`lora_func.delta`; every route of :class:`lora_func.LoRAWeight`
(``F.linear``, ``F.conv1d/2d/3d`` with stride, padding, dilation and groups,
``F.embedding`` with and without ``padding_idx``, and an op that materializes) in the
``"factored"`` and ``"materialize"`` modes; :func:`lora_func.lora_params` through
``functional_call``, with and without per-example routing (``index=``); and the stateful
:class:`lora_func.LoRAParam` forward, alone and inside a layer prepared with
:func:`lora_func.apply_lora`.

Gradients flow to every input that requires them: the input ``x``, the base weight, ``A``,
``B`` and ``scaling``. gradcheck compares the analytical Jacobian with central differences
(eps 1e-6, atol 1e-5, rtol 1e-3, its defaults), which is only meaningful in float64.

Every check runs on each available device (the ``device`` fixture). Inputs are drawn on the
CPU from seeded CPU generators and moved, so they are the same on every device; modules are
built on the CPU after seeding and moved. gradcheck also runs each backward twice and, by
default, demands bit-identical Jacobians. On the CPU these kernels are deterministic and that
stays so; on CUDA, cuDNN convolutions and the backward of ``gather`` (the routed convolution)
add with atomics in a varying order, so the two runs may differ by float64 round-off: see
:data:`NONDET_TOL`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.autograd.gradcheck import GradcheckError

import lora_func

D = torch.float64

#: How far two backward passes of the same inputs may differ (gradcheck's ``nondet_tol``).
#: 0 on the CPU: exact, as before. On CUDA, atomically accumulated sums (cuDNN convolution
#: gradients, ``gather``'s backward) are added in a varying order; reordering a float64 sum
#: of ``n`` terms changes it by at most ``2·n·u·Σ|terms|``, ``u = 2**-53``: below 1e-12 for
#: the few hundred terms of size < 10 summed here. 1e-10 leaves a margin and is still five
#: orders of magnitude below the ``atol`` (1e-5) that decides whether a gradient is right.
NONDET_TOL = {"cpu": 0.0, "cuda": 1e-10}


def _gradcheck(f: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], device: str) -> bool:
    return gradcheck(f, inputs, nondet_tol=NONDET_TOL[torch.device(device).type])


def _gradgradcheck(f: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], device: str) -> bool:
    return gradgradcheck(f, inputs, nondet_tol=NONDET_TOL[torch.device(device).type])


def _rand(*shape: int, seed: int, device: str) -> torch.Tensor:
    """Drawn on the CPU from a seeded CPU generator, moved, then made a leaf needing grad."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D).to(device).requires_grad_()


def _factors(
    shape: tuple[int, ...], r: int, device: str, lead: tuple[int, ...] = (), seed: int = 0
) -> tuple[torch.Tensor, ...]:
    in_flat = 1
    for d in shape[1:]:
        in_flat *= d
    A = _rand(*lead, r, in_flat, seed=seed, device=device)
    B = _rand(*lead, shape[0], r, seed=seed + 1, device=device)
    u = torch.rand(lead, generator=torch.Generator().manual_seed(seed + 2), dtype=D)
    scaling = (u + 0.5).to(device).requires_grad_()
    return A, B, scaling


# --- merge and delta -------------------------------------------------------------------------

SHAPES = [(4, 3), (3, 2, 3), (3, 2, 2, 2), (2, 2, 2, 1, 2)]


@pytest.mark.parametrize("lead", [(), (2,)], ids=["single", "stacked"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_merge(device: str, shape: tuple[int, ...], lead: tuple[int, ...]) -> None:
    base = _rand(*shape, seed=10, device=device)
    A, B, scaling = _factors(shape, r=2, device=device, lead=lead)

    def f(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        return lora_func.merge(base, lora_func.LoRA(A, B, scaling, shape))

    assert _gradcheck(f, (base, A, B, scaling), device)
    assert _gradgradcheck(f, (base, A, B, scaling), device)


@pytest.mark.parametrize("lead", [(), (3,)], ids=["single", "stacked"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_delta(device: str, shape: tuple[int, ...], lead: tuple[int, ...]) -> None:
    A, B, scaling = _factors(shape, r=3, device=device, lead=lead)
    assert _gradcheck(lambda A, B, s: lora_func.delta(lora_func.LoRA(A, B, s, shape)), (A, B, scaling), device)


@pytest.mark.device_independent("checks gradcheck itself on a hand-written backward; no lora_func code runs")
def test_gradcheck_can_fail() -> None:
    """The check above is not vacuous: a wrong backward is caught."""

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g * 2.01  # 0.5 % off: more than the rtol of 1e-3

    with pytest.raises(GradcheckError):
        gradcheck(Wrong.apply, (_rand(3, seed=0, device="cpu"),))


# --- LoRAWeight routes ------------------------------------------------------------------------

MODES = ["factored", "materialize"]


def _check_route(
    op: Callable[..., torch.Tensor], x: Any, shape: tuple[int, ...], mode: str, device: str, r: int = 2
) -> None:
    """gradcheck of ``op(x, LoRAWeight(base, A, B, scaling))`` over x (if float), base, A, B,
    scaling; ``x`` and whatever ``op`` closes over must already be on ``device``."""
    base = _rand(*shape, seed=20, device=device)
    A, B, scaling = _factors(shape, r=r, device=device, seed=30)
    used: list[str] = []

    def f(*inputs: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            xx, base, A, B, scaling = inputs
        else:
            (base, A, B, scaling), xx = inputs, x
        w = lora_func.LoRAWeight(base, mode=mode, A=A, B=B, scaling=scaling)
        used.append(w.route)
        return op(xx, w)

    inputs = (x, base, A, B, scaling) if x.is_floating_point() else (base, A, B, scaling)
    assert _gradcheck(f, inputs, device)
    assert set(used) == {mode}
    # And the values are those of the merged weight (so the gradients checked are the right ones).
    with torch.no_grad():
        merged = base + scaling * (B @ A).view(shape)
        ref = op(x, merged)
        got = f(*inputs)
    # Factored and merged routes sum in another order: float64 round-off only.
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(device: str, mode: str, bias: bool) -> None:
    b = _rand(4, seed=5, device=device) if bias else None
    _check_route(lambda x, w: F.linear(x, w, b), _rand(2, 3, 3, seed=1, device=device), (4, 3), mode, device)


CONVS = [
    # (conv, x shape, weight shape, kwargs)
    (F.conv1d, (2, 4, 7), (6, 2, 3), {"stride": 2, "padding": 1, "dilation": 2, "groups": 2}),
    (F.conv1d, (4, 7), (3, 4, 3), {"padding": "same"}),  # unbatched input
    (F.conv2d, (1, 2, 5, 6), (4, 2, 2, 3), {"stride": (1, 2), "padding": (1, 0), "dilation": (2, 1)}),
    (F.conv2d, (2, 4, 5, 5), (4, 1, 3, 3), {"padding": 1, "groups": 4}),  # depthwise
    (F.conv3d, (1, 2, 4, 3, 4), (2, 1, 2, 1, 2), {"stride": (2, 1, 1), "padding": (0, 1, 1), "groups": 2}),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("conv", "x_shape", "w_shape", "kwargs"), CONVS, ids=lambda v: getattr(v, "__name__", None))
def test_conv(
    device: str,
    conv: Callable[..., torch.Tensor],
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    kwargs: dict[str, Any],
    mode: str,
) -> None:
    b = _rand(w_shape[0], seed=6, device=device)
    _check_route(lambda x, w: conv(x, w, b, **kwargs), _rand(*x_shape, seed=2, device=device), w_shape, mode, device)


def test_conv_positional_arguments_factored(device: str) -> None:
    """nn.ConvNd calls F.conv2d with positional stride/padding/dilation/groups."""
    b = _rand(4, seed=6, device=device)
    x = _rand(1, 4, 5, 5, seed=3, device=device)
    _check_route(lambda x, w: F.conv2d(x, w, b, 2, 1, 1, 2), x, (4, 2, 3, 3), "factored", device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding(device: str, mode: str, padding_idx: int | None) -> None:
    # F.embedding sends no gradient to the padding row by design, which finite differences
    # cannot know: with a padding_idx the indices avoid that row (the next test covers it).
    rows = [[0, 2, 5], [5, 1, 2]] if padding_idx is None else [[0, 1, 3], [4, 4, 1]]
    idx = torch.tensor(rows, device=device)
    _check_route(lambda x, w: F.embedding(x, w, padding_idx), idx, (6, 3), mode, device)


@pytest.mark.parametrize("padding_idx", [2, -4])
def test_embedding_padding_gradients_equal_the_merged_weight(device: str, padding_idx: int) -> None:
    """Where indices hit padding_idx, the factored route's gradients are the merged weight's."""
    idx = torch.tensor([[0, 2, 5], [2, 1, 2]], device=device)
    base = _rand(6, 3, seed=20, device=device)
    A, B, scaling = _factors((6, 3), r=2, device=device)
    cot = _rand(2, 3, 3, seed=21, device=device).detach()
    grads = []
    for route in ("factored", "merged"):
        inputs = [t.detach().clone().requires_grad_() for t in (base, A, B, scaling)]
        b, a, bb, s = inputs
        w = lora_func.LoRAWeight(b, mode="factored", A=a, B=bb, scaling=s) if route == "factored" else None
        w = w if w is not None else b + s * (bb @ a)
        (F.embedding(idx, w, padding_idx) * cot).sum().backward()
        grads.append([t.grad for t in inputs])
    for got, ref in zip(*grads, strict=True):
        # Two routes that sum in another order: float64 round-off only.
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_embedding_padding_row_gets_no_adapter_gradient(device: str) -> None:
    """At padding_idx the adapter gets no gradient, as with the merged weight; elsewhere it does."""
    base = _rand(6, 3, seed=20, device=device)
    A, B, scaling = _factors((6, 3), r=2, device=device)
    w = lora_func.LoRAWeight(base, mode="factored", A=A, B=B, scaling=scaling)
    F.embedding(torch.tensor([2, 2], device=device), w, padding_idx=2).sum().backward()
    assert A.grad is not None and B.grad is not None
    # Exactly zero on every device: the padding rows' path is detached, no arithmetic reaches A, B.
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0


GENERIC = [
    # ops with no factored form: the LoRAWeight materializes merge(base, lora) for them
    pytest.param(lambda x, w: torch.tanh(w) * x, (4, 3), (4, 3), id="tanh"),
    pytest.param(lambda x, w: x @ w.T, (2, 3), (4, 3), id="matmul-T"),
    pytest.param(lambda x, w: F.conv_transpose1d(x, w), (1, 4, 5), (4, 2, 3), id="conv_transpose1d"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("op", "x_shape", "w_shape"), GENERIC)
def test_generic_op_materializes_with_gradients(
    device: str, mode: str, op: Callable[..., torch.Tensor], x_shape: tuple[int, ...], w_shape: tuple[int, ...]
) -> None:
    _check_route(op, _rand(*x_shape, seed=4, device=device), w_shape, mode, device)


# --- lora_params through functional_call -----------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", *MODES])
def test_lora_params_functional_call(device: str, mode: str) -> None:
    torch.manual_seed(0)  # built on the CPU, then moved: the same weights on every device
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 2)).to(device=device, dtype=D)
    params = lora_func.base_params(model)
    shapes = {"0.weight": (3, 2, 2), "3.weight": (2, 9)}
    factors = [t for name in shapes for t in _factors(shapes[name], r=2, device=device, seed=len(name))]
    x = _rand(2, 2, 4, seed=7, device=device)

    def f(x: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        adapters = {n: lora_func.LoRA(*flat[3 * i : 3 * i + 3], shapes[n]) for i, n in enumerate(shapes)}
        return torch.func.functional_call(model, lora_func.lora_params(params, adapters, mode=mode), (x,))

    assert _gradcheck(f, (x, *factors), device)


ROUTED_LAYERS = {
    "linear": (lambda: nn.Linear(3, 4), (4, 2, 3)),
    "conv2d": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), (4, 4, 4, 4)),
    "embedding": (lambda: nn.Embedding(6, 3, padding_idx=0), None),
}


@pytest.mark.parametrize("mode", ["auto", "materialize"])
@pytest.mark.parametrize("layer", list(ROUTED_LAYERS))
def test_lora_params_routing(device: str, layer: str, mode: str) -> None:
    """Per-example routing (index with -1 and a repeated adapter) over x, A, B and scaling."""
    torch.manual_seed(0)  # built on the CPU, then moved: the same weights on every device
    make, x_shape = ROUTED_LAYERS[layer]
    m = make().to(device=device, dtype=D)
    params = {k: v.detach() for k, v in m.named_parameters()}
    shape = tuple(params["weight"].shape)
    A, B, scaling = _factors(shape, r=2, device=device, lead=(3,))
    index = torch.tensor([2, -1, 2, 0], device=device)
    # (the indices avoid padding_idx 0, whose row F.embedding gives no gradient by design)
    tokens = [[3, 1, 4], [5, 4, 2], [3, 2, 2], [1, 1, 5]]
    x = torch.tensor(tokens, device=device) if x_shape is None else _rand(*x_shape, seed=8, device=device)

    def f(*inputs: torch.Tensor) -> torch.Tensor:
        xx, (A, B, s) = (x, inputs) if x_shape is None else (inputs[0], inputs[1:])
        routed = lora_func.lora_params(params, {"weight": lora_func.LoRA(A, B, s, shape)}, index=index, mode=mode)
        return torch.func.functional_call(m, routed, (xx,))

    assert _gradcheck(f, (A, B, scaling) if x_shape is None else (x, A, B, scaling), device)
    # The values checked are each example's merged-weight output.
    with torch.no_grad():
        got = f(A, B, scaling) if x_shape is None else f(x, A, B, scaling)
        for i, k in enumerate(index.tolist()):
            W = params["weight"] if k < 0 else params["weight"] + scaling[k] * (B[k] @ A[k]).view(shape)
            want = torch.func.functional_call(m, {**params, "weight": W}, (x[i : i + 1],))[0]
            # Batched and one-example routes sum in another order: float64 round-off only.
            torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


# --- the stateful layer -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_lora_param_forward(device: str, shape: tuple[int, ...]) -> None:
    p = lora_func.LoRAParam(shape, r=2, alpha=3.0, init="gaussian", device=device, dtype=D)
    W = _rand(*shape, seed=9, device=device)
    A, B, _ = _factors(shape, r=2, device=device, seed=40)

    def f(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(p, {"A": A, "B": B}, (W,))

    assert _gradcheck(f, (W, A, B), device)
    with torch.no_grad():
        torch.testing.assert_close(f(W, A, B), W + 1.5 * (B @ A).view(shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("layer", "x_shape"),
    [
        (lambda: nn.Linear(3, 4), (2, 3)),
        (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), (1, 2, 5, 5)),
        (lambda: nn.Embedding(6, 3, padding_idx=0), None),
    ],
    ids=["Linear", "Conv2d", "Embedding"],
)
def test_apply_lora_layer(device: str, layer: Callable[[], nn.Module], x_shape: tuple[int, ...] | None) -> None:
    """The layer's own forward after apply_lora (its factored fast path) against finite differences."""
    torch.manual_seed(0)  # built on the CPU, then moved; apply_lora puts A and B on the weight's device
    m = layer().to(device=device, dtype=D)
    lora_func.apply_lora(m, r=2, init="gaussian")
    names = ["parametrizations.weight.original", "parametrizations.weight.0.A", "parametrizations.weight.0.B"]
    values = [_rand(*dict(m.named_parameters())[n].shape, seed=i, device=device) for i, n in enumerate(names)]
    # (the indices avoid padding_idx 0, whose row F.embedding gives no gradient by design)
    tokens = [[3, 1, 5], [5, 4, 2]]
    x = torch.tensor(tokens, device=device) if x_shape is None else _rand(*x_shape, seed=11, device=device)

    def f(*inputs: torch.Tensor) -> torch.Tensor:
        if x_shape is None:
            xx, vs = x, inputs
        else:
            xx, vs = inputs[0], inputs[1:]
        return torch.func.functional_call(m, dict(zip(names, vs, strict=True)), (xx,))

    assert _gradcheck(f, tuple(values) if x_shape is None else (x, *values), device)
