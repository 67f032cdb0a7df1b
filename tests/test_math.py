"""Tests of the one formula (``delta``, ``merge``) and of ``init``.

Numerics are checked against a float64 reference written out here,
``W + alpha / r * (B @ A).reshape(W.shape)``, with an error bound derived from the
working precision rather than a fixed tolerance (see :func:`_bound`).

Every test that makes tensors runs on each available device (the ``device`` fixture): random
data is drawn on the CPU with a CPU generator and moved, so the values are the same on every
device, and the float64 reference is computed on the CPU from ``.cpu()`` copies. The bound
only assumes IEEE rounding of the working dtype, which holds on CUDA too (TF32 is off in the
suite). Tests of ``init``'s own sampling draw from a generator on the device, as ``init``
requires. Argument checks that raise before any tensor exists run once.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lora_func
from lora_func import LoRA

from .conftest import rng_states

# Unit roundoff of each floating dtype (half the machine epsilon).
UNIT = {dt: torch.finfo(dt).eps / 2 for dt in (torch.float32, torch.float64, torch.bfloat16)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@st.composite
def weight_shapes(draw: st.DrawFn, min_dims: int = 2, max_dims: int = 5) -> tuple[int, ...]:
    """Shapes of 2- to 5-D weights with small sizes: (out, in, *kernel)."""
    n = draw(st.integers(min_dims, max_dims))
    return tuple(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)))


ranks = st.integers(1, 6)
alphas = st.floats(-64.0, 64.0, allow_nan=False, allow_infinity=False)
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)


def _randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Drawn on the CPU (``gen`` is a CPU generator), rounded to ``dtype`` there, then moved:
    the same values on every device."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _random_lora(
    shape: tuple[int, ...],
    r: int,
    alpha: float,
    seed: int,
    dtype: torch.dtype,
    device: str,
    lead: tuple[int, ...] = (),
) -> LoRA:
    """A LoRA on ``device`` with random (non-zero) A and B, so that the product is exercised."""
    gen = torch.Generator().manual_seed(seed)
    in_flat = math.prod(shape[1:])
    A = _randn((*lead, r, in_flat), gen, dtype, device)
    B = _randn((*lead, shape[0], r), gen, dtype, device)
    s_dtype = torch.promote_types(dtype, torch.float32)
    scaling = alpha / r if not lead else torch.full(lead, alpha / r, dtype=s_dtype, device=device)
    return LoRA(A, B, scaling, shape)


def _reference(W: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, s: float, shape: tuple[int, ...]):
    """The float64 reference ``W + s * B @ A`` (W may be None: the delta), and the magnitude
    ``|W| + |s| * |B| @ |A|`` that bounds its rounding error; both on the CPU, from copies of
    the inputs wherever they live."""
    A64, B64 = A.cpu().double(), B.cpu().double()
    prod = (B64 @ A64).reshape(shape)
    mag = abs(s) * (B64.abs() @ A64.abs()).reshape(shape)
    if W is None:
        return s * prod, mag
    W64 = W.cpu().double()
    return W64 + s * prod, W64.abs() + mag


def _bound(mag: torch.Tensor, r: int, *dtypes: torch.dtype) -> torch.Tensor:
    """Rounding-error bound: a length-r dot product costs at most r roundings, the scaling,
    its rounding, the sum and the final cast a few more, each of relative size u of the
    coarsest dtype involved: (r + 4) * u * magnitude."""
    u = max(UNIT[d] for d in dtypes)
    return (r + 4) * u * mag + torch.finfo(torch.float32).tiny


# --- merge and delta --------------------------------------------------------------------------


@given(weight_shapes(), ranks, alphas, seeds, dtypes, dtypes)
def test_merge_matches_float64_reference(device, shape, r, alpha, seed, base_dtype, lora_dtype):
    lora = _random_lora(shape, r, alpha, seed, lora_dtype, device)
    W = _randn(shape, torch.Generator().manual_seed(seed + 1), base_dtype, device)
    out = lora_func.merge(W, lora)
    assert out.dtype == base_dtype
    assert out.shape == W.shape
    assert out.device == W.device
    ref, mag = _reference(W, lora.A, lora.B, alpha / r, shape)
    # The result is rounded to base's dtype at the end: one more rounding of size u(base).
    err = (out.cpu().double() - ref).abs()
    assert bool((err <= _bound(mag, r, base_dtype, lora_dtype)).all()), float(err.max())


@given(weight_shapes(), ranks, alphas, seeds, dtypes)
def test_delta_matches_float64_reference(device, shape, r, alpha, seed, dtype):
    lora = _random_lora(shape, r, alpha, seed, dtype, device)
    out = lora_func.delta(lora)
    assert out.shape == shape
    assert out.dtype == dtype
    assert out.device == lora.A.device
    ref, mag = _reference(None, lora.A, lora.B, alpha / r, shape)
    err = (out.cpu().double() - ref).abs()
    assert bool((err <= _bound(mag, r, dtype)).all()), float(err.max())


@given(weight_shapes(), ranks, alphas, seeds, dtypes)
def test_merge_is_pure(device, shape, r, alpha, seed, dtype):
    lora = _random_lora(shape, r, alpha, seed, dtype, device)
    W = _randn(shape, torch.Generator().manual_seed(seed + 1), dtype, device)
    before = [t.clone() for t in (W, lora.A, lora.B, lora.scaling)]
    versions = [t._version for t in (W, lora.A, lora.B, lora.scaling)]
    out = lora_func.merge(W, lora)
    lora_func.delta(lora)
    assert out is not W
    assert out.data_ptr() != W.data_ptr()
    for t, b, v in zip((W, lora.A, lora.B, lora.scaling), before, versions, strict=True):
        assert torch.equal(t, b)  # b is a copy on the same device: exact wherever they live
        assert t._version == v  # no in-place write happened, not even one undone later
    assert lora.shape == shape


@given(weight_shapes(max_dims=4), ranks, st.lists(alphas, min_size=1, max_size=4), seeds, dtypes)
def test_stacked_merge_has_leading_dims(device, shape, r, alpha_list, seed, dtype):
    loras = [_random_lora(shape, r, a, seed + i, dtype, device) for i, a in enumerate(alpha_list)]
    stacked = lora_func.stack(loras)
    W = _randn(shape, torch.Generator().manual_seed(seed - 1), dtype, device)
    out = lora_func.merge(W, stacked)
    d = lora_func.delta(stacked)
    assert out.shape == (len(loras), *shape)
    assert d.shape == (len(loras), *shape)
    for k, (lora, a) in enumerate(zip(loras, alpha_list, strict=True)):
        ref, mag = _reference(W, lora.A, lora.B, a / r, shape)
        assert bool(((out[k].cpu().double() - ref).abs() <= _bound(mag, r, dtype)).all())
        ref_d, mag_d = _reference(None, lora.A, lora.B, a / r, shape)
        assert bool(((d[k].cpu().double() - ref_d).abs() <= _bound(mag_d, r, dtype)).all())


def test_merge_of_two_level_stack(device):
    shape, r = (3, 2, 2), 2
    inner = [
        lora_func.stack([_random_lora(shape, r, float(i + j), 10 * i + j, torch.float64, device) for j in range(3)])
        for i in range(2)
    ]
    nested = lora_func.stack(inner)
    W = _randn(shape, torch.Generator().manual_seed(7), torch.float64, device)
    out = lora_func.merge(W, nested)
    assert out.shape == (2, 3, *shape)
    for i in range(2):
        for j, lora in enumerate(lora_func.unstack(inner[i])):
            # A batched and a single matmul may sum in another order: float64 round-off only.
            torch.testing.assert_close(out[i, j], lora_func.merge(W, lora), rtol=1e-12, atol=1e-12)


def test_merge_gradients_flow_to_factors_and_scaling(device):
    shape, r = (4, 3, 2), 2
    lora = _random_lora(shape, r, 3.0, 0, torch.float64, device)
    for t in (lora.A, lora.B, lora.scaling):
        t.requires_grad_()
    gen = torch.Generator().manual_seed(1)
    W = _randn(shape, gen, torch.float64, device)
    G = _randn(shape, gen, torch.float64, device)
    (lora_func.merge(W, lora) * G).sum().backward()
    # d/dB sum(G * s (B A)) = s G_flat A^T, d/dA = s B^T G_flat, d/ds = sum(G * BA), in float64
    # on the same device as the gradients; the tolerance is float64 round-off.
    G_flat = G.reshape(shape[0], -1)
    s = 3.0 / 2
    torch.testing.assert_close(lora.B.grad, s * G_flat @ lora.A.detach().T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lora.A.grad, s * lora.B.detach().T @ G_flat, rtol=1e-12, atol=1e-12)
    expected_s = (G_flat * (lora.B.detach() @ lora.A.detach())).sum()
    torch.testing.assert_close(lora.scaling.grad, expected_s, rtol=1e-12, atol=1e-12)


def test_merge_errors(device):
    lora = lora_func.init((4, 3), r=2, device=device, generator=torch.Generator(device).manual_seed(0))
    with pytest.raises(TypeError, match=r"merge\(base, lora\): base must be a torch.Tensor, got list"):
        lora_func.merge([[0.0]], lora)
    with pytest.raises(TypeError, match=r"merge\(base, lora\): lora must be a lora_func.LoRA, got dict"):
        lora_func.merge(torch.zeros(4, 3, device=device), {"A": lora.A})
    with pytest.raises(ValueError, match=r"merge\(base, lora\): base has shape \(3, 4\) but lora was made for shape"):
        lora_func.merge(torch.zeros(3, 4, device=device), lora)
    with pytest.raises(ValueError, match=r"merge\(base, lora\).*unsupported weight shape \(12,\)"):
        lora_func.merge(torch.zeros(12, device=device), lora)
    with pytest.raises(TypeError, match=r"delta\(lora\): lora must be a lora_func.LoRA, got Tensor"):
        lora_func.delta(torch.zeros(4, 3, device=device))


# --- init -------------------------------------------------------------------------------------


@given(weight_shapes(), ranks, alphas, st.sampled_from(lora_func.INITS), st.sampled_from(DTYPES))
def test_init_shapes_scaling_dtypes(device, shape, r, alpha, init, dtype):
    gen = torch.Generator(device).manual_seed(0)
    lora = lora_func.init(shape, r, alpha, init, dtype=dtype, generator=gen, device=device)
    in_flat = math.prod(shape[1:])
    assert all(t.device.type == torch.device(device).type for t in (lora.A, lora.B, lora.scaling))
    assert lora.shape == shape
    assert lora.A.shape == (r, in_flat)
    assert lora.B.shape == (shape[0], r)
    assert lora.A.dtype == dtype and lora.B.dtype == dtype
    assert lora.scaling.shape == ()
    # scaling = alpha / r, kept in at least float32 so bfloat16 does not round it.
    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert lora.scaling.dtype == s_dtype
    assert float(lora.scaling) == float(torch.tensor(alpha / r, dtype=s_dtype))
    assert lora.r == r
    assert lora.batch_shape == ()
    assert not lora.A.requires_grad and not lora.B.requires_grad


def test_init_defaults(device):
    lora = lora_func.init((4, 3), device=device)  # every other argument left at its default
    assert lora.r == 8
    assert float(lora.scaling) == 1.0
    assert lora.A.dtype == torch.get_default_dtype()
    assert bool(lora.B.eq(0).all())  # kaimingA_zeroB is the default
    assert not bool(lora.A.eq(0).all())


@given(weight_shapes(), ranks, st.sampled_from(DTYPES))
def test_init_zeros_is_exactly_zero(device, shape, r, dtype):
    before = rng_states(device)
    lora = lora_func.init(shape, r, 4.0, "zeros", dtype=dtype, device=device)
    assert all(map(torch.equal, rng_states(device), before))  # zeros draws nothing
    assert bool(lora.A.eq(0).all()) and bool(lora.B.eq(0).all())
    W = _randn(shape, torch.Generator().manual_seed(r), dtype, device)
    # Exact on every device: B @ A is a sum of exact zeros, and W + 0 (or its float32 round
    # trip, for bfloat16) is W under IEEE rounding.
    assert torch.equal(lora_func.merge(W, lora), W)


@given(weight_shapes(), ranks, seeds)
def test_init_kaiming_is_within_its_bound(device, shape, r, seed):
    gen = torch.Generator(device).manual_seed(seed)
    lora = lora_func.init(shape, r, init="kaimingA_zeroB", generator=gen, device=device)
    # kaiming_uniform with a=sqrt(5): gain sqrt(2 / (1 + 5)), bound sqrt(3) * gain / sqrt(fan_in)
    # = 1 / sqrt(fan_in), and fan_in is A's second dimension, the flattened input size.
    bound = 1 / math.sqrt(math.prod(shape[1:]))
    assert float(lora.A.abs().max()) <= bound * (1 + 1e-6)
    assert bool(lora.B.eq(0).all())


def test_init_kaiming_distribution(device):
    # 64 x 576 = 36,864 draws of U(-b, b) with b = 1 / sqrt(576), from the device's own
    # generator (CPU and CUDA streams differ). The sample statistics are compared with wide
    # margins (> 6 standard errors), which any stream meets, and the seed is fixed: not flaky.
    shape, r = (32, 64, 3, 3), 64
    gen = torch.Generator(device).manual_seed(1234)
    lora = lora_func.init(shape, r, init="kaimingA_zeroB", generator=gen, device=device)
    a = lora.A.cpu().double().flatten()
    n, b = a.numel(), 1 / math.sqrt(576)
    assert float(a.abs().max()) <= b
    assert float(a.abs().max()) > b * (1 - 10 / n)  # the support reaches the bound
    assert abs(float(a.mean())) < 6 * (b / math.sqrt(3)) / math.sqrt(n)
    # var of U(-b, b) is b^2 / 3; the relative s.e. of a sample variance is sqrt(0.8 / n) ~ 0.5%.
    assert float(a.var()) == pytest.approx(b**2 / 3, rel=0.04)
    # Uniform, not bell-shaped: a quarter of the draws in each quarter of [-b, b].
    counts = torch.histc(a, bins=4, min=-b, max=b) / n
    assert torch.allclose(counts, torch.full((4,), 0.25, dtype=counts.dtype), atol=0.02)


def test_init_gaussian_distribution(device):
    shape, r = (256, 64, 3, 3), 64  # A: 36,864 draws, B: 16,384 draws, from the device's generator
    lora = lora_func.init(shape, r, init="gaussian", generator=torch.Generator(device).manual_seed(99), device=device)
    for t in (lora.A, lora.B):
        x = t.cpu().double().flatten()
        n = x.numel()
        # std 1e-4; the relative s.e. of a sample std is 1 / sqrt(2n) < 0.6%: 4% is > 6 s.e.
        assert float(x.std()) == pytest.approx(1e-4, rel=0.04)
        assert abs(float(x.mean())) < 6 * 1e-4 / math.sqrt(n)
        # Normal: about 68.3% within one std.
        assert float((x.abs() < 1e-4).double().mean()) == pytest.approx(0.6827, abs=0.02)


@given(weight_shapes(), ranks, st.sampled_from(["kaimingA_zeroB", "gaussian"]), seeds)
def test_init_generator_is_reproducible_and_leaves_global_rng_alone(device, shape, r, init, seed):
    def make(s: int) -> LoRA:
        return lora_func.init(shape, r, init=init, generator=torch.Generator(device).manual_seed(s), device=device)

    before = rng_states(device)
    a = make(seed)
    b = make(seed)
    assert all(map(torch.equal, rng_states(device), before))
    # Exact on every device: the same kernel, the same generator state, the same order.
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    c = make(seed + 1)
    if a.A.numel() > 1:  # one draw could repeat by chance; several will not
        assert not torch.equal(a.A, c.A)


@pytest.mark.parametrize("init", lora_func.INITS)
@given(shape=weight_shapes(), r=ranks, alpha=alphas, seed=seeds)
def test_init_global_rng_matches_lora_param(device, init, shape, r, alpha, seed):
    # torch.manual_seed seeds the CPU and every CUDA generator: both draw from the device's own.
    torch.manual_seed(seed)
    p = lora_func.LoRAParam(shape, r, alpha, init, device=device)
    torch.manual_seed(seed)
    lora = lora_func.init(shape, r, alpha, init, device=device)
    # Exact on every device: the same draws from the same generator state, in the same order.
    assert torch.equal(lora.A, p.A.detach())
    assert torch.equal(lora.B, p.B.detach())
    assert float(lora.scaling) == pytest.approx(p.scaling, rel=1e-7)


@given(shape=weight_shapes(), r=ranks, seed=seeds)
def test_init_global_rng_draw_order(device, shape, r, seed):
    """The documented order, written out: creating B and A draws nothing; then A is drawn,
    then B (from the device's default generator)."""
    in_flat = math.prod(shape[1:])
    torch.manual_seed(seed)
    A_ref = torch.empty(r, in_flat, device=device).normal_(0.0, 1e-4)
    B_ref = torch.empty(shape[0], r, device=device).normal_(0.0, 1e-4)
    torch.manual_seed(seed)
    lora = lora_func.init(shape, r, init="gaussian", device=device)
    # Exact on every device: the same normal_ kernel on tensors of the same sizes, from the
    # same generator state, in the same order.
    assert torch.equal(lora.A, A_ref) and torch.equal(lora.B, B_ref)

    torch.manual_seed(seed)
    bound = 1 / math.sqrt(in_flat)
    A_ref = torch.empty(r, in_flat, device=device).uniform_(-bound, bound)
    torch.manual_seed(seed)
    lora = lora_func.init(shape, r, init="kaimingA_zeroB", device=device)
    # torch computes the bound as sqrt(3) * gain / sqrt(fan_in): equal up to rounding.
    torch.testing.assert_close(lora.A, A_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.device_independent("the shape is refused before any tensor is made")
@pytest.mark.parametrize("shape", [(5,), (2, 3, 1, 1, 1, 2), ()])
def test_init_rejects_unsupported_shapes(shape):
    with pytest.raises(ValueError, match=re.escape(f"unsupported weight shape {shape}")):
        lora_func.init(shape)


@pytest.mark.device_independent("r, alpha, init and dtype are refused before any tensor is made")
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 0}, ValueError, r"init: r must be a positive int, got 0"),
        ({"r": -3}, ValueError, r"init: r must be a positive int, got -3"),
        ({"r": 2.0}, TypeError, r"init: r must be a positive int, got 2.0"),
        ({"r": True}, TypeError, r"init: r must be a positive int, got True"),
        ({"alpha": float("nan")}, ValueError, r"init: alpha must be a finite number, got nan"),
        ({"alpha": float("inf")}, ValueError, r"init: alpha must be a finite number, got inf"),
        ({"alpha": "8"}, TypeError, r"init: alpha must be a finite number, got '8'"),
        ({"init": "xavier"}, ValueError, r"init: unknown init 'xavier'; expected one of \['zeros'"),
        ({"dtype": torch.int64}, TypeError, r"init: dtype must be a floating-point dtype"),
    ],
)
def test_init_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        lora_func.init((4, 3), **kwargs)


@pytest.mark.device_independent("the shape is refused before any tensor is made")
def test_init_shape_errors():
    with pytest.raises(ValueError, match=r"init: weight shape must have positive sizes, got \(4, 0\)"):
        lora_func.init((4, 0))
    with pytest.raises(TypeError, match=r"init: weight shape must be a sequence of ints"):
        lora_func.init(4)
    with pytest.raises(TypeError, match=r"init: weight shape must be a sequence of ints"):
        lora_func.init((4, 3.0))


def test_init_device(device):
    gen = torch.Generator(device=device).manual_seed(0)
    lora = lora_func.init((4, 3, 2), r=2, device=device, generator=gen)
    for t in (lora.A, lora.B, lora.scaling):
        assert t.device.type == device
