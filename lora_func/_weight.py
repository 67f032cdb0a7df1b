"""``LoRAWeight``: an effective weight ``W + s·BA`` that is never built when it need not be.

A :class:`LoRAWeight` is a ``torch.Tensor`` subclass that stands in for a weight in
``torch.func.functional_call`` (see :func:`lora_func.lora_params`). It carries the frozen
``base`` weight and the adapter's ``A``, ``B`` and ``scaling``, and computes:

* ``F.linear(x, w, b)`` as ``F.linear(x, W, b) + F.linear(s·F.linear(x, A), B)``;
* ``F.conv1d/2d/3d(x, w, b, stride, padding, dilation, groups)`` as the base convolution
  plus a convolution of ``x`` with ``A`` seen as an ``(r, in/groups, *kernel)`` kernel (same
  stride, padding and dilation; repeated once per group, with ``groups`` groups), followed by
  a ``1×…×1`` convolution with ``B`` seen as ``(out, r, 1, …)`` (same ``groups``), scaled.
  This is exact for any ``groups``: the delta ``B @ A`` of a grouped weight applies the same
  ``A`` rows to every group's input channels;
* ``F.embedding(idx, w, padding_idx)`` as ``F.embedding(idx, W) + s·F.embedding(idx, B) @ A``
  (positions holding ``padding_idx`` send no gradient to the adapter, as with the merged
  weight). With ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` the weight is merged: the
  factored form cannot reproduce their gradients.

Every other operation on a :class:`LoRAWeight` (``w.sum()``, ``w @ x``, ``w.T``,
``F.conv_transpose2d``, …) sees the materialized weight ``merge(base, lora)``: correct, with
gradients to ``A`` and ``B``, but it pays for building ``W + s·BA``. Metadata (``shape``,
``dtype``, ``device``, ``size()``, ``dim()``, …) is the base weight's and costs nothing.

The route per call is set by the ``mode`` the weight was made with (its ``route``
attribute): ``"factored"``, ``"materialize"`` (merge, then the ordinary op), or ``"auto"``,
which compares, at call time, the extra work of the factored form (``tokens·r·(in+out)``;
for a convolution, output positions times ``r·(in·k + out)``) with that of merging
(``out·in·k·r``) and takes the cheaper. The routes agree up to floating-point rounding.

Transforms: works under ``torch.func.grad``, ``torch.func.vmap`` (build the
:class:`LoRAWeight` inside the vmapped function, from the batched ``A``/``B``; this is what
:func:`lora_func.lora_params` does when called there) and plain autograd. The class is a
traceable wrapper subclass (``__tensor_flatten__`` / ``__tensor_unflatten__``);
``__torch_dispatch__`` merges for any op that reaches the dispatcher with torch functions
disabled (such an op records no gradient for ``A`` and ``B``).

``torch.compile`` (checked on torch 2.13, CPU, backends eager, aot_eager and inductor):

* compiles with ``fullgraph=True`` and matches eager: a loss that calls
  :func:`lora_func.lora_params` and ``functional_call`` (backward outside, through AOT
  autograd); ``torch.func.grad`` of it; ``vmap(grad(...))`` over stacked adapters; a whole
  functional step (grad and the parameter update); convolutions, embeddings, and ops that
  merge (``w.sum()``). Dynamo inlines ``__torch_function__``, so the graph holds the
  factored ops. ``"auto"`` decides at trace time from the traced shapes.
* breaks: ``loss.backward()`` or ``optimizer.step()`` inside the compiled function (a
  Dynamo limit for any model, not this class); ``LoRAWeight(base, lora)`` with a
  :class:`~lora_func.LoRA` argument inside compiled code (Dynamo cannot put the node in the
  graph: use :func:`lora_func.lora_params` or ``LoRAWeight(base, A=..., B=...,
  scaling=...)``); a :class:`LoRAWeight` whose factors require gradients passed *into* a
  compiled function as an argument (an error when Dynamo makes its fake copy: build it
  inside). Passed in for inference (nothing in it requires grad), it compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

from ._math import WEIGHT_DIMS, _update
from ._tree import LoRA, _prod

__all__ = ["MODES", "LoRAWeight"]

#: The routes a :class:`LoRAWeight` can take.
MODES = ("auto", "factored", "materialize")

_DisableTF = torch._C.DisableTorchFunctionSubclass


class LoRAWeight(torch.Tensor):
    """The effective weight ``merge(base, lora)``, kept in factored form.

    Pass it where the weight goes (``torch.func.functional_call(model, {"0.weight": w, ...},
    x)``, or directly to ``F.linear`` / ``F.conv*d`` / ``F.embedding``). Those three compute
    the factored form; any other operation sees the materialized weight (see the module
    docs for the routes and their costs).

    Args:
        base: the frozen weight, of shape ``lora.shape``.
        lora: the adapter (unbatched; inside ``vmap`` the batched leaves look unbatched).
        mode: ``"auto"`` (pick the cheaper route per call), ``"factored"`` or
            ``"materialize"``.
        A: with ``B`` and ``scaling``, the adapter's tensors, in place of ``lora`` (the
            form to use inside compiled code).
        B: the ``(out, r)`` factor, with ``A``.
        scaling: the 0-d scaling tensor, with ``A``.

    Raises:
        TypeError: if ``base`` is not a floating-point tensor, ``lora`` is not a
            :class:`~lora_func.LoRA` with tensor leaves, or neither (or both of) ``lora``
            and ``A``/``B``/``scaling`` are given.
        ValueError: if ``mode`` is unknown, the shapes do not fit, ``base`` and the
            adapter are on different devices, or ``lora`` has batch dimensions (stacked
            adapters go through ``vmap``).

    Example:
        >>> import torch, torch.nn.functional as F, lora_func
        >>> W = torch.randn(4, 3)
        >>> lora = lora_func.init((4, 3), r=2, init="gaussian")
        >>> w = lora_func.LoRAWeight(W, lora)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(F.linear(x, w), F.linear(x, lora_func.merge(W, lora)))
        True
        >>> w.shape, torch.allclose(w.sum(), lora_func.merge(W, lora).sum())
        (torch.Size([4, 3]), True)
    """

    base: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scaling: torch.Tensor
    route: str

    __slots__ = ("A", "B", "base", "route", "scaling")

    @staticmethod
    def __new__(
        cls,
        base: torch.Tensor,
        lora: LoRA | None = None,
        mode: str = "auto",
        *,
        A: torch.Tensor | None = None,
        B: torch.Tensor | None = None,
        scaling: torch.Tensor | None = None,
    ) -> LoRAWeight:
        where = "LoRAWeight(base, lora)"
        if not isinstance(base, torch.Tensor):
            raise TypeError(f"{where}: base must be a torch.Tensor, got {type(base).__name__}")
        if lora is not None:
            if not isinstance(lora, LoRA):
                raise TypeError(f"{where}: lora must be a lora_func.LoRA, got {type(lora).__name__}")
            if A is not None or B is not None or scaling is not None:
                raise TypeError(f"{where}: give either lora or A, B and scaling, not both")
            A, B, scaling = lora.A, lora.B, lora.scaling
        elif A is None or B is None or scaling is None:
            raise TypeError(f"{where}: lora is missing; give a lora_func.LoRA (or all of A, B and scaling)")
        check_mode(mode, where)
        if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
            raise TypeError(f"{where}: A and B must be tensors, got {type(A).__name__} and {type(B).__name__}")
        if A.dim() != 2:
            raise ValueError(
                f"{where}: lora has batch dimensions {tuple(A.shape[:-2])}; build one LoRAWeight per "
                "adapter, or call it inside torch.func.vmap over the stacked adapters"
            )
        check_fit(base, A, B, scaling, where)
        return _make(base, A, B, scaling, mode)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Everything happens in __new__; torch.Tensor.__init__ takes no arguments.
        pass

    @property
    def lora(self) -> LoRA:
        """The adapter, as a :class:`~lora_func.LoRA` (its tensors, not copies)."""
        return LoRA(self.A, self.B, self.scaling, tuple(self.base.shape))

    def materialize(self) -> torch.Tensor:
        """The plain tensor ``merge(base, lora)``."""
        return _update(self.base, self.A, self.B, self.scaling)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"LoRAWeight(shape={tuple(self.base.shape)}, r={self.A.shape[-2]}, "
            f"dtype={str(self.base.dtype).removeprefix('torch.')}, mode={self.route!r})"
        )

    # --- traceable wrapper subclass protocol ---------------------------------------------

    def __tensor_flatten__(self) -> tuple[list[str], str]:
        return ["base", "A", "B", "scaling"], self.route

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], mode: str, outer_size: Any, outer_stride: Any) -> Any:
        return _make(inner["base"], inner["A"], inner["B"], inner["scaling"], mode)

    def _stable_hash_for_caching(self) -> str:
        # What AOT autograd's cache keys a subclass input on: its flatten metadata.
        return f"lora_func.LoRAWeight:{self.route}"

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        handler = _HANDLERS.get(func)
        with _DisableTF():
            if handler is not None:
                out = handler(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            elif func == _REQUIRES_GRAD:  # whether gradients flow through it (to A, B or base)
                w = args[0]
                return w.base.requires_grad or w.A.requires_grad or w.B.requires_grad or _scaling_grad(w.scaling)
            elif func in _METADATA or (func.__name__ == "__get__" and func not in _VALUE_GETTERS):
                return func(*args, **kwargs)
            _refuse_writes(func, args, kwargs)
            args, kwargs = tree_map_only(LoRAWeight, LoRAWeight.materialize, (args, kwargs))
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        # Reached only below torch functions (tracing, or code that disabled them): merge.
        args, kwargs = tree_map_only(LoRAWeight, LoRAWeight.materialize, (args, kwargs or {}))
        return func(*args, **kwargs)


def _make(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, mode: str) -> LoRAWeight:
    self = torch.Tensor._make_wrapper_subclass(
        LoRAWeight,
        base.shape,
        strides=base.stride(),
        dtype=base.dtype,
        device=base.device,
        requires_grad=False,
    )
    self.base = base
    self.A = A
    self.B = B
    self.scaling = scaling
    self.route = mode
    return self  # type: ignore[no-any-return]


def _refuse_writes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A ``ValueError`` for an in-place op on a LoRAWeight or one writing into it (``out=``).

    Any other op sees a merged copy; a write would go into that copy and be lost silently.
    """
    name = getattr(func, "__name__", "")
    writes = (
        name.endswith("_") and not name.startswith("__") and name not in ("requires_grad_", "retain_grad")
    ) or name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__")
    if (writes and args and isinstance(args[0], LoRAWeight)) or isinstance(kwargs.get("out"), LoRAWeight):
        raise ValueError(
            f"LoRAWeight: {name or func} would write into an implicit weight; change its base, A or B instead"
        )


def _scaling_grad(scaling: Any) -> bool:
    return isinstance(scaling, torch.Tensor) and scaling.requires_grad


def check_fit(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, where: str) -> None:
    """A ``ValueError`` naming ``where`` unless ``A``, ``B`` and ``scaling`` fit ``base``."""
    if not isinstance(scaling, torch.Tensor) or scaling.dim() != 0:
        raise ValueError(f"{where}: scaling must be a 0-d tensor, got {scaling!r}")
    if base.dim() not in WEIGHT_DIMS:
        raise ValueError(f"{where}: base has shape {tuple(base.shape)}; LoRA needs a 2- to 5-D weight")
    if not base.dtype.is_floating_point:
        raise TypeError(f"{where}: base must have a floating-point dtype, got {base.dtype}")
    if base.device != A.device or B.device != A.device:
        raise ValueError(f"{where}: base is on {base.device}, A on {A.device} and B on {B.device}; put them together")
    if not (A.dtype.is_floating_point and B.dtype.is_floating_point):
        raise TypeError(f"{where}: A and B must have floating-point dtypes, got {A.dtype} and {B.dtype}")
    out, in_flat = base.shape[0], _prod(base.shape[1:])
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"{where}: A {tuple(A.shape)} and B {tuple(B.shape)} are not (r, in) and (out, r) factors")
    if A.shape[1] != in_flat or B.shape[0] != out:
        raise ValueError(
            f"{where}: base has shape {tuple(base.shape)} but the factors A {tuple(A.shape)} and "
            f"B {tuple(B.shape)} were made for another shape (expected A (r, {in_flat}) and B ({out}, r))"
        )


def check_mode(mode: Any, where: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ``ValueError`` naming ``where``."""
    if mode not in MODES:
        raise ValueError(f"{where}: unknown mode {mode!r}; expected one of {list(MODES)}")
    return str(mode)


def _factors(w: LoRAWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B in the base weight's dtype (a no-op when they already are)."""
    A, B, dt = w.A, w.B, w.base.dtype
    if A.dtype != dt:
        A = A.to(dt)
    if B.dtype != dt:
        B = B.to(dt)
    return A, B


# --- the factored routes ---------------------------------------------------------------------
# Each takes the arguments of the function it replaces and returns NotImplemented when the
# LoRAWeight is not where the weight goes (the caller then merges every LoRAWeight).


def _linear(input: Any, weight: Any, bias: Any = None) -> Any:
    if type(weight) is not LoRAWeight or isinstance(input, LoRAWeight) or isinstance(bias, LoRAWeight):
        return NotImplemented
    A, B = weight.A, weight.B
    if weight.route != "factored":
        in_f, out_f = A.shape[-1], B.shape[-2]
        tokens = input.numel() // in_f
        if weight.route == "materialize" or tokens * (in_f + out_f) > out_f * in_f:
            return F.linear(input, weight.materialize(), bias)
    A, B = _factors(weight)
    if input.dim() != 2:  # fold leading dimensions so that the sum below is one addmm
        out2 = _linear(input.reshape(-1, input.shape[-1]), weight, bias)
        return out2.view(*input.shape[:-1], out2.shape[-1])
    # base output + (s·x Aᵀ) Bᵀ in one addmm: no separate add kernel or output-sized buffer
    return torch.addmm(F.linear(input, weight.base, bias), F.linear(input, A) * weight.scaling, B.t())


def _out_pixels(x_shape: Any, k: tuple[int, ...], stride: Any, padding: Any, dilation: Any) -> int:
    """The number of output positions (batch times pixels) of a convolution."""
    n = len(k)
    spatial = tuple(x_shape[-n:])
    batch = x_shape[0] if len(x_shape) == n + 2 else 1

    def per_dim(v: Any) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n

    total = batch
    if isinstance(padding, str):  # "same" keeps the size (stride 1), "valid" pads nothing
        if padding == "same":
            for s in spatial:
                total *= s
            return int(total)
        padding = 0
    for size, kk, s, p, d in zip(spatial, k, per_dim(stride), per_dim(padding), per_dim(dilation), strict=True):
        total *= max((size + 2 * p - d * (kk - 1) - 1) // s + 1, 0)
    return int(total)


def _conv_route(conv: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    def route(
        input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: Any = 1
    ) -> Any:
        if type(weight) is not LoRAWeight or isinstance(input, LoRAWeight) or isinstance(bias, LoRAWeight):
            return NotImplemented
        shape = weight.base.shape
        k = tuple(shape[2:])
        if weight.route != "factored":
            ksize = 1
            for kk in k:
                ksize *= kk
            r = weight.A.shape[-2]
            out_c, in_g = shape[0], shape[1]
            pixels = _out_pixels(input.shape, k, stride, padding, dilation)
            factored_cost = pixels * r * (in_g * groups * ksize + out_c)
            if weight.route == "materialize" or factored_cost > out_c * in_g * ksize * r:
                return conv(input, weight.materialize(), bias, stride, padding, dilation, groups)
        A, B = _factors(weight)
        r = A.shape[-2]
        kernel_a = A.reshape(r, *shape[1:])
        if groups != 1:
            kernel_a = kernel_a.repeat(groups, *([1] * (len(shape) - 1)))
        kernel_b = B.reshape(shape[0], r, *([1] * len(k)))
        out = conv(input, weight.base, bias, stride, padding, dilation, groups)
        h = conv(input, kernel_a, None, stride, padding, dilation, groups) * weight.scaling
        return out + conv(h, kernel_b, None, 1, 0, 1, groups)

    return route


def _embedding(
    input: Any,
    weight: Any,
    padding_idx: Any = None,
    max_norm: Any = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Any:
    if type(weight) is not LoRAWeight or isinstance(input, LoRAWeight):
        return NotImplemented
    if max_norm is not None or scale_grad_by_freq or sparse:
        return NotImplemented  # their gradients need the merged table
    num = weight.base.shape[0]
    if weight.route == "materialize" or (weight.route == "auto" and input.numel() > num):
        return NotImplemented
    A, B = _factors(weight)
    out = F.embedding(input, weight.base, padding_idx)
    delta = F.embedding(input, B) @ (A * weight.scaling)
    if padding_idx is not None:
        pad = padding_idx + num if padding_idx < 0 else padding_idx
        delta = torch.where((input == pad).unsqueeze(-1), delta.detach(), delta)
    return out + delta


_HANDLERS: dict[Any, Callable[..., Any]] = {
    F.linear: _linear,
    F.conv1d: _conv_route(F.conv1d),
    F.conv2d: _conv_route(F.conv2d),
    F.conv3d: _conv_route(F.conv3d),
    F.embedding: _embedding,
}

# Functions that only read the wrapper's metadata: answered by the wrapper, nothing merged.
# Property getters (``shape``, ``dtype``, ``is_quantized``, ...) are metadata too, except
# those in _VALUE_GETTERS, which return the weight's values.
_METADATA: frozenset[Any] = frozenset(
    getattr(torch.Tensor, name)
    for name in (
        "size",
        "dim",
        "numel",
        "stride",
        "storage_offset",
        "is_floating_point",
        "is_complex",
        "is_contiguous",
        "element_size",
        "get_device",
        "_is_view",
        "__len__",
        "untyped_storage",
        "data_ptr",
        "is_shared",
        "is_pinned",
        "is_conj",
        "is_neg",
        "is_inference",
    )
)
_REQUIRES_GRAD = torch.Tensor.requires_grad.__get__  # type: ignore[attr-defined]
_VALUE_GETTERS: frozenset[Any] = frozenset(
    getattr(torch.Tensor, name).__get__ for name in ("T", "mT", "H", "mH", "real", "imag", "data")
)
