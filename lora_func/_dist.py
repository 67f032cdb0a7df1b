"""Data-parallel training of adapter trees with ``torch.distributed``.

Each rank computes gradients of the same adapter tree on its own shard of the data;
:func:`all_reduce_grads` averages them, so that every rank applies the same update and
keeps identical adapters. No communication layer of our own: one ``all_reduce`` per
dtype and device, on a flat buffer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as torch_pytree

__all__ = ["all_reduce_grads"]


def all_reduce_grads(tree: Any, *, op: str = "mean", group: Any = None) -> Any:
    """The element-wise mean (or sum) of a gradient tree over all ranks of a process group.

    A new tree is returned; ``tree`` is not modified. Leaves are packed into one flat
    buffer per dtype and device, so a tree of any size costs one collective for each.

    Args:
        tree: a pytree of tensors, e.g. the result of ``torch.func.grad`` with respect to an
            adapter tree (stacked or not).
        op: ``"mean"`` (default: the gradient of the mean loss over all ranks' data, when
            every rank holds an equal share) or ``"sum"``.
        group: the ``torch.distributed`` process group (default: the world).

    Returns:
        A tree of the same structure with the reduced tensors.

    Raises:
        ValueError: if ``op`` is unknown, or ``torch.distributed`` is not initialised.
        TypeError: if a leaf is not a floating-point tensor.

    Example:
        Inside a process group (``torchrun``, or ``torch.distributed.init_process_group``)::

            grads = torch.func.vmap(torch.func.grad(loss))(stacked, x_shard, y_shard)
            grads = lora_func.all_reduce_grads(grads)  # identical on every rank
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"all_reduce_grads: op must be 'mean' or 'sum', got {op!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "all_reduce_grads: torch.distributed is not initialised; call torch.distributed.init_process_group first"
        )
    leaves, spec = torch_pytree.tree_flatten(tree)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"all_reduce_grads: leaves must be tensors, got {type(leaf).__name__}")
        if not leaf.is_floating_point():
            raise TypeError(f"all_reduce_grads: gradients must be floating-point tensors, got {leaf.dtype}")
    world = dist.get_world_size(group)
    out: list[torch.Tensor | None] = [None] * len(leaves)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_dtype.setdefault((leaf.dtype, leaf.device), []).append(i)
    for indices in by_dtype.values():
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in indices])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if op == "mean":
            flat = flat / world
        for i, piece in zip(indices, flat.split([leaves[i].numel() for i in indices]), strict=True):
            out[i] = piece.view_as(leaves[i])
    return torch_pytree.tree_unflatten(out, spec)
