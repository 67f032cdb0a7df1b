"""The documented stateful API: ``LoRAParam``, ``apply_lora``, ``remove_lora``.

A thin layer: ``LoRAParam.forward`` is the core's formula, and the state-dict layout is the
one ``torch.nn.utils.parametrize`` gives with the ``LoRAParam`` as parametrization 0.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as P
from torch import nn

from ._math import _check_finite, _update, check_alpha, check_init, check_rank, check_weight_shape, fill_factors
from ._tree import LoRA, _prod, _scaling_dtype
from ._weight import _make

__all__ = ["LoRAParam", "apply_lora", "remove_lora"]


def _resolve_device(device: Any, where: str) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{where}: device {device!r} is not a valid torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{where}: device={device!r} but CUDA is not available; pass device='cpu' or leave device unset"
        )
    return dev


class LoRAParam(nn.Module):
    """Parametrization that adds a low-rank update to a weight: ``W + (alpha / r) * (B @ A)``.

    For 2-D weights ``(out, in)`` the update applies directly; for 3- to 5-D weights
    (``(out, in, *kernel)``, convolutions) ``B @ A`` has shape ``(out, in * prod(kernel))``
    and is reshaped to the weight's shape. Register it with
    ``torch.nn.utils.parametrize.register_parametrization``, or let :func:`apply_lora` do it.

    The same signature as the documented original, with two changes: ``device`` defaults
    to CUDA only when CUDA is available (CPU otherwise), and a keyword-only ``dtype``.

    Args:
        weight_shape: the shape of the weight to parametrize: ``(out, in)`` for Linear,
            ``(out, in, k)``, ``(out, in, kH, kW)`` or ``(out, in, kD, kH, kW)`` for convs.
        r: rank of the low-rank matrices.
        alpha: scaling factor; the update is multiplied by ``alpha / r``.
        init: ``"zeros"`` (A = B = 0), ``"kaimingA_zeroB"`` (kaiming-uniform A, zero B)
            or ``"gaussian"`` (normal A then B, std 1e-4). Draws come from torch's global
            generator, in the documented order.
        device: device of ``A`` and ``B``; ``None`` means CUDA if available, else CPU.
        dtype: dtype of ``A`` and ``B`` (default: torch's default dtype).

    Attributes:
        r (int): rank of the decomposition.
        alpha (float): scaling factor.
        scaling (float): ``alpha / r``.
        is_conv (bool): whether the weight has more than 2 dimensions.
        B (nn.Parameter): factor of shape ``(out, r)``.
        A (nn.Parameter): factor of shape ``(r, in_flat)``.

    Raises:
        ValueError: for an unsupported weight shape, ``r <= 0``, non-finite ``alpha``, an
            unknown ``init``, or ``device="cuda"`` without CUDA.
        TypeError: if ``r`` is not an int or ``alpha`` not a number.

    Example:
        >>> import torch, lora_func
        >>> p = lora_func.LoRAParam((4, 3), r=2, alpha=4.0, device="cpu")
        >>> p.scaling, tuple(p.A.shape), tuple(p.B.shape)
        (2.0, (2, 3), (4, 2))
        >>> torch.equal(p(torch.ones(4, 3)), torch.ones(4, 3))  # zeros init: the identity
        True
    """

    def __init__(
        self,
        weight_shape: Any,
        r: int = 8,
        alpha: float = 8.0,
        init: str = "zeros",
        device: Any = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "LoRAParam"
        shape = check_weight_shape(weight_shape, where)
        self.r = check_rank(r, where)
        self.alpha = check_alpha(alpha, where)
        self.scaling = self.alpha / self.r
        check_init(init, where)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{where}: dtype must be None or a floating-point torch.dtype, got {dtype!r}")
        dev = _resolve_device(device, where)
        self.weight_shape = shape
        # The base weight's requires_grad before apply_lora froze it, for remove_lora to
        # restore; None (registered by hand) leaves it as it is.
        self.base_requires_grad: bool | None = None
        self.is_conv = len(shape) > 2
        self.flat_in_dim = _prod(shape[1:])
        # B before A: the documented registration order (and state-dict order).
        self.B = nn.Parameter(torch.zeros(shape[0], self.r, device=dev, dtype=dtype))
        self.A = nn.Parameter(torch.zeros(self.r, self.flat_in_dim, device=dev, dtype=dtype))
        fill_factors(self.A, self.B, init, None)

    def forward(self, W_base: torch.Tensor) -> torch.Tensor:
        """The effective weight ``W_base + scaling * (B @ A).view(W_base.shape)``, in ``W_base``'s dtype.

        Raises:
            ValueError: if ``W_base`` does not have the shape this parametrization was made
                for, or is on another device than ``A`` and ``B``.
            TypeError: if ``W_base`` is not a floating-point tensor.
        """
        if not isinstance(W_base, torch.Tensor) or not W_base.dtype.is_floating_point:
            got = W_base.dtype if isinstance(W_base, torch.Tensor) else type(W_base).__name__
            raise TypeError(f"LoRAParam.forward(W_base): W_base must be a floating-point tensor, got {got}")
        if tuple(W_base.shape) != self.weight_shape or W_base.device != self.A.device:
            raise ValueError(
                f"LoRAParam.forward(W_base): W_base has shape {tuple(W_base.shape)} on {W_base.device}, but this "
                f"LoRAParam was made for weight_shape {self.weight_shape} on {self.A.device}"
            )
        return _update(W_base, self.A, self.B, self.scaling)

    def lora(self) -> LoRA:
        """This parametrization's adapter as a :class:`LoRA` node (sharing ``A`` and ``B``)."""
        scaling = torch.tensor(self.scaling, dtype=_scaling_dtype(self.A.dtype), device=self.A.device)
        return LoRA(self.A, self.B, scaling, self.weight_shape)

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, r={self.r}, alpha={self.alpha}"


def _chain(module: nn.Module, param_name: str) -> P.ParametrizationList:
    """The parametrization list of ``module.<param_name>`` (which must be parametrized)."""
    return cast(P.ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[param_name])


def _lora_of(module: nn.Module, param_name: str) -> LoRAParam | None:
    if not P.is_parametrized(module, param_name):
        return None
    for p in _chain(module, param_name):
        if isinstance(p, LoRAParam):
            return p
    return None


def _parameter_names(module: nn.Module) -> list[str]:
    names = [n for n, _ in module.named_parameters(recurse=False)]
    if P.is_parametrized(module):
        names += list(cast(nn.ModuleDict, module.parametrizations).keys())
    return names


def _check_target(module: Any, param_name: Any, where: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(param_name, str):
        raise TypeError(f"{where}: param_name must be a str, got {type(param_name).__name__}")
    if param_name not in _parameter_names(module):
        raise ValueError(
            f"{where}: {type(module).__name__} has no parameter {param_name!r}; "
            f"its parameters are {_parameter_names(module)}"
        )


def apply_lora(
    module: nn.Module,
    param_name: str = "weight",
    r: int = 8,
    alpha: float = 8.0,
    init: str = "kaimingA_zeroB",
    device: Any = None,
    *,
    dtype: torch.dtype | None = None,
) -> LoRAParam:
    """Adds a LoRA parametrization to ``module.<param_name>`` and freezes the base weight.

    Afterwards ``module.<param_name>`` evaluates to ``W + (alpha / r) * (B @ A)``; the
    state dict holds ``parametrizations.<param_name>.original`` (the frozen base) and
    ``parametrizations.<param_name>.0.A`` / ``.0.B``, as in the documented original.

    Args:
        module: the module that owns the weight.
        param_name: the parameter to adapt.
        r: rank.
        alpha: scaling factor (``scaling = alpha / r``).
        init: see :class:`LoRAParam`; the default starts the adapter as the identity.
        device: device of ``A`` and ``B``; ``None`` (the default) means the weight's own
            device.
        dtype: dtype of ``A`` and ``B``; ``None`` (the default) means the weight's dtype.
            ``torch.float32`` keeps the adapter of a bfloat16/float16 weight in float32;
            the effective weight (``module.<param_name>``) stays in the weight's dtype.

    Returns:
        The :class:`LoRAParam`, for convenience.

    Raises:
        ValueError: if the parameter does not exist, already has LoRA, has an unsupported
            shape, if ``device`` is not the weight's device, or for invalid ``r``,
            ``alpha``, ``init``.
        TypeError: for arguments of the wrong type (``dtype`` not a floating-point
            ``torch.dtype``).

    Example:
        >>> import torch, lora_func
        >>> layer = torch.nn.Linear(3, 4)
        >>> lora = lora_func.apply_lora(layer, r=2)
        >>> layer.parametrizations.weight.original.requires_grad, lora.A.requires_grad
        (False, True)
        >>> sorted(layer.state_dict())
        ['bias', 'parametrizations.weight.0.A', 'parametrizations.weight.0.B', 'parametrizations.weight.original']
        >>> half = torch.nn.Linear(3, 4, dtype=torch.bfloat16)
        >>> lora = lora_func.apply_lora(half, r=2, dtype=torch.float32)
        >>> lora.A.dtype, half.weight.dtype
        (torch.float32, torch.bfloat16)
    """
    where = f"apply_lora(module, {param_name!r})"
    _check_target(module, param_name, where)
    if _lora_of(module, param_name) is not None:
        raise ValueError(
            f"{where}: {param_name} already has a LoRA parametrization; call remove_lora(module, {param_name!r}) first"
        )
    base = getattr(module, param_name)
    # Checked here too, so that errors name apply_lora rather than LoRAParam.
    check_weight_shape(tuple(base.shape), where)
    check_rank(r, where)
    check_alpha(alpha, where)
    check_init(init, where)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{where}: dtype must be None or a floating-point torch.dtype, got {dtype!r}")
    if not base.dtype.is_floating_point:
        raise TypeError(f"{where}: {param_name} has dtype {base.dtype}; LoRA adapts floating-point weights only")
    original = _chain(module, param_name).original if P.is_parametrized(module, param_name) else base
    dev = base.device if device is None else _resolve_device(device, where)
    if dev != base.device and not (dev.type == base.device.type and dev.index is None):
        raise ValueError(
            f"{where}: device {dev} differs from the weight's device {base.device}; "
            "move the module first (module.to(device)) or leave device unset"
        )
    lora = LoRAParam(tuple(base.shape), r=r, alpha=alpha, init=init, device=base.device, dtype=dtype or base.dtype)
    lora.base_requires_grad = bool(original.requires_grad)
    _own_class(module)
    P.register_parametrization(module, param_name, lora)
    _chain(module, param_name).original.requires_grad_(False)
    _install_fast_forward(module, param_name)
    return lora


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change.

    ``register_parametrization`` makes one class per module, but ``copy.deepcopy`` of the
    module shares it with the copy; adding or removing a parametrization edits that class,
    and so would break the other module (removing LoRA from a copy would strip ``weight``
    from the original). A fresh class with the same bases and contents keeps each module's
    edits to itself.
    """
    if not P.is_parametrized(module):
        return
    cls = type(module)
    contents = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, contents)


#: Layers whose forward has a factored form: ``x W^T + s (x A^T) B^T`` without building W + sBA.
_FAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _install_fast_forward(module: nn.Module, param_name: str) -> None:
    """Give a LoRA-parametrized Linear/ConvNd/Embedding a factored forward.

    ``register_parametrization`` put the module in a class of its own, made for it alone
    (a subclass of its original class); the forward is set on that class, so no other
    module changes, the state dict and ``module.weight`` stay as they are, and
    ``remove_lora`` (which restores the original class) takes it away. Subclasses of these
    layers keep their own forward.
    """
    cls = type(module)
    original = cls.__bases__[0]
    if param_name != "weight" or original not in _FAST_LAYERS or cls.forward is not original.forward:
        return
    cls.forward = _fast_forward  # type: ignore[method-assign]


def _fast_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """The layer's forward with its weight as a :class:`~lora_func.LoRAWeight` (factored when cheaper)."""
    original = type(self).__bases__[0]
    if not P.is_parametrized(self, "weight"):
        return original.forward(self, input)  # type: ignore[no-any-return, attr-defined]
    chain = _chain(self, "weight")
    lora = chain[0]
    if len(chain) != 1 or not isinstance(lora, LoRAParam):
        return original.forward(self, input)  # type: ignore[no-any-return, attr-defined]
    weight = _make(chain.original, lora.A, lora.B, lora.scaling, "auto")  # type: ignore[arg-type]
    if original is nn.Linear:
        return F.linear(input, weight, cast(nn.Linear, self).bias)
    if original is nn.Embedding:
        e = cast(nn.Embedding, self)
        return F.embedding(input, weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
    return cast(nn.Conv2d, self)._conv_forward(input, weight, cast(nn.Conv2d, self).bias)


def remove_lora(
    module: nn.Module, param_name: str = "weight", merge: bool = True, *, check_finite: bool = False
) -> None:
    """Removes the LoRA parametrization from ``module.<param_name>``.

    With ``merge=True`` the parameter becomes the effective weight ``W + scaling * B @ A``
    (LoRA folded into the base); with ``merge=False`` it is the original tensor again, bit
    for bit. Either way the parameter gets back the ``requires_grad`` it had before
    :func:`apply_lora`.

    Args:
        module: the module that owns the weight.
        param_name: the parameter whose LoRA to remove.
        merge: fold the update into the weight (``True``) or drop it (``False``).
        check_finite: with ``merge=True``, refuse to merge a weight with NaN or Inf in it
            (``ValueError``), leaving the module exactly as it was.

    Raises:
        ValueError: if the parameter has no LoRA parametrization, if ``check_finite`` finds
            a non-finite merged weight, or if the parameter has other
            parametrizations too (remove those with
            ``torch.nn.utils.parametrize.remove_parametrizations``).
        TypeError: for arguments of the wrong type.

    Example:
        >>> import torch, lora_func
        >>> layer = torch.nn.Linear(3, 4)
        >>> W = layer.weight.detach().clone()
        >>> _ = lora_func.apply_lora(layer)
        >>> lora_func.remove_lora(layer, merge=False)
        >>> torch.equal(layer.weight, W), layer.weight.requires_grad
        (True, True)
    """
    where = f"remove_lora(module, {param_name!r})"
    _check_target(module, param_name, where)
    if not isinstance(merge, bool):
        raise TypeError(f"{where}: merge must be a bool, got {type(merge).__name__}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"{where}: check_finite must be a bool, got {type(check_finite).__name__}")
    lora = _lora_of(module, param_name)
    if lora is None:
        raise ValueError(f"{where}: {param_name} has no LoRA parametrization; nothing to remove")
    chain = _chain(module, param_name)
    if len(chain) != 1:
        raise ValueError(
            f"{where}: {param_name} has other parametrizations besides LoRA "
            f"({[type(p).__name__ for p in chain]}); remove them with "
            "torch.nn.utils.parametrize.remove_parametrizations"
        )
    if merge and check_finite:
        with torch.no_grad():
            _check_finite(getattr(module, param_name), where)
    requires_grad = lora.base_requires_grad
    _own_class(module)
    P.remove_parametrizations(module, param_name, leave_parametrized=merge)
    if P.is_parametrized(module) and type(module).__dict__.get("forward") is _fast_forward and param_name == "weight":
        del type(module).forward  # other tensors keep parametrizations: back to the layer's own forward
    if requires_grad is not None:
        getattr(module, param_name).requires_grad_(requires_grad)
