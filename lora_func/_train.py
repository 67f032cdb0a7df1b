"""Helpers for training K stacked adapters at once with stock ``torch.optim`` optimizers.

The recipe (see the "Many adapters" guide): make K adapter trees with their own seeds and
alphas (:func:`init_stack`), compute gradients for all of them with one
``torch.func.vmap(torch.func.grad_and_value(loss))``, clip them per adapter
(:func:`clip_per_adapter`), hand them to one optimizer over ``trainable(stacked)``
(:func:`assign_grads`), and take the adapter you want out with :func:`pick`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import nn

from ._targets import init_adapters
from ._tree import LoRA, _loras, stack, trainable

__all__ = ["adapter_norms", "assign_grads", "clip_per_adapter", "init_stack", "pick"]


def init_stack(
    module_or_params: nn.Module | Mapping[str, torch.Tensor],
    targets: str | Iterable[str],
    *,
    seeds: Sequence[int],
    alphas: Sequence[float] | float = 8.0,
    r: int = 8,
    init: str = "kaimingA_zeroB",
    dtype: torch.dtype | None = None,
) -> dict[str, LoRA]:
    """K adapter trees, adapter ``k`` drawn from its own generator seeded ``seeds[k]``, stacked.

    Adapter ``k`` equals ``init_adapters(module_or_params, targets, r=r, alpha=alphas[k],
    init=init, generator=torch.Generator(device).manual_seed(seeds[k]))``: the same whether
    it is trained alone or in the stack.

    Args:
        module_or_params: as for :func:`~lora_func.init_adapters`.
        targets: glob pattern(s) over parameter names.
        seeds: one seed per adapter; ``K = len(seeds)``.
        alphas: one alpha per adapter, or one for all.
        r: the rank of every adapter.
        init: see :func:`~lora_func.init`.
        dtype: the adapters' dtype (default: each parameter's).

    Returns:
        A dict of stacked :class:`~lora_func.LoRA` nodes with a leading axis of size K.

    Raises:
        ValueError: if ``seeds`` is empty, or ``alphas`` has a length other than K (and
            for everything :func:`~lora_func.init_adapters` rejects).
        TypeError: if a seed is not an int.

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> s = lora_func.init_stack(model, "*.weight", seeds=[0, 1], alphas=[1.0, 8.0], r=2)
        >>> tuple(s["0.weight"].A.shape), s["0.weight"].scaling.tolist()
        ((2, 2, 4), [0.5, 4.0])
    """
    where = "init_stack"
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"{where}: seeds must be a non-empty list of ints, got {seeds!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise TypeError(f"{where}: seeds must be ints, got {list(seeds)!r}")
    k = len(seeds)
    alpha_list = [alphas] * k if isinstance(alphas, (int, float)) else list(alphas)
    if len(alpha_list) != k:
        raise ValueError(f"{where}: alphas has {len(alpha_list)} values but there are {k} seeds")
    device = _device_of(module_or_params)
    kwargs: dict[str, Any] = {"r": r, "init": init}
    if dtype is not None:
        kwargs["dtype"] = dtype
    trees = [
        init_adapters(
            module_or_params,
            targets,
            alpha=alpha,
            generator=torch.Generator(device).manual_seed(seed),
            **kwargs,
        )
        for seed, alpha in zip(seeds, alpha_list, strict=True)
    ]
    return stack(trees)  # type: ignore[no-any-return]


def _device_of(module_or_params: Any) -> torch.device:
    tensors = (
        list(module_or_params.parameters())
        if isinstance(module_or_params, nn.Module)
        else list(module_or_params.values())
        if isinstance(module_or_params, Mapping)
        else []
    )
    return tensors[0].device if tensors else torch.device("cpu")


def _check_grad_tree(tree: Any, where: str) -> list[torch.Tensor]:
    leaves = trainable(tree)
    if not leaves:
        raise ValueError(f"{where}: the tree holds no lora_func.LoRA")
    if any(g.dim() < 3 for g in leaves):
        raise ValueError(f"{where}: the adapters are not stacked (A and B need a leading K axis)")
    k = {g.shape[0] for g in leaves}
    if len(k) != 1:
        raise ValueError(f"{where}: leaves have different leading sizes {sorted(k)}")
    return leaves


def adapter_norms(grads: Any) -> torch.Tensor:
    """The L2 norm of each adapter's gradient over all its ``A`` and ``B`` leaves.

    The per-adapter analogue of the total norm ``torch.nn.utils.clip_grad_norm_`` computes.

    Args:
        grads: a stacked gradient tree (leading K axis), e.g. from ``vmap(grad(loss))``.

    Returns:
        A tensor of shape ``(K,)``.

    Raises:
        ValueError: if the tree holds no :class:`~lora_func.LoRA` or is not stacked.
    """
    return _norms(_check_grad_tree(grads, "adapter_norms(grads)"))


def _norms(leaves: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in leaves]).sum(0).sqrt()


def clip_per_adapter(grads: Any, max_norm: float, *, eps: float = 1e-6) -> tuple[Any, torch.Tensor]:
    """Clip each adapter's gradient to a norm of at most ``max_norm``, independently.

    ``torch.nn.utils.clip_grad_norm_`` over stacked leaves would compute one norm for all
    K adapters and let one adapter's large gradient shrink every other adapter's step;
    this clips adapter ``k`` exactly as ``clip_grad_norm_`` would clip it alone (factor
    ``min(1, max_norm / (norm_k + eps))``). ``scaling`` gradients are left as they are.
    A pure function: ``grads`` is not modified.

    Args:
        grads: a stacked gradient tree (leading K axis).
        max_norm: the largest norm allowed, a positive number.
        eps: added to the norm before dividing, as in ``clip_grad_norm_``.

    Returns:
        ``(clipped, norms)``: the clipped tree, and each adapter's norm before clipping.

    Raises:
        ValueError: if ``max_norm`` is not a positive finite number, or the tree is not a
            stacked adapter tree.

    Example:
        >>> import torch, lora_func
        >>> g = lora_func.LoRA(torch.ones(2, 1, 3), torch.ones(2, 4, 1), torch.ones(2), (4, 3))
        >>> g = g.replace(A=g.A * torch.tensor([1.0, 10.0]).view(2, 1, 1))
        >>> clipped, norms = lora_func.clip_per_adapter(g, max_norm=5.0)
        >>> [round(x, 3) for x in norms.tolist()], [round(x, 3) for x in lora_func.adapter_norms(clipped).tolist()]
        ([2.646, 17.436], [2.646, 5.0])
    """
    where = "clip_per_adapter(grads, max_norm)"
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0 < max_norm < float("inf"):
        raise ValueError(f"{where}: max_norm must be a positive finite number, got {max_norm!r}")
    norms = _norms(_check_grad_tree(grads, where))
    factor = (max_norm / (norms + eps)).clamp(max=1.0)

    def clip(node: Any) -> Any:
        if not isinstance(node, LoRA):
            return node
        f = factor.to(node.A.dtype)
        return node.replace(A=node.A * f.view(-1, 1, 1), B=node.B * f.view(-1, 1, 1))

    return torch_pytree.tree_map(clip, grads, is_leaf=lambda x: isinstance(x, LoRA)), norms


def assign_grads(tree: Any, grads: Any) -> None:
    """Set ``.grad`` of every trainable leaf of ``tree`` (``A`` and ``B``) from ``grads``.

    The bridge between ``torch.func.grad`` (which returns gradients as a tree) and a stock
    ``torch.optim`` optimizer over ``lora_func.trainable(tree)``: call it, then
    ``opt.step()``.

    Args:
        tree: the adapter tree the optimizer holds (its ``A``/``B`` leaves).
        grads: a gradient tree of the same structure and shapes.

    Raises:
        ValueError: if the two trees hold different adapters or shapes.

    Example:
        >>> import torch, lora_func
        >>> adapters = {"w": lora_func.init((4, 3), r=2)}
        >>> opt = torch.optim.SGD(lora_func.trainable(adapters), lr=0.1)
        >>> grads = {"w": adapters["w"].replace(A=torch.ones(2, 3), B=torch.ones(4, 2))}
        >>> lora_func.assign_grads(adapters, grads)
        >>> adapters["w"].A.grad.sum().item()
        6.0
    """
    where = "assign_grads(tree, grads)"
    names = [p for p, _ in _loras(tree)]
    if names != [p for p, _ in _loras(grads)]:
        raise ValueError(f"{where}: grads holds adapters {[p for p, _ in _loras(grads)]}, tree holds {names}")
    params, gs = trainable(tree), trainable(grads)
    for p, g in zip(params, gs, strict=True):
        if p.shape != g.shape:
            raise ValueError(f"{where}: a gradient has shape {tuple(g.shape)} but its leaf has {tuple(p.shape)}")
        if p.device != g.device:
            raise ValueError(f"{where}: a gradient is on {g.device} but its leaf is on {p.device}")
    for p, g in zip(params, gs, strict=True):
        p.grad = g.detach().to(p.dtype)


def pick(stacked: Any, k: int) -> Any:
    """Adapter ``k`` of a stacked tree, as an independent copy (cloned leaves).

    Args:
        stacked: a tree whose leaves share a leading axis of size K.
        k: which adapter, ``-K <= k < K``.

    Returns:
        A tree of the same structure without the leading axis.

    Raises:
        ValueError: if ``k`` is out of range or the tree is not stacked.
        TypeError: if ``k`` is not an int.

    Example:
        >>> import torch, lora_func
        >>> s = lora_func.stack([lora_func.init((4, 3), r=2, alpha=a) for a in (1.0, 2.0)])
        >>> float(lora_func.pick(s, 1).alpha)
        2.0
    """
    where = "pick(stacked, k)"
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{where}: k must be an int, got {k!r}")
    leaves, spec = torch_pytree.tree_flatten(stacked)
    sizes = {leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.dim() > 0}
    if len(sizes) != 1 or len(leaves) == 0 or any(not isinstance(x, torch.Tensor) or x.dim() == 0 for x in leaves):
        raise ValueError(f"{where}: stacked must be a tree whose tensor leaves share a leading axis")
    (size,) = sizes
    if not -size <= k < size:
        raise ValueError(f"{where}: k={k} is out of range for a stack of {size} adapters")
    return torch_pytree.tree_unflatten([leaf[k].clone() for leaf in leaves], spec)
