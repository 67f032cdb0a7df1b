"""Tests of the :class:`LoRA` pytree node: registrations, transforms, stack/unstack, trainable.

Tests that compute with the leaves (transforms, stacking, training, the constructor's checks)
run on each available device (the ``device`` fixture). Adapters are made on the CPU from a
seeded CPU generator and moved, so their values are the same on every device; float64
references are computed on the device the results are on. Tests of the registrations alone
(flatten, unflatten, tree specs, which tensors are leaves) run once: they move references to
the leaves around and never read their values, so where the leaves live cannot matter.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as torch_pytree
from hypothesis import given
from hypothesis import strategies as st

import lora_func
from lora_func import LoRA

from .conftest import to_device

NS = "lora_func"


@st.composite
def weight_shapes(draw: st.DrawFn, max_dims: int = 5) -> tuple[int, ...]:
    n = draw(st.integers(2, max_dims))
    return tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))


ranks = st.integers(1, 4)
alphas = st.floats(-32.0, 32.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
seeds = st.integers(0, 2**31 - 1)


def _lora(shape, r, alpha, seed, dtype=torch.float64, device="cpu") -> LoRA:
    # gaussian, rescaled: both factors non-zero, so every leaf matters to the results. Drawn on
    # the CPU (a CPU generator) and moved: the same values on every device.
    lora = lora_func.init(shape, r, alpha, "gaussian", generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return to_device(lora.replace(A=lora.A * 1e4, B=lora.B * 1e4), device)


def _randn(*shape: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """float64 values drawn on the CPU from ``gen`` and moved: the same on every device."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)


@st.composite
def adapter_trees(draw: st.DrawFn):
    """A dict of 1-3 adapters, with a nested list for variety, and its number of adapters."""
    n = draw(st.integers(1, 3))
    loras = [_lora(draw(weight_shapes()), draw(ranks), draw(alphas), draw(seeds)) for _ in range(n)]
    tree = {f"layer{i}.weight": lora for i, lora in enumerate(loras[:-1])}
    tree["nested"] = [loras[-1]]
    return tree, n


# --- registrations ----------------------------------------------------------------------------


@pytest.mark.device_independent("flattening and unflattening move references to the leaves; no tensor op runs")
@given(adapter_trees())
def test_leaves_are_tensors_only_in_torch_pytree(tree_n):
    tree, n = tree_n
    leaves = torch_pytree.tree_leaves(tree)
    assert len(leaves) == 3 * n
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    loras = [x for x in torch_pytree.tree_leaves(tree, is_leaf=lora_func.is_lora)]
    assert all(isinstance(x, LoRA) for x in loras)
    expected = [t for lora in loras for t in (lora.A, lora.B, lora.scaling)]
    assert all(a is b for a, b in zip(leaves, expected, strict=True))


@pytest.mark.device_independent("flattening and unflattening move references to the leaves; no tensor op runs")
@given(adapter_trees())
def test_leaves_are_tensors_only_in_optree(tree_n):
    tree, n = tree_n
    leaves = optree.tree_leaves(tree, namespace=NS)
    assert len(leaves) == 3 * n
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    # The same leaves, in the same order, as torch's pytree.
    assert all(a is b for a, b in zip(leaves, torch_pytree.tree_leaves(tree), strict=True))


@pytest.mark.device_independent("the shape is static metadata of the tree spec; no tensor op runs")
def test_shape_is_static_metadata():
    a = _lora((4, 3), 2, 1.0, 0)
    b = _lora((4, 3, 1, 1), 2, 1.0, 0)  # leaves of the same shapes as a's, another weight shape
    c = LoRA(a.A, a.B, a.scaling, (4, 3, 1))  # same leaves as a, other static shape
    _, spec_a = torch_pytree.tree_flatten(a)
    _, spec_c = torch_pytree.tree_flatten(c)
    assert spec_a != spec_c  # the shape lives in the spec ...
    assert len(torch_pytree.tree_leaves(c)) == 3  # ... not in the leaves
    assert optree.tree_structure(a, namespace=NS) != optree.tree_structure(c, namespace=NS)
    assert optree.tree_structure(a, namespace=NS) != optree.tree_structure(b, namespace=NS)
    # No int of the shape shows up as a leaf, in either registry.
    for leaves in (torch_pytree.tree_leaves(c), optree.tree_leaves(c, namespace=NS)):
        assert not any(isinstance(x, int) for x in leaves)


@pytest.mark.device_independent("flattening and unflattening move references to the leaves; no tensor op runs")
@given(adapter_trees())
def test_flatten_unflatten_round_trip(tree_n):
    tree, _ = tree_n
    leaves, spec = torch_pytree.tree_flatten(tree)
    back = torch_pytree.tree_unflatten(leaves, spec)
    leaves2, spec2 = optree.tree_flatten(tree, namespace=NS)
    back2 = optree.tree_unflatten(spec2, leaves2)
    for rebuilt in (back, back2):
        assert rebuilt.keys() == tree.keys()
        pairs = zip(
            torch_pytree.tree_leaves(rebuilt, is_leaf=lora_func.is_lora),
            torch_pytree.tree_leaves(tree, is_leaf=lora_func.is_lora),
            strict=True,
        )
        for new, old in pairs:
            assert type(new) is LoRA
            assert new.shape == old.shape
            assert new.A is old.A and new.B is old.B and new.scaling is old.scaling


@pytest.mark.device_independent("a tree spec holds no tensors; its serialization cannot see a device")
def test_treespec_serialization_round_trip():
    tree = {"w": _lora((4, 3, 2), 2, 1.0, 0)}
    spec = torch_pytree.tree_structure(tree)
    assert torch_pytree.treespec_loads(torch_pytree.treespec_dumps(spec)) == spec


@pytest.mark.device_independent("flattening and unflattening move references to the leaves; no tensor op runs")
@given(adapter_trees())
def test_tree_map_to_placeholders_does_not_validate(tree_n):
    tree, _ = tree_n
    for mapped in (torch_pytree.tree_map(lambda _: 0, tree), optree.tree_map(lambda _: 0, tree, namespace=NS)):
        for node, old in zip(
            torch_pytree.tree_leaves(mapped, is_leaf=lora_func.is_lora),
            torch_pytree.tree_leaves(tree, is_leaf=lora_func.is_lora),
            strict=True,
        ):
            assert type(node) is LoRA
            assert (node.A, node.B, node.scaling) == (0, 0, 0)
            assert node.shape == old.shape
    # None (vmap's "not batched") too.
    nones = torch_pytree.tree_map(lambda _: None, tree)
    assert torch_pytree.tree_structure(nones) == torch_pytree.tree_structure(tree)


@given(adapter_trees())
def test_tree_map_preserves_node_and_values(device, tree_n):
    tree = to_device(tree_n[0], device)
    doubled = optree.tree_map(lambda t: t * 2, tree, namespace=NS)
    for a, b in zip(optree.tree_leaves(doubled, namespace=NS), optree.tree_leaves(tree, namespace=NS), strict=True):
        assert a.device == b.device
        assert torch.equal(a, b * 2)  # the same multiplication on the same device: exact anywhere


# --- torch.func -------------------------------------------------------------------------------


@given(weight_shapes(), ranks, alphas, seeds)
def test_grad_wrt_dict_of_lora_gives_dict_of_lora(device, shape, r, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    W = _randn(*shape, gen=gen, device=device)
    G = _randn(*shape, gen=gen, device=device)
    adapters = {"w": _lora(shape, r, alpha, seed, device=device)}

    def loss(ad):
        return (lora_func.merge(W, ad["w"]) * G).sum()

    g = torch.func.grad(loss)(adapters)
    assert g.keys() == {"w"}
    assert type(g["w"]) is LoRA and g["w"].shape == shape
    # Reference gradients of sum(G * (W + s B A)), written out in float64 on the same device.
    lora = adapters["w"]
    G_flat = G.reshape(shape[0], -1)
    s = alpha / r
    torch.testing.assert_close(g["w"].A, s * lora.B.T @ G_flat, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g["w"].B, s * G_flat @ lora.A.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g["w"].scaling, (G_flat * (lora.B @ lora.A)).sum(), rtol=1e-10, atol=1e-10)


@given(weight_shapes(max_dims=4), ranks, st.lists(alphas, min_size=1, max_size=4, unique=True), seeds)
def test_vmap_over_stacked_adapters_equals_loop(device, shape, r, alpha_list, seed):
    gen = torch.Generator().manual_seed(seed)
    W = _randn(*shape, gen=gen, device=device)
    x = _randn(3, math.prod(shape[1:]), gen=gen, device=device)
    loras = [_lora(shape, r, a, seed + i, device=device) for i, a in enumerate(alpha_list)]
    stacked = lora_func.stack([{"w": lo} for lo in loras])

    def f(ad):
        return F.linear(x, lora_func.merge(W, ad["w"]).reshape(shape[0], -1)).square().sum(), lora_func.delta(ad["w"])

    out, d = torch.func.vmap(f)(stacked)
    in_dims = (torch_pytree.tree_map(lambda _: 0, stacked),)
    out2, _ = torch.func.vmap(f, in_dims=in_dims)(stacked)
    loop = [f(t) for t in lora_func.unstack(stacked)]
    # Batched and unbatched matmuls may sum in another order: float64 round-off only.
    torch.testing.assert_close(out, torch.stack([o for o, _ in loop]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, torch.stack([dd for _, dd in loop]), rtol=1e-12, atol=1e-12)


def test_vmap_grad_over_stacked_adapters_equals_loop(device):
    shape, r = (5, 4), 2
    gen = torch.Generator().manual_seed(0)
    W = _randn(*shape, gen=gen, device=device)
    x = _randn(7, 4, gen=gen, device=device)
    y = _randn(7, 5, gen=gen, device=device)
    stacked = lora_func.stack([{"w": _lora(shape, r, a, i, device=device)} for i, a in enumerate((1.0, 4.0, 16.0))])

    def loss(ad):
        return (F.linear(x, lora_func.merge(W, ad["w"])) - y).square().mean()

    g = torch.func.vmap(torch.func.grad(loss))(stacked)
    for k, tree in enumerate(lora_func.unstack(stacked)):
        gk = torch.func.grad(loss)(tree)
        # Batched and unbatched matmuls may sum in another order: float64 round-off only.
        torch.testing.assert_close(g["w"].A[k], gk["w"].A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g["w"].B[k], gk["w"].B, rtol=1e-12, atol=1e-12)


# --- stack and unstack ------------------------------------------------------------------------


@given(weight_shapes(), ranks, st.lists(alphas, min_size=1, max_size=4), seeds)
def test_stack_unstack_round_trip(device, shape, r, alpha_list, seed):
    trees = [
        {"a": _lora(shape, r, a, seed + i, device=device), "b": [_lora((3, 2), 1, a, seed - i, device=device)]}
        for i, a in enumerate(alpha_list)
    ]
    stacked = lora_func.stack(trees)
    k = len(trees)
    assert stacked["a"].batch_shape == (k,) and stacked["a"].shape == shape
    assert stacked["a"].scaling.shape == (k,)
    assert all(t.device == trees[0]["a"].A.device for t in torch_pytree.tree_leaves(stacked))
    alpha = stacked["a"].alpha.cpu()
    torch.testing.assert_close(alpha, torch.tensor(alpha_list, dtype=torch.float64), rtol=1e-12, atol=0)
    back = lora_func.unstack(stacked)
    assert len(back) == k
    # stack and unstack copy and view values, no arithmetic: exact on every device.
    for new, old in zip(back, trees, strict=True):
        assert torch_pytree.tree_structure(new) == torch_pytree.tree_structure(old)
        for a, b in zip(torch_pytree.tree_leaves(new), torch_pytree.tree_leaves(old), strict=True):
            assert torch.equal(a, b)
    restacked = lora_func.stack(back)
    for a, b in zip(torch_pytree.tree_leaves(restacked), torch_pytree.tree_leaves(stacked), strict=True):
        assert torch.equal(a, b)


def test_stack_errors(device):
    a = _lora((4, 3), 2, 1.0, 0, device=device)
    with pytest.raises(ValueError, match=r"stack\(trees\): trees must be a non-empty list"):
        lora_func.stack([])
    with pytest.raises(ValueError, match=r"stack\(trees\): trees must be a non-empty list"):
        lora_func.stack(a)
    with pytest.raises(ValueError, match=r"stack\(trees\): trees must be a non-empty list"):
        lora_func.stack({"w": a})
    with pytest.raises(
        ValueError, match=r"trees\[1\]\['w'\] has weight shape \(4, 3\) and rank 3, but trees\[0\]\['w'\] .* rank 2"
    ):
        lora_func.stack([{"w": a}, {"w": _lora((4, 3), 3, 1.0, 0, device=device)}])
    with pytest.raises(ValueError, match=r"trees\[1\]\['w'\] has weight shape \(3, 4\) and rank 2"):
        lora_func.stack([{"w": a}, {"w": _lora((3, 4), 2, 1.0, 0, device=device)}])
    with pytest.raises(ValueError, match=r"trees\[1\] does not have the structure of trees\[0\]"):
        lora_func.stack([{"w": a}, {"v": a}])
    with pytest.raises(ValueError, match=r"trees\[1\] does not have the structure of trees\[0\]"):
        lora_func.stack([{"w": a}, {"w": a, "v": a}])
    with pytest.raises(TypeError, match=r"trees\[1\] has a leaf of type int; leaves must be tensors"):
        lora_func.stack([{"w": a}, {"w": 0}])


def test_stack_rejects_mismatched_leaf_shapes_with_equal_specs(device):
    # Same structure and static shapes, but one tree was already stacked: leaf shapes differ.
    a = _lora((4, 3), 2, 1.0, 0, device=device)
    twice = lora_func.stack([a, a])
    with pytest.raises(ValueError, match=r"leaf 0 of trees\[1\] has shape \(2, 2, 3\) but .* \(2, 3\)"):
        lora_func.stack([a, twice])


def test_unstack_errors(device):
    a = _lora((4, 3), 2, 1.0, 0, device=device)
    with pytest.raises(ValueError, match=r"unstack\(tree\): a leaf is 0-d; tree is not stacked"):
        lora_func.unstack(a)
    with pytest.raises(ValueError, match=r"unstack\(tree\): tree has no leaves"):
        lora_func.unstack({})
    with pytest.raises(ValueError, match=r"unstack\(tree\): leaves have different leading sizes \[2, 3\]"):
        lora_func.unstack({"x": torch.zeros(2, device=device), "y": torch.zeros(3, device=device)})
    with pytest.raises(TypeError, match=r"unstack\(tree\): leaves must be tensors, got int"):
        lora_func.unstack({"x": 3})


# --- trainable --------------------------------------------------------------------------------


@pytest.mark.device_independent("trainable returns references to the leaves; no tensor op runs")
@given(adapter_trees())
def test_trainable_is_A_and_B_only(tree_n):
    tree, n = tree_n
    params = lora_func.trainable(tree)
    loras = torch_pytree.tree_leaves(tree, is_leaf=lora_func.is_lora)
    assert len(params) == 2 * n
    expected = [t for lora in loras for t in (lora.A, lora.B)]
    assert all(p is e for p, e in zip(params, expected, strict=True))
    assert not any(p is lora.scaling for p in params for lora in loras)


def test_stock_optimizer_trains_A_and_B_never_scaling(device):
    gen = torch.Generator().manual_seed(0)
    W = _randn(6, 5, gen=gen, device=device)
    target = _randn(6, 5, gen=gen, device=device)
    x = _randn(16, 5, gen=gen, device=device)
    # kaimingA_zeroB: B = 0, so A only gets gradient once B has moved. Drawn on the CPU and
    # moved, so every device starts from the same point (and the loss threshold was seen met).
    lora = lora_func.init((6, 5), r=2, alpha=4.0, dtype=torch.float64, generator=gen)
    adapters = {"w": to_device(lora, device)}
    scaling_before = adapters["w"].scaling.clone()
    A0, B0 = adapters["w"].A.clone(), adapters["w"].B.clone()
    W0 = W.clone()
    params = [p.requires_grad_() for p in lora_func.trainable(adapters)]
    opt = torch.optim.Adam(params, lr=0.05)

    def loss_fn():
        return (F.linear(x, lora_func.merge(W, adapters["w"])) - F.linear(x, target)).square().mean()

    first = loss_fn().item()
    for _ in range(20):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.9 * first
    assert not torch.equal(adapters["w"].A, A0) and not torch.equal(adapters["w"].B, B0)
    assert torch.equal(adapters["w"].scaling, scaling_before)
    assert not adapters["w"].scaling.requires_grad and adapters["w"].scaling.grad is None
    assert torch.equal(W, W0)


# --- the node itself --------------------------------------------------------------------------


def test_lora_constructor_errors_and_replace(device):
    A, B = torch.zeros(2, 3, device=device), torch.zeros(4, 2, device=device)
    with pytest.raises(TypeError, match=r"LoRA: A must be a torch.Tensor, got list"):
        LoRA([[0.0]], B, 1.0, (4, 3))
    with pytest.raises(TypeError, match=r"LoRA: scaling must be a tensor or a number, got bool"):
        LoRA(A, B, True, (4, 3))
    with pytest.raises(ValueError, match=r"LoRA: A \(2, 3\) has rank 2 but B \(4, 3\) has rank 3"):
        LoRA(A, torch.zeros(4, 3, device=device), 1.0, (4, 3))
    with pytest.raises(ValueError, match=r"do not fit a weight of shape \(4, 3, 2\)"):
        LoRA(A, B, 1.0, (4, 3, 2))
    with pytest.raises(ValueError, match=r"LoRA: leading dimensions differ"):
        LoRA(A, B, torch.ones(2, device=device), (4, 3))
    with pytest.raises(ValueError, match=r"LoRA: weight shape \(12,\) has fewer than 2 dimensions"):
        LoRA(A, B, 1.0, (12,))
    lora = LoRA(A, B, 0.5, (4, 3))
    assert lora.scaling.dtype == torch.float32 and float(lora.alpha) == 1.0
    assert lora.scaling.device == A.device  # a number scaling is made where the factors are
    with pytest.raises(TypeError, match=r"LoRA.replace: unknown field\(s\) \['C'\]"):
        lora.replace(C=A)
    with pytest.raises(ValueError, match=r"LoRA: A \(3, 3\) has rank 3"):
        lora.replace(A=torch.zeros(3, 3, device=device))
    assert "shape=(4, 3)" in repr(lora)
