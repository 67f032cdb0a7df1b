"""The adapter node: :class:`LoRA`, its pytree registrations, and stacking.

A :class:`LoRA` holds three tensor leaves (``A``, ``B``, ``scaling``) and one piece of
static metadata (``shape``, the base weight's shape). Only the tensors are leaves, so
``torch.func.grad``, ``torch.func.vmap`` and ``optree.tree_map`` accept any tree of
adapters as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree

__all__ = ["LoRA", "is_lora", "stack", "trainable", "unstack"]

#: The optree namespace under which :class:`LoRA` is registered.
NAMESPACE = "lora_func"


class LoRA:
    """A low-rank adapter for one weight: ``W_eff = W + scaling * (B @ A).view(shape)``.

    ``A`` has shape ``(..., r, in_flat)`` and ``B`` shape ``(..., out, r)``, where
    ``in_flat`` is the product of ``shape[1:]``; ``scaling`` (usually ``alpha / r``) is a
    tensor of shape ``(...)``. The leading ``...`` is empty for one adapter and ``(K,)``
    for a stack of ``K`` adapters made by :func:`stack`.

    ``shape`` is static metadata (a tuple of ints), never a leaf: flattening a
    :class:`LoRA` with torch's pytree or with optree (namespace ``"lora_func"``) yields
    exactly ``[A, B, scaling]``.

    Most code makes adapters with :func:`lora_func.init` or
    :func:`lora_func.init_adapters` rather than with this constructor.

    Args:
        A: the ``(..., r, in_flat)`` factor.
        B: the ``(..., out, r)`` factor.
        scaling: the factor the product ``B @ A`` is multiplied by; a Python number is
            turned into a tensor on ``A``'s device.
        shape: the shape of the base weight, ``(out, in, *kernel)``.

    Raises:
        TypeError: if ``A`` or ``B`` is not a floating-point tensor.
        ValueError: if the shapes of ``A``, ``B``, ``scaling`` and ``shape`` disagree, they
            are on different devices, or a number ``scaling`` is not finite.

    Example:
        >>> import torch, lora_func
        >>> lora = lora_func.LoRA(torch.ones(2, 3), torch.ones(4, 2), 0.5, (4, 3))
        >>> lora.r, lora.shape, float(lora.alpha)
        (2, (4, 3), 1.0)
        >>> len(torch.utils._pytree.tree_leaves(lora))
        3
    """

    __slots__ = ("A", "B", "scaling", "shape")

    A: torch.Tensor
    B: torch.Tensor
    scaling: torch.Tensor
    shape: tuple[int, ...]

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: torch.Tensor | float,
        shape: Iterable[int],
    ) -> None:
        for name, value in (("A", A), ("B", B)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"LoRA: {name} must be a torch.Tensor, got {type(value).__name__}")
        if isinstance(scaling, bool) or not isinstance(scaling, (torch.Tensor, int, float)):
            raise TypeError(f"LoRA: scaling must be a tensor or a number, got {type(scaling).__name__}")
        for name, value in (("A", A), ("B", B)):
            if not value.dtype.is_floating_point:
                raise TypeError(f"LoRA: {name} must have a floating-point dtype, got {value.dtype}")
        if A.device != B.device:
            raise ValueError(f"LoRA: A is on {A.device} but B is on {B.device}; put both on one device")
        if not isinstance(scaling, torch.Tensor):
            if not math.isfinite(scaling):
                raise ValueError(f"LoRA: scaling must be a finite number, got {scaling}")
            scaling = torch.tensor(float(scaling), dtype=_scaling_dtype(A.dtype), device=A.device)
        elif scaling.device != A.device:
            if not (scaling.dim() == 0 and scaling.device.type == "cpu"):
                raise ValueError(f"LoRA: scaling is on {scaling.device} but A and B are on {A.device}")
            scaling = scaling.to(A.device)  # a CPU scalar goes where the factors are (stack needs one device)
        shape = _as_shape(shape, "LoRA: shape")
        _check_factors(A, B, scaling, shape, "LoRA")
        _set(self, A, B, scaling, shape)

    @property
    def r(self) -> int:
        """The rank: ``A.shape[-2]``."""
        return int(self.A.shape[-2])

    @property
    def alpha(self) -> torch.Tensor:
        """``scaling * r``, the ``alpha`` of ``alpha / r``."""
        return self.scaling * self.r

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading dimensions: ``()`` for one adapter, ``(K,)`` for a stack of K."""
        return tuple(self.A.shape[:-2])

    def replace(self, **fields: Any) -> LoRA:
        """A new :class:`LoRA` with the given fields replaced (and checked).

        Example:
            >>> import torch, lora_func
            >>> lora = lora_func.init((4, 3), r=2, init="zeros")
            >>> lora.replace(scaling=torch.tensor(2.0)).scaling
            tensor(2.)
        """
        unknown = set(fields) - set(self.__slots__)
        if unknown:
            raise TypeError(f"LoRA.replace: unknown field(s) {sorted(unknown)}; fields are {list(self.__slots__)}")
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(fields)
        return LoRA(**values)

    def __repr__(self) -> str:
        def show(t: Any) -> str:
            if isinstance(t, torch.Tensor):
                return f"Tensor{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}"
            return repr(t)

        return f"LoRA(A={show(self.A)}, B={show(self.B)}, scaling={show(self.scaling)}, shape={self.shape})"


def _set(node: LoRA, A: Any, B: Any, scaling: Any, shape: tuple[int, ...]) -> None:
    object.__setattr__(node, "A", A)
    object.__setattr__(node, "B", B)
    object.__setattr__(node, "scaling", scaling)
    object.__setattr__(node, "shape", shape)


def _scaling_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32, so that alpha / r is not rounded to a low-precision format."""
    if not dtype.is_floating_point:
        return torch.get_default_dtype()
    return torch.promote_types(dtype, torch.float32)


def _as_shape(shape: Any, where: str) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{where} must be a sequence of ints, got {shape!r}") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"{where} must be a sequence of ints, got {shape!r}")
    if any(d <= 0 for d in dims):
        raise ValueError(f"{where} must have positive sizes, got {dims}")
    return tuple(int(d) for d in dims)


def _check_factors(A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    if len(shape) < 2:
        raise ValueError(f"{where}: weight shape {shape} has fewer than 2 dimensions; LoRA needs (out, in, ...)")
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(f"{where}: A and B must be at least 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    lead = A.shape[:-2]
    out, in_flat = shape[0], _prod(shape[1:])
    if B.shape[:-2] != lead or scaling.shape != lead:
        raise ValueError(
            f"{where}: leading dimensions differ: A {tuple(A.shape)}, B {tuple(B.shape)}, "
            f"scaling {tuple(scaling.shape)} (expected scaling of shape {tuple(lead)})"
        )
    r = A.shape[-2]
    if B.shape[-1] != r:
        raise ValueError(f"{where}: A {tuple(A.shape)} has rank {r} but B {tuple(B.shape)} has rank {B.shape[-1]}")
    if A.shape[-1] != in_flat or B.shape[-2] != out:
        raise ValueError(
            f"{where}: factors A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a weight of shape {shape} "
            f"(expected A (..., r, {in_flat}) and B (..., {out}, r))"
        )


def _prod(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


# --- pytree registrations -------------------------------------------------------------------
# Unflatten builds the node without __init__: vmap and tree_map put ints, None or other
# placeholders where the tensors were, and that must not be rejected.


def _flatten(node: LoRA) -> tuple[list[Any], tuple[int, ...]]:
    return [node.A, node.B, node.scaling], node.shape


def _unflatten(children: Iterable[Any], shape: tuple[int, ...]) -> LoRA:
    A, B, scaling = children
    node = object.__new__(LoRA)
    _set(node, A, B, scaling, shape)
    return node


def _flatten_with_keys(node: LoRA) -> tuple[list[tuple[Any, Any]], tuple[int, ...]]:
    keys = [torch_pytree.GetAttrKey(name) for name in ("A", "B", "scaling")]
    return list(zip(keys, [node.A, node.B, node.scaling], strict=True)), node.shape


torch_pytree.register_pytree_node(
    LoRA,
    _flatten,
    _unflatten,
    serialized_type_name="lora_func.LoRA",
    to_dumpable_context=list,
    from_dumpable_context=tuple,
    flatten_with_keys_fn=_flatten_with_keys,
)

optree.register_pytree_node(
    LoRA,  # type: ignore[arg-type]
    lambda node: ([node.A, node.B, node.scaling], node.shape, ("A", "B", "scaling")),  # type: ignore[attr-defined]
    lambda shape, children: _unflatten(children, shape),  # type: ignore[arg-type, return-value]
    namespace=NAMESPACE,
)


def is_lora(x: Any) -> bool:
    """Whether ``x`` is a :class:`LoRA` node.

    Example:
        >>> import lora_func
        >>> lora_func.is_lora(lora_func.init((4, 3), r=2)), lora_func.is_lora(3)
        (True, False)
    """
    return isinstance(x, LoRA)


def _loras(tree: Any) -> list[tuple[str, LoRA]]:
    """Every LoRA node in ``tree`` with a readable path to it, in flatten order."""
    pairs, _ = torch_pytree.tree_flatten_with_path(tree, is_leaf=is_lora)
    return [(torch_pytree.keystr(path) or "<root>", node) for path, node in pairs if isinstance(node, LoRA)]


def trainable(tree: Any) -> list[torch.Tensor]:
    """The trainable leaves of an adapter tree: ``A`` and ``B`` of every :class:`LoRA`.

    ``scaling`` is a leaf too (so that adapters with different ``alpha`` can be stacked),
    but it is a hyper-parameter, not a weight: give an optimizer ``trainable(tree)``
    rather than every leaf.

    Args:
        tree: any pytree (dict, list, ...) whose nodes include :class:`LoRA`.

    Returns:
        ``[A, B, A, B, ...]`` in flatten order (the tensors themselves, not copies).

    Example:
        >>> import torch, lora_func
        >>> adapters = {"0.weight": lora_func.init((4, 3), r=2)}
        >>> params = [p.requires_grad_() for p in lora_func.trainable(adapters)]
        >>> opt = torch.optim.SGD(params, lr=0.1)
        >>> [tuple(p.shape) for p in params]
        [(2, 3), (4, 2)]
    """
    out: list[torch.Tensor] = []
    for _, node in _loras(tree):
        out.extend((node.A, node.B))
    return out


def stack(trees: Sequence[Any]) -> Any:
    """Stack K adapter trees of one structure into one tree with a leading K axis.

    Every leaf of the result is ``torch.stack`` of the matching leaves, so
    ``torch.func.vmap(f)(stack(trees))`` runs ``f`` once per adapter. The trees may
    differ in ``scaling`` (an ``alpha`` sweep) but must have the same structure,
    weight shapes and ranks.

    Args:
        trees: a non-empty sequence of adapter trees (a :class:`LoRA`, or a dict, list
            or other pytree of them).

    Returns:
        One tree of the same structure whose leaves have a leading axis of size K.

    Raises:
        ValueError: if ``trees`` is empty, or the trees differ in structure, weight
            shape, rank or device.
        TypeError: if a leaf is not a tensor.

    Example:
        >>> import torch, lora_func
        >>> trees = [{"w": lora_func.init((4, 3), r=2, alpha=a)} for a in (1.0, 2.0)]
        >>> s = lora_func.stack(trees)
        >>> tuple(s["w"].A.shape), s["w"].scaling
        ((2, 2, 3), tensor([0.5000, 1.0000]))
    """
    if isinstance(trees, (torch.Tensor, LoRA, dict)) or not isinstance(trees, Sequence) or len(trees) == 0:
        raise ValueError("stack(trees): trees must be a non-empty list or tuple of adapter trees")
    flat = [torch_pytree.tree_flatten(t) for t in trees]
    leaves0, spec0 = flat[0]
    paths0 = [p for p, _ in _loras(trees[0])]
    for i, (leaves, spec) in enumerate(flat):
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"stack(trees): trees[{i}] has a leaf of type {type(leaf).__name__}; leaves must be tensors"
                )
            if leaf.device != leaves0[0].device:
                raise ValueError(
                    f"stack(trees): trees[{i}] has a leaf on {leaf.device} but trees[0] is on "
                    f"{leaves0[0].device}; move the adapters to one device first"
                )
        # Compare adapters at the same path first (a rank mismatch leaves the specs equal).
        for (path, a), (path_b, b) in zip(_loras(trees[0]), _loras(trees[i]), strict=False):
            if path == path_b and (a.shape != b.shape or a.r != b.r):
                raise ValueError(
                    f"stack(trees): trees[{i}]{path} has weight shape {b.shape} and rank {b.r}, "
                    f"but trees[0]{path} has weight shape {a.shape} and rank {a.r}; "
                    "stacked adapters must share shapes and ranks"
                )
        if spec != spec0:
            raise ValueError(
                f"stack(trees): trees[{i}] does not have the structure of trees[0] "
                f"(adapters {[p for p, _ in _loras(trees[i])]} vs {paths0})"
            )
        for j, (leaf, ref) in enumerate(zip(leaves, leaves0, strict=True)):
            if leaf.shape != ref.shape:
                raise ValueError(
                    f"stack(trees): leaf {j} of trees[{i}] has shape {tuple(leaf.shape)} but the same leaf of "
                    f"trees[0] has shape {tuple(ref.shape)}; stacked adapters must share shapes and ranks"
                )
    stacked = [torch.stack(column) for column in zip(*(leaves for leaves, _ in flat), strict=True)]
    return torch_pytree.tree_unflatten(stacked, spec0)


def unstack(tree: Any) -> list[Any]:
    """Split a stacked tree (leading K axis on every leaf) into K trees; undoes :func:`stack`.

    The leaves of the results are views of the leaves of ``tree`` (as with
    ``torch.unbind``); clone them to keep independent copies.

    Args:
        tree: an adapter tree whose leaves all have the same leading size K.

    Returns:
        A list of K trees of the same structure.

    Raises:
        ValueError: if the tree has no leaves, a leaf is 0-d, or the leading sizes differ.
        TypeError: if a leaf is not a tensor.

    Example:
        >>> import lora_func
        >>> s = lora_func.stack([lora_func.init((4, 3), r=2) for _ in range(3)])
        >>> [tuple(t.A.shape) for t in lora_func.unstack(s)]
        [(2, 3), (2, 3), (2, 3)]
    """
    leaves, spec = torch_pytree.tree_flatten(tree)
    if not leaves:
        raise ValueError("unstack(tree): tree has no leaves")
    sizes = set()
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"unstack(tree): leaves must be tensors, got {type(leaf).__name__}")
        if leaf.dim() == 0:
            raise ValueError("unstack(tree): a leaf is 0-d; tree is not stacked (see stack)")
        sizes.add(leaf.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"unstack(tree): leaves have different leading sizes {sorted(sizes)}")
    (k,) = sizes
    columns = [leaf.unbind(0) for leaf in leaves]
    return [torch_pytree.tree_unflatten([col[i] for col in columns], spec) for i in range(k)]
