"""The one LoRA formula, and how adapters are made.

``merge(W, lora) = W + scaling * (B @ A).view(W.shape)``: :func:`_update` is the single
implementation; :func:`delta`, :func:`merge` and the stateful :class:`~lora_func.LoRAParam`
all call it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._tree import LoRA, _as_shape, _prod, _scaling_dtype

__all__ = ["INITS", "check_alpha", "check_rank", "delta", "init", "merge"]

#: The initialisation strategies of :func:`init`, as documented by the original ``LoRAParam``.
INITS = ("zeros", "kaimingA_zeroB", "gaussian")

#: Weight ranks LoRA supports: Linear/Embedding (2), Conv1d and (out, in, n) weights (3),
#: Conv2d (4), Conv3d (5).
WEIGHT_DIMS = (2, 3, 4, 5)


def check_weight_shape(shape: Any, where: str) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, or a ``ValueError`` naming it if LoRA cannot adapt it."""
    dims = _as_shape(shape, f"{where}: weight shape")
    if len(dims) not in WEIGHT_DIMS:
        raise ValueError(
            f"{where}: unsupported weight shape {dims}; expected 2-D (out, in), 3-D (out, in, k), "
            "4-D (out, in, kH, kW) or 5-D (out, in, kD, kH, kW)"
        )
    return dims


def check_rank(r: Any, where: str) -> int:
    """``r`` if it is a positive int, else a clear error."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{where}: r must be a positive int, got {r!r}")
    if r <= 0:
        raise ValueError(f"{where}: r must be a positive int, got {r}")
    return r


def check_alpha(alpha: Any, where: str) -> float:
    """``alpha`` as a float if it is a finite real number, else a clear error."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{where}: alpha must be a finite number, got {alpha!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"{where}: alpha must be a finite number, got {alpha}")
    return float(alpha)


def check_device(device: Any, where: str) -> torch.device:
    """``device`` as a ``torch.device`` if it names one that exists here, else a ``ValueError``."""
    try:
        torch.empty(0, device=device)  # an accelerator that is not there fails here, not later
        return torch.device(device)
    except (AssertionError, RuntimeError, TypeError):
        raise ValueError(f"{where}: device {device!r} is not a valid, available torch device") from None


def check_generator(generator: Any, device: torch.device, where: str, what: str) -> None:
    """A ``ValueError`` if ``generator`` cannot draw on ``device`` (a generator of another device type)."""
    if isinstance(generator, torch.Generator) and device.type not in (generator.device.type, "meta"):
        raise ValueError(
            f"{where}: generator is on {generator.device} but {what} on {device}; "
            f"draw from a torch.Generator({device.type!r})"
        )


def check_init(init: Any, where: str) -> str:
    if init not in INITS:
        raise ValueError(f"{where}: unknown init {init!r}; expected one of {list(INITS)}")
    return init


def fill_factors(A: torch.Tensor, B: torch.Tensor, init: str, generator: torch.Generator | None) -> None:
    """Initialise ``A`` and ``B`` in place, drawing in the documented order.

    ``"kaimingA_zeroB"`` draws A (kaiming-uniform, ``a=sqrt(5)``, fan-in ``in_flat``);
    ``"gaussian"`` draws A then B (normal, std 1e-4); ``"zeros"`` draws nothing.
    """
    with torch.no_grad():
        if init == "zeros":
            A.zero_()
            B.zero_()
        elif init == "kaimingA_zeroB":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            B.zero_()
        else:
            nn.init.normal_(A, std=1e-4, generator=generator)
            nn.init.normal_(B, std=1e-4, generator=generator)


def init(
    shape: Iterable[int],
    r: int = 8,
    alpha: float = 8.0,
    init: str = "kaimingA_zeroB",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LoRA:
    """A new adapter for a weight of the given shape, with ``scaling = alpha / r``.

    Random draws come from ``generator`` (or torch's global generator when it is
    ``None``) in the order of the documented ``LoRAParam``: the same seed gives the same
    ``A`` and ``B`` as ``LoRAParam(shape, r, alpha, init)``.

    Args:
        shape: the base weight's shape: ``(out, in)``, ``(out, in, k)``,
            ``(out, in, kH, kW)`` or ``(out, in, kD, kH, kW)``.
        r: the rank, a positive int.
        alpha: the numerator of ``scaling = alpha / r``, a finite number.
        init: ``"zeros"`` (A = B = 0), ``"kaimingA_zeroB"`` (A kaiming-uniform with
            ``a=sqrt(5)``, B = 0; the adapter starts as the identity) or ``"gaussian"``
            (A then B normal with std 1e-4).
        generator: the random generator to draw from; its device must match ``device``.
        device: where the tensors live (default: torch's default device).
        dtype: the dtype of ``A`` and ``B`` (default: torch's default dtype).
            ``scaling`` is kept in at least float32.

    Returns:
        A :class:`LoRA` with ``A`` of shape ``(r, prod(shape[1:]))``, ``B`` of shape
        ``(shape[0], r)`` and a 0-d ``scaling``.

    Raises:
        ValueError: if the shape is not 2- to 5-D, ``r <= 0``, ``alpha`` is not finite,
            ``init`` is unknown, ``device`` is not a device or ``generator`` is on
            another kind of device than the tensors.
        TypeError: if ``r`` is not an int, ``alpha`` not a number or ``dtype`` not a
            floating-point dtype.

    Example:
        >>> import torch, lora_func
        >>> lora = lora_func.init((16, 3, 3, 3), r=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
        >>> tuple(lora.A.shape), tuple(lora.B.shape), float(lora.scaling)
        ((4, 27), (16, 4), 2.0)
        >>> bool(lora_func.delta(lora).eq(0).all())  # B starts at zero
        True
    """
    dims = check_weight_shape(shape, "init")
    r = check_rank(r, "init")
    alpha = check_alpha(alpha, "init")
    init = check_init(init, "init")
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"init: dtype must be a floating-point dtype (a torch.dtype), got {dtype!r}")
    if device is not None:
        device = check_device(device, "init")
    # B is created before A, as in the documented LoRAParam (this order draws nothing).
    B = torch.empty(dims[0], r, device=device, dtype=dtype)
    A = torch.empty(r, _prod(dims[1:]), device=device, dtype=dtype)
    check_generator(generator, A.device, "init", "the factors are made")
    fill_factors(A, B, init, generator)
    scaling = torch.tensor(alpha / r, dtype=_scaling_dtype(dtype), device=A.device)
    return LoRA(A, B, scaling, dims)


def _scaled_product(
    A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor | float, shape: tuple[int, ...]
) -> torch.Tensor:
    """``scaling * (B @ A)`` reshaped to ``(*lead, *shape)``; ``lead`` is A's batch dimensions."""
    lead = A.shape[:-2]
    if isinstance(scaling, torch.Tensor) and scaling.dim() > 0:
        # as a 0-d scaling would: the product's dtype decides the result's (no promotion)
        product_dtype = torch.promote_types(A.dtype, B.dtype)
        scaling = scaling.to(product_dtype).reshape(*scaling.shape, *([1] * len(shape)))
    return scaling * (B @ A).view(*lead, *shape)


#: Base dtypes whose merge is accumulated in float32 (then rounded once to the base dtype).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _update(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor | float) -> torch.Tensor:
    """The formula: ``base + scaling * (B @ A).view(base.shape)``, returned in ``base``'s dtype.

    Batch dimensions of ``A``, ``B`` and ``scaling`` lead the result. When the base or the
    factors are float16/bfloat16, the product and the sum are computed in float32 and the
    result is rounded to the base dtype once, so a merge costs one rounding, not three.
    """
    if base.dtype in LOW_PRECISION or A.dtype in LOW_PRECISION or B.dtype in LOW_PRECISION:
        wide = torch.promote_types(base.dtype, torch.float32)  # float64 bases stay float64
        out = base.to(wide) + _scaled_product(A.to(wide), B.to(wide), scaling, tuple(base.shape))
        return out.to(base.dtype)
    out = base + _scaled_product(A, B, scaling, tuple(base.shape))
    return out if out.dtype == base.dtype else out.to(base.dtype)


def delta(lora: LoRA) -> torch.Tensor:
    """The weight update ``scaling * (B @ A)`` in the base weight's shape.

    For a stacked adapter (leading dimensions ``K...``) the result has shape
    ``(*K, *lora.shape)``.

    Args:
        lora: the adapter.

    Returns:
        A tensor of shape ``lora.shape`` (with the adapter's leading dimensions first), in
        the dtype of ``B @ A``.

    Raises:
        TypeError: if ``lora`` is not a :class:`LoRA` with tensor leaves.

    Example:
        >>> import torch, lora_func
        >>> lora = lora_func.LoRA(torch.ones(1, 6), torch.ones(2, 1), 0.5, (2, 3, 2))
        >>> lora_func.delta(lora).shape
        torch.Size([2, 3, 2])
    """
    _expect_lora(lora, "delta(lora)")
    return _scaled_product(lora.A, lora.B, lora.scaling, lora.shape)


def merge(base: torch.Tensor, lora: LoRA, *, check_finite: bool = False) -> torch.Tensor:
    """The effective weight ``base + scaling * (B @ A).view(base.shape)``, in ``base``'s dtype.

    A pure function: ``base`` is not modified. Gradients flow to ``A``, ``B`` and
    ``scaling`` (and to ``base`` if it requires them). For a stacked adapter the result
    has the adapter's leading dimensions first.

    For float16/bfloat16 bases (or factors) the sum is accumulated in float32 and rounded
    to the base dtype once.

    Args:
        base: the frozen weight, of shape ``lora.shape``.
        lora: the adapter.
        check_finite: refuse (``ValueError``) to return a weight with NaN or Inf in it.

    Returns:
        The effective weight.

    Raises:
        TypeError: if ``base`` is not a floating-point tensor or ``lora`` not a
            :class:`LoRA` with tensor leaves.
        ValueError: if ``base.shape`` is not ``lora.shape``, the weight is not 2- to 5-D,
            ``base`` and ``lora`` are on different devices, or ``check_finite`` is set and
            the merged weight is not finite.

    Example:
        >>> import torch, lora_func
        >>> W = torch.zeros(2, 3)
        >>> lora = lora_func.LoRA(torch.ones(1, 3), torch.ones(2, 1), 2.0, (2, 3))
        >>> lora_func.merge(W, lora)
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"merge(base, lora): base must be a torch.Tensor, got {type(base).__name__}")
    _expect_lora(lora, "merge(base, lora)")
    if not isinstance(check_finite, bool):
        raise TypeError(f"merge(base, lora): check_finite must be a bool, got {type(check_finite).__name__}")
    check_weight_shape(base.shape, "merge(base, lora)")
    if tuple(base.shape) != lora.shape:
        raise ValueError(
            f"merge(base, lora): base has shape {tuple(base.shape)} but lora was made for shape {lora.shape}"
        )
    if not base.dtype.is_floating_point:
        raise TypeError(f"merge(base, lora): base must have a floating-point dtype, got {base.dtype}")
    if base.device != lora.A.device:
        raise ValueError(
            f"merge(base, lora): base is on {base.device} but lora is on {lora.A.device}; move one of them"
        )
    out = _update(base, lora.A, lora.B, lora.scaling)
    if check_finite:
        _check_finite(out, "merge(base, lora)")
    return out


def _check_finite(weight: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{where}: the merged weight has {bad} non-finite values (NaN or Inf); nothing was merged")


def _expect_lora(lora: Any, where: str) -> None:
    if not isinstance(lora, LoRA):
        raise TypeError(f"{where}: lora must be a lora_func.LoRA, got {type(lora).__name__}")
    wrong = {k: type(v).__name__ for k, v in (("A", lora.A), ("B", lora.B)) if not isinstance(v, torch.Tensor)}
    if wrong or not isinstance(lora.scaling, (torch.Tensor, int, float)):
        raise TypeError(f"{where}: lora's leaves must be tensors, got {wrong or type(lora.scaling).__name__}")
