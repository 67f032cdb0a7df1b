"""Arithmetic on adapters that stays low-rank: :func:`scale`, :func:`add`, :func:`truncate`,
:func:`weighted_sum` and :func:`mean`.

Every function is pure (it returns new adapters and writes into nothing it was given) and
never builds the ``out × in`` weight update: :func:`add` and :func:`weighted_sum`
concatenate ranks, :func:`truncate` works on a QR factorisation of each factor and the SVD
of a small core. Each one accepts a single :class:`~lora_func.LoRA` or any pytree (dict,
list, ...) of them and maps over its adapters; :func:`add` takes two trees of the same
structure.

What each promises is stated in terms of :func:`~lora_func.delta`:

==============================  =====================================================
``delta(scale(a, c))``          ``c * delta(a)``
``delta(add(a, b))``            ``delta(a) + delta(b)``
``delta(weighted_sum(s, w))``   ``sum_k w[k] * delta(s)[k]``
``delta(mean(s))``              ``delta(s).mean(0)``
``delta(truncate(a, r))``       the best rank-``r`` approximation of ``delta(a)``
==============================  =====================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from ._math import check_rank
from ._tree import LoRA, is_lora

__all__ = ["add", "mean", "scale", "truncate", "weighted_sum"]


# --- mapping over adapter trees --------------------------------------------------------------


def _flatten(tree: Any, where: str, arg: str) -> tuple[list[tuple[str, LoRA]], Any]:
    """The adapters of ``tree`` with readable paths, and the tree's structure above them."""
    pairs, spec = torch_pytree.tree_flatten_with_path(tree, is_leaf=is_lora)
    out = []
    for path, node in pairs:
        name = torch_pytree.keystr(path)
        if not isinstance(node, LoRA):
            at = f" at {name}" if name else ""
            raise TypeError(
                f"{where}: {arg} must be a lora_func.LoRA or a pytree of them, got a {type(node).__name__}{at}"
            )
        if not all(isinstance(t, torch.Tensor) for t in (node.A, node.B, node.scaling)):
            raise TypeError(f"{where}: {arg} has an adapter{_at(name)} whose leaves are not all tensors")
        out.append((name, node))
    return out, spec


def _map(fn: Callable[..., LoRA], where: str, names: Sequence[str], *trees: Any) -> Any:
    """``fn(path, node, other_node, ...)`` for every adapter of the trees, which must match."""
    flat0, spec0 = _flatten(trees[0], where, names[0])
    columns = [flat0]
    for name, tree in zip(names[1:], trees[1:], strict=True):
        flat, spec = _flatten(tree, where, name)
        if spec != spec0:
            raise ValueError(
                f"{where}: {names[0]} and {name} must have the same structure, got adapters "
                f"{[p or '<root>' for p, _ in flat0]} and {[p or '<root>' for p, _ in flat]}"
            )
        columns.append(flat)
    results = [fn(row[0][0], *(node for _, node in row)) for row in zip(*columns, strict=True)]
    return torch_pytree.tree_unflatten(results, spec0)


def _at(path: str) -> str:
    return f" (adapter {path})" if path else ""


def _moved(t: torch.Tensor, device: torch.device, where: str, arg: str) -> torch.Tensor:
    """``t`` on ``device``, or a ``ValueError`` naming ``arg`` if it cannot go there (e.g. from "meta")."""
    try:
        return t.to(device)
    except (RuntimeError, NotImplementedError) as err:
        msg = f"{where}: {arg} on {t.device} cannot be moved to the adapters' device {device} ({err})"
        raise ValueError(msg) from None


def _lift(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with ``n`` trailing singleton dimensions, to broadcast against factors."""
    return t.reshape(*t.shape, *([1] * n))


def _scaling_like(lead: Sequence[int], *nodes: LoRA) -> torch.Tensor:
    """A scaling of 1 with the given leading shape, in the promoted dtype of the nodes' scalings."""
    dtype = nodes[0].scaling.dtype
    for node in nodes[1:]:
        dtype = torch.promote_types(dtype, node.scaling.dtype)
    return torch.ones(tuple(lead), dtype=dtype, device=nodes[0].A.device)


# --- scale ------------------------------------------------------------------------------------


def scale(lora: Any, c: torch.Tensor | float) -> Any:
    """Multiply every adapter's update by ``c``: ``delta(scale(a, c)) == c * delta(a)``.

    Only ``scaling`` changes (it becomes ``scaling * c``); ``A`` and ``B`` are shared
    with the input, not copied. Gradients flow to ``c`` when it is a tensor that
    requires them.

    Args:
        lora: a :class:`~lora_func.LoRA` or a pytree of them.
        c: a real number, or a real tensor that broadcasts to each adapter's
            ``scaling`` without growing it: a 0-d tensor, or one value per stacked adapter
            (shape ``(K,)`` for a stack of ``K``).

    Returns:
        A tree of the same structure whose adapters have ``scaling * c``.

    Raises:
        TypeError: if ``lora`` holds something other than adapters, or ``c`` is not a
            real number or tensor.
        ValueError: if ``c`` does not broadcast to an adapter's ``scaling`` shape, is a
            non-finite number (a tensor's values are not read: that would cost a device
            sync and fail under ``torch.func`` transforms), or cannot be moved to the
            adapters' device.

    Example:
        >>> import torch, lora_func
        >>> a = lora_func.LoRA(torch.ones(1, 3), torch.ones(2, 1), 0.5, (2, 3))
        >>> lora_func.scale(a, 4.0).scaling
        tensor(2.)
        >>> lora_func.delta(lora_func.scale({"w": a}, -1.0)["w"])
        tensor([[-0.5000, -0.5000, -0.5000],
                [-0.5000, -0.5000, -0.5000]])
    """
    where = "scale(lora, c)"
    if isinstance(c, torch.Tensor):
        if c.dtype == torch.bool or c.is_complex():
            raise TypeError(f"{where}: c must be a real number or a real tensor, got a {c.dtype} tensor")
    elif isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(f"{where}: c must be a real number or a real tensor, got {type(c).__name__}")
    elif not math.isfinite(c):
        raise ValueError(f"{where}: c must be a finite number, got {c}")

    def one(path: str, node: LoRA) -> LoRA:
        factor = c
        if isinstance(factor, torch.Tensor):
            try:
                grown = torch.broadcast_shapes(node.scaling.shape, factor.shape)
            except RuntimeError:
                grown = None
            if grown != node.scaling.shape:
                raise ValueError(
                    f"{where}: c of shape {tuple(factor.shape)} does not broadcast to the scaling of shape "
                    f"{tuple(node.scaling.shape)}{_at(path)}; pass a number, a 0-d tensor or one value per "
                    "stacked adapter"
                )
            factor = _moved(factor, node.scaling.device, where, "c")
        return _new(node.A, node.B, node.scaling * factor, node.shape)

    return _map(one, where, ["lora"], lora)


# --- add --------------------------------------------------------------------------------------


def add(a: Any, b: Any) -> Any:
    """The exact sum of two adapters: ``delta(add(a, b)) == delta(a) + delta(b)``.

    The ranks are concatenated (the result has rank ``a.r + b.r``) and each adapter's
    ``scaling`` is folded into its ``B``, so the result has ``scaling`` 1 (``alpha``
    equal to its rank), whatever the scalings of ``a`` and ``b`` were. Use
    :func:`truncate` to bring the rank back down.

    The adapters may differ in rank, scaling and dtype (the result's factors take the
    promoted dtype). "Exact" is in exact arithmetic: in floating point, ``scaling · B`` is
    rounded once to the factors' dtype (about 1e-3 relative for bfloat16, 1e-7 for float32).
    Stacked adapters work too: the leading dimensions of ``a`` and ``b``
    broadcast, so a single adapter can be added to each adapter of a stack.

    Args:
        a: a :class:`~lora_func.LoRA` or a pytree of them.
        b: a pytree of the same structure, with adapters for the same weight shapes.

    Returns:
        A tree of the same structure holding the sums.

    Raises:
        TypeError: if ``a`` or ``b`` holds something other than adapters.
        ValueError: if the trees differ in structure, two adapters were made for different
            weight shapes or live on different devices, or their leading (stack)
            dimensions do not broadcast.

    Example:
        >>> import torch, lora_func
        >>> a = lora_func.LoRA(torch.ones(1, 3), torch.ones(2, 1), 0.5, (2, 3))
        >>> b = lora_func.LoRA(torch.ones(2, 3), torch.ones(2, 2), 2.0, (2, 3))
        >>> s = lora_func.add(a, b)
        >>> s.r, float(s.scaling)
        (3, 1.0)
        >>> lora_func.delta(s)
        tensor([[4.5000, 4.5000, 4.5000],
                [4.5000, 4.5000, 4.5000]])
    """
    where = "add(a, b)"

    def one(path: str, x: LoRA, y: LoRA) -> LoRA:
        if x.A.device != y.A.device:
            raise ValueError(f"{where}: a is on {x.A.device} but b on {y.A.device}{_at(path)}; move one of them")
        if x.shape != y.shape:
            raise ValueError(
                f"{where}: a was made for a weight of shape {x.shape} but b for shape {y.shape}{_at(path)}; "
                "only adapters of the same weight can be added"
            )
        try:
            lead = torch.broadcast_shapes(x.batch_shape, y.batch_shape)
        except RuntimeError:
            raise ValueError(
                f"{where}: a has leading (stack) dimensions {x.batch_shape} and b {y.batch_shape}{_at(path)}, "
                "which do not broadcast"
            ) from None
        a_dtype = torch.promote_types(x.A.dtype, y.A.dtype)
        b_dtype = torch.promote_types(x.B.dtype, y.B.dtype)
        A = torch.cat(
            [
                x.A.to(a_dtype).expand(*lead, *x.A.shape[-2:]),
                y.A.to(a_dtype).expand(*lead, *y.A.shape[-2:]),
            ],
            dim=-2,
        )
        B = torch.cat(
            [
                (x.B.to(b_dtype) * _lift(x.scaling, 2)).to(b_dtype).expand(*lead, *x.B.shape[-2:]),
                (y.B.to(b_dtype) * _lift(y.scaling, 2)).to(b_dtype).expand(*lead, *y.B.shape[-2:]),
            ],
            dim=-1,
        )
        return _new(A, B, _scaling_like(lead, x, y), x.shape)

    return _map(one, where, ["a", "b"], a, b)


# --- truncate ---------------------------------------------------------------------------------


def truncate(lora: Any, r: int) -> Any:
    """The best rank-``r`` approximation of every adapter's update (Eckart–Young).

    ``delta(truncate(a, r))`` is, of all matrices of rank at most ``r``, one closest to
    ``delta(a)`` (viewed as ``out × in_flat``) in the Frobenius and spectral norms: the
    error is ``sqrt(sum of the dropped singular values squared)``. The full update is never
    formed: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), the update is
    ``scaling · Q_B (R_B R_Aᵀ) Q_Aᵀ`` and only the small core ``R_B R_Aᵀ`` (at most
    ``a.r × a.r``) goes through an SVD ``U S Vᵀ``. The new factors split the singular
    values evenly, ``B' = Q_B U_r S_r^½`` and ``A' = S_r^½ V_rᵀ Q_Aᵀ``; ``scaling`` is kept.
    The cost is ``O((out + in_flat) · a.r² + a.r³)``.

    When ``r >= a.r`` the adapter is returned as it is (same factors; nothing to drop).
    Otherwise the result has rank exactly ``r``: if the update has fewer than ``r``
    nonzero directions (``r > min(out, in_flat)``), the extra rows and columns are zero.
    Stacked adapters are truncated one by one (the decompositions are batched). The
    factorisations run in at least float32 and the factors are returned in their input
    dtype. Gradients are those of ``torch.linalg.svd``: not defined where kept singular
    values coincide.

    Args:
        lora: a :class:`~lora_func.LoRA` or a pytree of them.
        r: the rank to keep, a positive int.

    Returns:
        A tree of the same structure whose adapters have rank ``min(r, a.r)``.

    Raises:
        TypeError: if ``lora`` holds something other than adapters, or ``r`` is not an int.
        ValueError: if ``r <= 0``.

    Example:
        >>> import torch, lora_func
        >>> A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> B = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
        >>> t = lora_func.truncate(lora_func.LoRA(A, B, 1.0, (2, 3)), 1)
        >>> t.r
        1
        >>> lora_func.delta(t).abs().round(decimals=4)  # the direction of the larger singular value
        tensor([[3., 0., 0.],
                [0., 0., 0.]])
    """
    where = "truncate(lora, r)"
    r = check_rank(r, where)
    return _map(lambda path, node: _truncate(node, r), where, ["lora"], lora)


def _truncate(node: LoRA, r: int) -> LoRA:
    if r >= node.r:
        return _new(node.A, node.B, node.scaling, node.shape)
    a_dtype, b_dtype = node.A.dtype, node.B.dtype
    work = torch.promote_types(torch.promote_types(a_dtype, b_dtype), torch.float32)
    q_b, r_b = torch.linalg.qr(node.B.to(work))  # (..., out, kb), (..., kb, R)
    q_a, r_a = torch.linalg.qr(node.A.to(work).mT)  # (..., in, ka), (..., ka, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)  # core (..., kb, ka)
    keep = min(r, s.shape[-1])
    root = s[..., :keep].sqrt()
    B = q_b @ (u[..., :, :keep] * root.unsqueeze(-2))
    A = (root.unsqueeze(-1) * vh[..., :keep, :]) @ q_a.mT
    if keep < r:  # the update has fewer than r directions: pad with zeros to rank r
        B = torch.cat([B, B.new_zeros(*B.shape[:-1], r - keep)], dim=-1)
        A = torch.cat([A, A.new_zeros(*A.shape[:-2], r - keep, A.shape[-1])], dim=-2)
    return _new(A.to(a_dtype), B.to(b_dtype), node.scaling, node.shape)


# --- weighted sums over a stack ---------------------------------------------------------------


def weighted_sum(stacked: Any, weights: torch.Tensor | Sequence[float], *, rank: int | None = None) -> Any:
    """Collapse the leading axis ``K`` of stacked adapters into one weighted sum of updates.

    ``delta(weighted_sum(s, w)) == sum_k w[k] * delta(s)[k]``, exactly: the ``K`` adapters'
    ranks are concatenated (rank ``K * r``) with ``w[k] * scaling[k]`` folded into each
    ``B``, and the result has ``scaling`` 1 (exact in exact arithmetic: ``w[k] * scaling[k] *
    B`` is rounded once to the factors' dtype). With ``rank=`` the sum is then cut to that
    rank by :func:`truncate` (the best approximation of that rank).

    Dimensions after the first are kept: a stack of shape ``(K, J)`` gives adapters
    stacked ``(J,)``.

    Args:
        stacked: a :class:`~lora_func.LoRA` with leading dimension ``K`` (see
            :func:`~lora_func.stack`), or a pytree of them, all with the same ``K``.
        weights: ``K`` real numbers, as a sequence or a 1-D tensor (which may require
            gradients).
        rank: if given, truncate each result to this rank.

    Returns:
        A tree of the same structure whose adapters have lost the leading ``K`` axis.

    Raises:
        TypeError: if ``stacked`` holds something other than adapters, ``weights`` is not a
            sequence of numbers or a real tensor, or ``rank`` is not an int.
        ValueError: if an adapter is not stacked, ``weights`` is not 1-D of length ``K``,
            holds a non-finite number (a sequence; a tensor's values are not read, which
            would cost a device sync and fail under ``torch.func`` transforms), or
            ``rank <= 0``.

    Example:
        >>> import torch, lora_func
        >>> s = lora_func.stack([lora_func.LoRA(torch.ones(1, 2), torch.ones(2, 1), a, (2, 2)) for a in (1.0, 3.0)])
        >>> w = lora_func.weighted_sum(s, [0.5, -1.0])
        >>> w.r, lora_func.delta(w)
        (2, tensor([[-2.5000, -2.5000],
                [-2.5000, -2.5000]]))
    """
    return _weighted_sum(stacked, weights, rank, "weighted_sum(stacked, weights)")


def mean(stacked: Any, *, rank: int | None = None) -> Any:
    """The mean over the leading axis ``K`` of stacked adapters: ``delta(mean(s)) == delta(s).mean(0)``.

    :func:`weighted_sum` with weights ``1 / K``: exact at rank ``K * r`` and ``scaling``
    1, or cut to ``rank`` by :func:`truncate`.

    Args:
        stacked: a :class:`~lora_func.LoRA` with leading dimension ``K``, or a pytree of
            them.
        rank: if given, truncate each result to this rank.

    Returns:
        A tree of the same structure whose adapters have lost the leading ``K`` axis.

    Raises:
        TypeError: if ``stacked`` holds something other than adapters or ``rank`` is not
            an int.
        ValueError: if an adapter is not stacked, or ``rank <= 0``.

    Example:
        >>> import torch, lora_func
        >>> s = lora_func.stack([lora_func.init((4, 3), r=2, init="gaussian") for _ in range(5)])
        >>> m = lora_func.mean({"w": s}, rank=2)["w"]
        >>> m.r, m.batch_shape
        (2, ())
    """
    where = "mean(stacked)"

    def one(path: str, node: LoRA) -> LoRA:
        _check_stacked(node, path, where)
        k = node.batch_shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=node.scaling.dtype, device=node.scaling.device)
        return _combine(node, weights, rank)

    if rank is not None:
        check_rank(rank, f"{where} with rank")
    return _map(one, where, ["stacked"], stacked)


def _weighted_sum(stacked: Any, weights: Any, rank: int | None, where: str) -> Any:
    if rank is not None:
        check_rank(rank, f"{where} with rank")
    if isinstance(weights, torch.Tensor):
        if weights.dtype == torch.bool or weights.is_complex():
            raise TypeError(f"{where}: weights must be real, got a {weights.dtype} tensor")
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise TypeError(f"{where}: weights must be a sequence of numbers or a 1-D tensor, got {weights!r}")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"{where}: weights must be finite numbers, got {list(weights)!r}")
    else:
        raise TypeError(f"{where}: weights must be a sequence of numbers or a 1-D tensor, got {type(weights).__name__}")

    def one(path: str, node: LoRA) -> LoRA:
        _check_stacked(node, path, where)
        k = node.batch_shape[0]
        w = weights if isinstance(weights, torch.Tensor) else torch.tensor(weights, dtype=node.scaling.dtype)
        if w.dim() != 1 or w.shape[0] != k:
            raise ValueError(
                f"{where}: weights must hold one value per stacked adapter, shape ({k},), "
                f"got shape {tuple(w.shape)}{_at(path)}"
            )
        return _combine(node, _moved(w, node.scaling.device, where, "weights"), rank)

    return _map(one, where, ["stacked"], stacked)


def _check_stacked(node: LoRA, path: str, where: str) -> None:
    if not node.batch_shape:
        raise ValueError(
            f"{where}: stacked must have a leading K axis (see lora_func.stack), but an adapter{_at(path)} has "
            "no leading dimensions"
        )


def _combine(node: LoRA, weights: torch.Tensor, rank: int | None) -> LoRA:
    """Sum over the leading axis with ``weights[k] * scaling[k]`` folded into ``B[k]``."""
    k, rest = node.batch_shape[0], node.batch_shape[1:]
    coef = _lift(weights, len(rest)) * node.scaling  # (K, *rest)
    # A: (K, *rest, R, in) -> (*rest, K, R, in) -> (*rest, K*R, in); B in the same (K, R) order.
    A = node.A.movedim(0, -3).reshape(*rest, k * node.r, node.A.shape[-1])
    B = (node.B * _lift(coef, 2)).to(node.B.dtype)
    B = B.movedim(0, -2).reshape(*rest, node.B.shape[-2], k * node.r)
    out = _new(A, B, _scaling_like(rest, node), node.shape)
    return out if rank is None else _truncate(out, rank)


def _new(A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, shape: tuple[int, ...]) -> LoRA:
    return LoRA(A, B, scaling, shape)
