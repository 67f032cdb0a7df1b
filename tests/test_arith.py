"""Tests of adapter arithmetic: ``scale``, ``add``, ``truncate``, ``weighted_sum``, ``mean``.

Every claim is stated on the update ``delta`` and checked against a float64 reference
written out here, ``s * (B @ A)``, with the singular values of truncation taken from
``torch.linalg.svdvals`` of that full float64 matrix. Error bounds are derived from the
working precision (see :func:`_bound`) rather than fixed.

Every test runs on each available device (the ``device`` fixture): the random factors are
drawn on the CPU and moved, so they are the same on every device; the code under test runs
on ``device``; the float64 references are computed on the CPU from copies of the factors,
and the results are brought to the CPU to be compared with them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lora_func
from lora_func import LoRA

# Unit roundoff of each floating dtype (half the machine epsilon).
UNIT = {dt: torch.finfo(dt).eps / 2 for dt in (torch.float32, torch.float64)}

dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(0, 2**31 - 1)
leads = st.sampled_from([(), (2,), (3,), (2, 2)])


@st.composite
def weight_shapes(draw: st.DrawFn) -> tuple[int, ...]:
    """Shapes of 2- to 5-D weights with small sizes: (out, in, *kernel)."""
    n = draw(st.integers(2, 5))
    return (
        draw(st.integers(1, 7)),
        draw(st.integers(1, 6)),
        *draw(st.lists(st.integers(1, 3), min_size=n - 2, max_size=n - 2)),
    )


def _lora(
    shape: tuple[int, ...], r: int, seed: int, dtype: torch.dtype, device: str, lead: tuple[int, ...] = ()
) -> LoRA:
    """A LoRA on ``device`` with random A, B and scaling in [-4, 4] (one per stacked adapter),
    drawn on the CPU so that the values are the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    in_flat = math.prod(shape[1:])
    A = torch.randn((*lead, r, in_flat), generator=gen, dtype=torch.float64).to(dtype)
    B = torch.randn((*lead, shape[0], r), generator=gen, dtype=torch.float64).to(dtype)
    scaling = (8 * torch.rand(lead, generator=gen, dtype=torch.float64) - 4).to(
        torch.promote_types(dtype, torch.float32)
    )
    return LoRA(A.to(device), B.to(device), scaling.to(device), shape)


def _ref(lora: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference update ``s * B @ A`` as (*lead, out, in_flat) matrices on the CPU,
    and the magnitude ``|s| * |B| @ |A|`` that bounds the rounding error of computing it."""
    A, B = lora.A.cpu().double(), lora.B.cpu().double()
    s = lora.scaling.cpu().double()[..., None, None]
    return s * (B @ A), s.abs() * (B.abs() @ A.abs())


def _mat(lora: LoRA) -> torch.Tensor:
    """``lora_func.delta`` (the code under test, on the adapter's device) as float64
    (*lead, out, in_flat) matrices on the CPU, to compare with :func:`_ref`."""
    d = lora_func.delta(lora).cpu().double()
    return d.reshape(*lora.batch_shape, lora.shape[0], -1)


def _bound(mag: torch.Tensor, terms: int, dtype: torch.dtype) -> torch.Tensor:
    """Rounding bound of a sum of ``terms`` products in ``dtype``: ``terms * u * mag`` is the
    textbook bound; 4x margin and an absolute floor for values that cancel to ~0."""
    u = UNIT[dtype]
    return 4 * (terms + 2) * u * mag + 1e-30


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    err = (actual - expected).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


# --- scale ------------------------------------------------------------------------------------


@given(weight_shapes(), st.integers(1, 5), dtypes, leads, seeds, st.floats(-8, 8, allow_nan=False), st.booleans())
def test_scale_multiplies_delta(device, shape, r, dtype, lead, seed, c, per_adapter):
    a = _lora(shape, r, seed, dtype, device, lead)
    factor = torch.linspace(-2, 3, math.prod(lead), device=device).reshape(lead) if per_adapter else c
    out = lora_func.scale(a, factor)
    ref, mag = _ref(a)
    cf = factor[..., None, None].cpu().double() if isinstance(factor, torch.Tensor) else factor
    _assert_within(_mat(out), cf * ref, _bound(abs(cf) * mag, r + 1, dtype))
    # A and B are shared, only the scaling changes.
    assert out.A is a.A and out.B is a.B and out.shape == a.shape


def test_scale_maps_over_a_tree_and_does_not_write_into_its_input(device):
    tree = {"a": _lora((3, 4), 2, 0, torch.float64, device), "b": [_lora((5, 2, 3), 1, 1, torch.float64, device)]}
    before = {"a": tree["a"].scaling.clone(), "b": tree["b"][0].scaling.clone()}
    out = lora_func.scale(tree, torch.tensor(-3.0, dtype=torch.float64, device=device))
    assert set(out) == {"a", "b"} and isinstance(out["b"], list)
    # Exact on every device: one correctly rounded float64 product on each side (s * -3 == -3 * s).
    assert torch.equal(out["a"].scaling, -3 * before["a"]) and torch.equal(out["b"][0].scaling, -3 * before["b"])
    assert torch.equal(tree["a"].scaling, before["a"]) and torch.equal(tree["b"][0].scaling, before["b"])


# --- add --------------------------------------------------------------------------------------


@given(weight_shapes(), st.integers(1, 5), st.integers(1, 5), dtypes, dtypes, leads, st.booleans(), seeds)
def test_add_is_exact(device, shape, ra, rb, da, db, lead, b_single, seed):
    a = _lora(shape, ra, seed, da, device, lead)
    b = _lora(shape, rb, seed + 1, db, device, () if b_single else lead)  # a single adapter broadcasts over a stack
    out = lora_func.add(a, b)
    assert out.r == ra + rb and out.batch_shape == lead and out.shape == shape
    assert bool((out.scaling == 1).all())
    (ref_a, mag_a), (ref_b, mag_b) = _ref(a), _ref(b)
    dtype = torch.promote_types(da, db)
    _assert_within(_mat(out), ref_a + ref_b, _bound(mag_a + mag_b, ra + rb + 1, dtype))


@given(weight_shapes(), st.lists(st.integers(1, 4), min_size=3, max_size=3), dtypes, seeds)
def test_add_is_commutative_and_associative_in_delta(device, shape, ranks, dtype, seed):
    a, b, c = (_lora(shape, r, seed + i, dtype, device) for i, r in enumerate(ranks))
    refs = [_ref(x) for x in (a, b, c)]
    expected = sum(ref for ref, _ in refs)
    bound = _bound(sum(mag for _, mag in refs), sum(ranks) + 2, dtype)
    for combo in (
        lora_func.add(lora_func.add(a, b), c),
        lora_func.add(a, lora_func.add(b, c)),
        lora_func.add(lora_func.add(c, a), b),
        lora_func.add(c, lora_func.add(b, a)),
    ):
        _assert_within(_mat(combo), expected, bound)


def test_add_over_trees_and_low_precision_factors(device):
    a = {"x": _lora((4, 3), 2, 0, torch.float32, device), "y": _lora((2, 3, 3), 1, 1, torch.float32, device)}
    b = {"x": _lora((4, 3), 3, 2, torch.float32, device), "y": _lora((2, 3, 3), 2, 3, torch.float32, device)}
    out = lora_func.add(a, b)
    assert sorted(out) == ["x", "y"] and (out["x"].r, out["y"].r) == (5, 3)
    for k in out:
        torch.testing.assert_close(_mat(out[k]), _ref(a[k])[0] + _ref(b[k])[0], rtol=1e-5, atol=1e-5)
    # bfloat16 factors stay bfloat16 (the scaling is folded in float32 and rounded once).
    lo = lora_func.add(a["x"].replace(A=a["x"].A.bfloat16(), B=a["x"].B.bfloat16()), b["x"])
    assert lo.A.dtype == torch.float32 and lo.B.dtype == torch.float32  # promoted with b's float32
    both = lora_func.add(*(t.replace(A=t.A.bfloat16(), B=t.B.bfloat16()) for t in (a["x"], b["x"])))
    assert both.A.dtype == torch.bfloat16 and both.B.dtype == torch.bfloat16


# --- truncate ---------------------------------------------------------------------------------


@given(weight_shapes(), st.integers(1, 8), st.integers(1, 8), dtypes, leads, seeds)
def test_truncate_is_the_best_rank_r_approximation(device, shape, r0, r, dtype, lead, seed):
    a = _lora(shape, r0, seed, dtype, device, lead)
    t = lora_func.truncate(a, r)
    assert t.r == min(r, r0) and t.batch_shape == lead and t.shape == shape
    assert t.A.dtype == dtype and t.B.dtype == dtype
    full, mag = _ref(a)
    sv = torch.linalg.svdvals(full)  # float64 SVD of the whole update, descending
    optimal = sv[..., r:].square().sum(-1).sqrt()  # Eckart–Young: the dropped singular values
    actual = (_mat(t) - full).square().sum((-2, -1)).sqrt()
    # QR and SVD are backward stable: errors of a modest multiple of u * ||factors||, and the
    # product with A, B adds r0 terms; (out + in + r0) covers the dimension-dependent constant.
    n = shape[0] + math.prod(shape[1:]) + r0
    tol = 8 * n * UNIT[dtype] * mag.square().sum((-2, -1)).sqrt() + 1e-12
    assert bool(((actual - optimal).abs() <= tol).all()), (actual, optimal, tol)


@given(weight_shapes(), st.integers(2, 8), st.integers(1, 8), dtypes, seeds)
def test_truncate_is_idempotent_and_keeps_adapters_of_small_rank(device, shape, r0, r, dtype, seed):
    a = _lora(shape, r0, seed, dtype, device)
    once = lora_func.truncate(a, r)
    twice = lora_func.truncate(once, r)
    _assert_within(_mat(twice), _mat(once), _bound(_ref(once)[1], r, dtype))
    same = lora_func.truncate(a, r0 + r - 1)  # r >= rank: nothing to drop
    # Exact on every device: nothing is computed, the factors are handed back as they are.
    assert same.r == r0 and torch.equal(same.A, a.A) and torch.equal(same.B, a.B)
    assert torch.equal(same.scaling, a.scaling)


def test_truncate_pads_with_zeros_beyond_the_rank_of_the_update(device):
    a = _lora((2, 3), 6, 0, torch.float64, device)  # the update has at most 2 directions
    t = lora_func.truncate(a, 4)
    assert t.r == 4
    assert bool((t.A[2:] == 0).all()) and bool((t.B[:, 2:] == 0).all())  # written zeros: exact anywhere
    torch.testing.assert_close(_mat(t), _ref(a)[0], rtol=1e-12, atol=1e-12)  # float64: exact to roundoff


def test_truncate_maps_over_a_tree(device):
    tree = {"p": _lora((6, 5), 4, 0, torch.float64, device), "q": (_lora((4, 2, 2), 3, 1, torch.float64, device),)}
    out = lora_func.truncate(tree, 2)
    assert out["p"].r == 2 and out["q"][0].r == 2 and isinstance(out["q"], tuple)


# --- weighted sums ----------------------------------------------------------------------------


@given(weight_shapes(), st.integers(1, 4), st.integers(1, 4), dtypes, st.sampled_from([(), (2,)]), seeds)
def test_weighted_sum_and_mean_are_exact(device, shape, r, k, dtype, rest, seed):
    s = _lora(shape, r, seed, dtype, device, (k, *rest))
    w = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref, mag = _ref(s)  # (k, *rest, out, in)
    wr = w.reshape(k, *([1] * (len(rest) + 2)))
    ws = lora_func.weighted_sum(s, w.tolist())
    assert ws.r == k * r and ws.batch_shape == rest and bool((ws.scaling == 1).all())
    _assert_within(_mat(ws), (wr * ref).sum(0), _bound((wr.abs() * mag).sum(0), k * r + 2, dtype))
    m = lora_func.mean(s)
    assert m.r == k * r and m.batch_shape == rest
    _assert_within(_mat(m), ref.mean(0), _bound(mag.mean(0), k * r + 2, dtype))


@given(weight_shapes(), st.integers(1, 3), st.integers(2, 4), st.integers(1, 4), dtypes, seeds)
def test_weighted_sum_with_rank_is_the_best_approximation_of_the_sum(device, shape, r, k, rank, dtype, seed):
    s = _lora(shape, r, seed, dtype, device, (k,))
    w = torch.linspace(-1, 2, k, dtype=torch.float64, device=device)
    out = lora_func.weighted_sum(s, w, rank=rank)
    assert out.r == min(rank, k * r)
    ref, mag = _ref(s)
    w = w.cpu()  # the weights the code was given, for the CPU reference
    full = (w[:, None, None] * ref).sum(0)
    optimal = torch.linalg.svdvals(full)[rank:].square().sum().sqrt()
    actual = (_mat(out) - full).square().sum().sqrt()
    n = shape[0] + math.prod(shape[1:]) + k * r
    tol = 8 * n * UNIT[dtype] * (w.abs()[:, None, None] * mag).sum(0).square().sum().sqrt() + 1e-12
    assert abs(actual - optimal) <= tol
    mr = lora_func.mean(s, rank=rank)
    optimal = torch.linalg.svdvals(ref.mean(0))[rank:].square().sum().sqrt()
    actual = (_mat(mr) - ref.mean(0)).square().sum().sqrt()
    assert abs(actual - optimal) <= tol


def test_mean_and_weighted_sum_over_a_tree_of_stacks(device):
    trees = [
        {"a": _lora((3, 4), 2, i, torch.float64, device), "b": _lora((2, 2, 3), 1, 10 + i, torch.float64, device)}
        for i in range(3)
    ]
    stacked = lora_func.stack(trees)
    m = lora_func.mean(stacked)
    ws = lora_func.weighted_sum(stacked, torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64, device=device))
    for key in ("a", "b"):
        refs = [_ref(t[key])[0] for t in trees]
        torch.testing.assert_close(_mat(m[key]), sum(refs) / 3, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_mat(ws[key]), refs[0] - refs[2], rtol=1e-12, atol=1e-12)


# --- staying low-rank -------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_operation_builds_the_full_update(device):
    out, inp, r, k = 256, 384, 4, 3
    a = _lora((out, inp), r, 0, torch.float32, device)
    b = _lora((out, inp), r, 1, torch.float32, device)
    s = _lora((out, inp), r, 2, torch.float32, device, (k,))
    with _LargestTensor() as probe:
        lora_func.truncate(lora_func.add(lora_func.scale(a, 2.0), b), 3)
        lora_func.weighted_sum(s, [1.0, 2.0, 3.0], rank=2)
        lora_func.mean(s)
    assert probe.largest <= k * r * inp < out * inp  # factor-sized tensors only
    with _LargestTensor() as probe:  # the probe does see a full update when one is built
        lora_func.delta(a)
    assert probe.largest == out * inp


# --- gradients --------------------------------------------------------------------------------


def test_gradients_flow_through_add_scale_and_weighted_sum(device):
    a = _lora((4, 3, 2), 2, 0, torch.float64, device)
    b = _lora((4, 3, 2), 3, 1, torch.float64, device)
    s = _lora((4, 3, 2), 2, 2, torch.float64, device, (3,))
    leaves = [a.A, a.B, a.scaling, b.A, b.B, b.scaling, s.A, s.B]
    for leaf in leaves:
        leaf.requires_grad_()
    c = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True, device=device)
    w = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64, requires_grad=True, device=device)
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)

    summed = lora_func.add(lora_func.scale(lora_func.add(a, b), c), lora_func.weighted_sum(s, w))
    loss = (g * lora_func.delta(summed).reshape(4, 6)).sum()
    got = torch.autograd.grad(loss, [*leaves, c, w])

    # Written out, independently, in float64 on the same device (the gradient needs the same leaves).
    ref = c * (a.scaling * a.B @ a.A + b.scaling * b.B @ b.A)
    ref = ref + (w[:, None, None] * s.scaling[:, None, None] * (s.B @ s.A)).sum(0)
    want = torch.autograd.grad((g * ref).sum(), [*leaves, c, w])
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
        assert bool(y.abs().sum() > 0)  # each leaf has a nonzero gradient to compare


def test_func_grad_through_add_of_adapter_trees(device):
    tree = {"w": _lora((3, 4), 2, 0, torch.float64, device)}
    other = {"w": _lora((3, 4), 1, 1, torch.float64, device)}

    def loss(t):
        return lora_func.delta(lora_func.add(t, other)["w"]).square().sum()

    grads = torch.func.grad(loss)(tree)
    assert grads["w"].A.device == tree["w"].A.device
    total = _ref(tree["w"])[0] + _ref(other["w"])[0]  # d loss / d delta = 2 * total (on the CPU)
    s, A, B = (t.cpu() for t in (tree["w"].scaling, tree["w"].A, tree["w"].B))
    torch.testing.assert_close(grads["w"].B.cpu(), 2 * s * total @ A.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["w"].A.cpu(), 2 * s * B.T @ total, rtol=1e-12, atol=1e-12)


# --- errors -----------------------------------------------------------------------------------


def test_errors_name_the_function_and_argument(device):
    a = _lora((3, 4), 2, 0, torch.float32, device)
    stack = _lora((3, 4), 2, 1, torch.float32, device, (3,))
    with pytest.raises(TypeError, match=r"scale\(lora, c\): c must be a real number"):
        lora_func.scale(a, "2")
    with pytest.raises(TypeError, match=r"scale\(lora, c\): c must be a real number"):
        lora_func.scale(a, True)
    with pytest.raises(ValueError, match=r"scale\(lora, c\): c of shape \(2,\) does not broadcast"):
        lora_func.scale(stack, torch.ones(2, device=device))
    with pytest.raises(ValueError, match=r"scale\(lora, c\): c of shape \(3,\) does not broadcast"):
        lora_func.scale(a, torch.ones(3, device=device))  # would grow a single adapter into a stack
    with pytest.raises(TypeError, match=r"scale\(lora, c\): lora must be a lora_func.LoRA .* got a Tensor at \['x'\]"):
        lora_func.scale({"x": torch.ones(2, device=device)}, 2.0)

    with pytest.raises(ValueError, match=r"add\(a, b\): a was made for a weight of shape \(3, 4\) but b for shape"):
        lora_func.add(a, _lora((4, 3), 2, 0, torch.float32, device))
    with pytest.raises(ValueError, match=r"add\(a, b\): a and b must have the same structure"):
        lora_func.add({"x": a}, {"y": a})
    with pytest.raises(ValueError, match=r"add\(a, b\): a has leading \(stack\) dimensions \(3,\) and b \(2,\)"):
        lora_func.add(stack, _lora((3, 4), 2, 1, torch.float32, device, (2,)))
    with pytest.raises(TypeError, match=r"add\(a, b\): b must be a lora_func.LoRA"):
        lora_func.add(a, 1.0)

    with pytest.raises(ValueError, match=r"truncate\(lora, r\): r must be a positive int, got 0"):
        lora_func.truncate(a, 0)
    with pytest.raises(ValueError, match=r"truncate\(lora, r\): r must be a positive int, got -1"):
        lora_func.truncate(a, -1)
    with pytest.raises(TypeError, match=r"truncate\(lora, r\): r must be a positive int"):
        lora_func.truncate(a, 1.5)
    with pytest.raises(TypeError, match=r"truncate\(lora, r\): lora must be a lora_func.LoRA"):
        lora_func.truncate([a, "b"], 1)

    with pytest.raises(ValueError, match=r"weighted_sum\(stacked, weights\): stacked must have a leading K axis"):
        lora_func.weighted_sum(a, [1.0])
    with pytest.raises(ValueError, match=r"weighted_sum\(stacked, weights\): weights must hold one value .* \(3,\)"):
        lora_func.weighted_sum(stack, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"weighted_sum\(stacked, weights\): weights must hold one value"):
        lora_func.weighted_sum(stack, torch.ones(3, 1, device=device))
    with pytest.raises(TypeError, match=r"weighted_sum\(stacked, weights\): weights must be a sequence of numbers"):
        lora_func.weighted_sum(stack, [1.0, "2", 3.0])
    with pytest.raises(TypeError, match=r"weighted_sum\(stacked, weights\): weights must be a sequence of numbers"):
        lora_func.weighted_sum(stack, 1.0)
    with pytest.raises(TypeError, match=r"weighted_sum\(stacked, weights\): weights must be real"):
        lora_func.weighted_sum(stack, torch.ones(3, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"weighted_sum\(stacked, weights\) with rank: r must be a positive int"):
        lora_func.weighted_sum(stack, [1.0, 2.0, 3.0], rank=0)

    with pytest.raises(ValueError, match=r"mean\(stacked\): stacked must have a leading K axis"):
        lora_func.mean({"w": a})
    with pytest.raises(TypeError, match=r"mean\(stacked\) with rank: r must be a positive int"):
        lora_func.mean(stack, rank=2.0)
