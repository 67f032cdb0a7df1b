"""Adapters keyed by parameter name: making them, and merging them into a params mapping."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._math import WEIGHT_DIMS, check_alpha, check_generator, check_init, check_rank, merge
from ._math import init as init_one
from ._tree import LoRA

__all__ = ["base_params", "effective_params", "init_adapters", "match_targets"]


def base_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters keyed by their plain names, ready for :func:`effective_params`.

    Like ``dict(module.named_parameters())``, except that a parameter under a
    ``torch.nn.utils.parametrize`` parametrization (such as the one
    :func:`~lora_func.apply_lora` adds) appears once, under its plain name
    (``"0.weight"``), holding the original tensor, and the parametrizations' own
    parameters (LoRA's ``A`` and ``B``) are left out: the names
    :func:`init_adapters` and :func:`~lora_func.get_adapters` use. (To call a module
    prepared with :func:`~lora_func.apply_lora` functionally, use
    :func:`~lora_func.module_params`.)

    Args:
        module: any ``nn.Module``.

    Returns:
        A new dict from names to the module's parameter tensors (not copies).

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4))
        >>> _ = lora_func.apply_lora(model[0])
        >>> sorted(lora_func.base_params(model))
        ['0.bias', '0.weight']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"base_params(module): module must be an nn.Module, got {type(module).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        parts = name.split(".")
        if "parametrizations" in parts:
            i = len(parts) - 1 - parts[::-1].index("parametrizations")
            if parts[i + 2 :] == ["original"]:
                out[".".join([*parts[:i], parts[i + 1]])] = param
            continue
        out[name] = param
    return out


def _params_of(module_or_params: Any, where: str) -> Mapping[str, torch.Tensor]:
    if isinstance(module_or_params, nn.Module):
        return base_params(module_or_params)
    if isinstance(module_or_params, Mapping):
        return module_or_params
    raise TypeError(
        f"{where}: module_or_params must be an nn.Module or a mapping of names to tensors, "
        f"got {type(module_or_params).__name__}"
    )


def match_targets(names: Iterable[str], targets: str | Iterable[str], where: str = "match_targets") -> list[str]:
    """The names (in their given order) matched by a glob pattern or a list of them.

    Patterns use :mod:`fnmatch` syntax over full dotted names (``"*.weight"``,
    ``"encoder.*.weight"``, ``"0.weight"``).

    Raises:
        ValueError: if a pattern matches no name (a misspelt target is an error, not a
            silent no-op), or ``targets`` is empty.
        TypeError: if ``targets`` is not a string or an iterable of strings.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{where}: targets must be a glob pattern or a list of them, got {targets!r}")
    if not patterns:
        raise ValueError(f"{where}: targets is empty; give at least one pattern such as '*.weight'")
    names = list(names)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"{where}: targets {unmatched} match no parameter; parameters are {names}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def init_adapters(
    module_or_params: nn.Module | Mapping[str, torch.Tensor],
    targets: str | Iterable[str],
    *,
    r: int = 8,
    alpha: float = 8.0,
    init: str = "kaimingA_zeroB",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, LoRA]:
    """New adapters for every parameter whose name matches ``targets``.

    Each adapter is made by :func:`lora_func.init` on its parameter's device and, unless
    ``dtype`` says otherwise, in its dtype; draws happen in parameter order, from
    ``generator`` when given.

    Args:
        module_or_params: a module (its parameters as in :func:`base_params`) or a
            mapping from names to tensors.
        targets: a glob pattern over parameter names (``"*.weight"``) or a list of them.
        r: the rank of every adapter.
        alpha: ``scaling = alpha / r``.
        init: see :func:`lora_func.init`.
        generator: the random generator to draw from, on the targets' kind of device
            (``torch.Generator("cuda")`` for a model on CUDA).
        dtype: the dtype of every ``A`` and ``B``: ``None`` (the default) means each
            parameter's own dtype; ``torch.float32`` keeps the adapters of a
            bfloat16/float16 model in float32 (the optimizer then updates float32
            values). The effective weight stays in the parameter's dtype either way.

    Returns:
        A dict from parameter name (``"encoder.0.weight"``) to :class:`LoRA`, in
        parameter order.

    Raises:
        ValueError: if a pattern matches nothing, a matched parameter is not 2- to 5-D
            (narrow the pattern, e.g. ``"*.weight"``), ``r``/``alpha``/``init`` is
            invalid, or ``generator`` is on another kind of device than the targets
            (checked before anything is drawn).
        TypeError: if ``module_or_params`` or ``targets`` has the wrong type, or
            ``dtype`` is not a floating-point ``torch.dtype``.

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> adapters = lora_func.init_adapters(model, "*.weight", r=2)
        >>> {k: v.shape for k, v in adapters.items()}
        {'0.weight': (4, 3), '2.weight': (2, 4)}
        >>> half = model.to(torch.bfloat16)
        >>> kept = lora_func.init_adapters(half, "*.weight", r=2, dtype=torch.float32)
        >>> kept["0.weight"].A.dtype, lora_func.effective_params(dict(half.named_parameters()), kept)["0.weight"].dtype
        (torch.float32, torch.bfloat16)
    """
    where = "init_adapters"
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{where}: dtype must be None or a floating-point torch.dtype, got {dtype!r}")
    params = _params_of(module_or_params, where)
    r = check_rank(r, where)
    alpha = check_alpha(alpha, where)
    init = check_init(init, where)
    names = match_targets(params.keys(), targets, where)
    untyped = {n: type(params[n]).__name__ for n in names if not isinstance(params[n], torch.Tensor)}
    if untyped:
        raise TypeError(f"{where}: module_or_params must map names to tensors; targets match {untyped}")
    bad = [f"{n} {tuple(params[n].shape)}" for n in names if params[n].dim() not in WEIGHT_DIMS]
    if bad:
        raise ValueError(
            f"{where}: targets match parameters LoRA cannot adapt (it needs 2- to 5-D weights): {bad}; "
            "narrow the pattern, e.g. '*.weight'"
        )
    ints = {n: str(params[n].dtype) for n in names if not params[n].dtype.is_floating_point}
    if ints:
        raise TypeError(f"{where}: targets match parameters that are not floating-point: {ints}")
    for dev in {params[n].device for n in names}:  # before anything is drawn
        check_generator(generator, dev, where, "the targets are")
    out = {}
    for n in names:
        p = params[n]
        out[n] = init_one(p.shape, r, alpha, init, generator=generator, device=p.device, dtype=dtype or p.dtype)
    return out


def _check_keys(params: Mapping[str, Any], adapters: Mapping[str, Any], where: str) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"{where}: params must be a mapping of names to tensors, got {type(params).__name__}")
    if not isinstance(adapters, Mapping):
        raise TypeError(f"{where}: adapters must be a mapping of names to LoRA, got {type(adapters).__name__}")
    wrong = {k: type(v).__name__ for k, v in adapters.items() if not isinstance(v, LoRA)}
    if wrong:
        raise TypeError(f"{where}: adapters must map names to lora_func.LoRA; got {wrong}")
    leafless = [k for k, v in adapters.items() if not all(isinstance(t, torch.Tensor) for t in (v.A, v.B, v.scaling))]
    if leafless:
        raise TypeError(f"{where}: adapters {leafless} have leaves that are not tensors")
    missing = [k for k in adapters if k not in params]
    if missing:
        raise ValueError(f"{where}: adapters {missing} name no parameter in params; parameters are {list(params)}")
    untyped = {k: type(params[k]).__name__ for k in adapters if not isinstance(params[k], torch.Tensor)}
    if untyped:
        raise TypeError(f"{where}: params must hold tensors where adapters apply; got {untyped}")


def effective_params(params: Mapping[str, torch.Tensor], adapters: Mapping[str, LoRA]) -> dict[str, torch.Tensor]:
    """``params`` with every adapted weight replaced by its merged weight.

    The result goes straight to ``torch.func.functional_call(model, result, args)``.
    A pure function: neither ``params`` nor the adapters change.

    Args:
        params: names to tensors, e.g. ``dict(model.named_parameters())`` or
            :func:`base_params`.
        adapters: names to :class:`LoRA`, e.g. from :func:`init_adapters`.

    Returns:
        A new dict with the keys of ``params``; adapted entries are
        :func:`lora_func.merge` of the parameter and its adapter.

    Raises:
        ValueError: if an adapter names no parameter, its shape does not fit, or it is on
            another device than its parameter.
        TypeError: if the arguments are not mappings, an adapter is not a :class:`LoRA`
            with tensor leaves, or an adapted parameter is not floating-point.

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Linear(3, 2)
        >>> params = dict(model.named_parameters())
        >>> adapters = lora_func.init_adapters(params, "weight", r=1, init="gaussian")
        >>> y = torch.func.functional_call(model, lora_func.effective_params(params, adapters), (torch.ones(1, 3),))
        >>> y.shape
        torch.Size([1, 2])
    """
    where = "effective_params(params, adapters)"
    _check_keys(params, adapters, where)
    out = dict(params)
    for name, lora in adapters.items():
        try:
            out[name] = merge(params[name], lora)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: adapter {name!r}: {err}") from None
    return out


# lora_params builds on _weight, which sits above _math; imported here, next to its one user.
from ._routing import RoutedLoRAWeight, check_index  # noqa: E402
from ._weight import LoRAWeight, _make, check_mode  # noqa: E402

__all__ += ["lora_params"]


def lora_params(
    params: Mapping[str, torch.Tensor],
    adapters: Mapping[str, LoRA],
    *,
    mode: str = "auto",
    index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``params`` with every adapted weight replaced by a :class:`~lora_func.LoRAWeight`.

    Like :func:`effective_params`, but nothing is merged up front: ``F.linear``,
    ``F.conv1d/2d/3d`` and ``F.embedding`` over the result compute
    ``W x + s·B(A x)`` (or merge, when that is cheaper), and any other use of a weight
    sees the merged weight. The outputs and gradients are those of
    :func:`effective_params` up to floating-point rounding. Call it where the weights are
    used: inside the loss given to ``torch.func.grad``, inside the function given to
    ``torch.func.vmap`` over stacked adapters, or inside a ``torch.compile``\\ d step.

    Args:
        params: names to tensors, e.g. :func:`base_params`.
        adapters: names to unbatched :class:`LoRA` (inside ``vmap``, stacked adapters
            look unbatched).
        mode: ``"auto"`` picks, per layer and per call, the cheaper of the factored form
            (``tokens·r·(in+out)`` extra work; convolutions count output pixels) and the
            merge (``out·in·r``); ``"factored"`` and ``"materialize"`` force one.
        index: per-example routing (see :class:`~lora_func.RoutedLoRAWeight`): a
            ``(batch,)`` integer tensor giving each example's adapter in the stacked
            ``adapters`` (leading dimension ``K``, the same for all), ``-1`` for the base
            model alone. The input's leading dimension is the batch. Its range is checked
            here, which reads its minimum and maximum (a device sync; skipped inside
            ``torch.compile``).

    Returns:
        A new dict with the keys of ``params``; adapted entries are
        :class:`~lora_func.LoRAWeight` (:class:`~lora_func.RoutedLoRAWeight` with
        ``index``).

    Raises:
        ValueError: if ``mode`` is unknown, an adapter names no parameter, its shape does
            not fit, it is on another device than its parameter, or it is stacked (use
            ``torch.func.vmap``, or ``index``); with ``index``: if an adapter is not
            stacked, the stacks differ in ``K``, or ``index`` is not ``(batch,)``, holds a
            value outside ``[-1, K)`` or is on another device.
        TypeError: if the arguments are not mappings, an adapter is not a :class:`LoRA`
            with tensor leaves, an adapted parameter is not floating-point, or ``index``
            is not an integer tensor.

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Linear(3, 2)
        >>> params = dict(model.named_parameters())
        >>> adapters = lora_func.init_adapters(params, "weight", r=1, init="gaussian")
        >>> x = torch.ones(1, 3)
        >>> y = torch.func.functional_call(model, lora_func.lora_params(params, adapters), (x,))
        >>> y_ref = torch.func.functional_call(model, lora_func.effective_params(params, adapters), (x,))
        >>> torch.allclose(y, y_ref)
        True
    """
    where = "lora_params(params, adapters)"
    check_mode(mode, where)
    _check_keys(params, adapters, where)
    if index is not None:
        return _routed_params(params, adapters, mode, index)
    out = dict(params)
    compiling = torch.compiler.is_compiling()
    for name, lora in adapters.items():
        base = params[name]
        if (
            tuple(base.shape) != lora.shape
            or lora.A.dim() != 2
            or base.device != lora.A.device
            or not base.dtype.is_floating_point
        ):
            try:
                LoRAWeight(base, lora, mode)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{where}: adapter {name!r}: {err}") from None
        if compiling:  # torch.compile puts the class call, with tensor arguments, in the graph
            out[name] = LoRAWeight(base, mode=mode, A=lora.A, B=lora.B, scaling=lora.scaling)
        else:
            out[name] = _make(base, lora.A, lora.B, lora.scaling, mode)
    return out


def _routed_params(
    params: Mapping[str, torch.Tensor], adapters: Mapping[str, LoRA], mode: str, index: torch.Tensor
) -> dict[str, torch.Tensor]:
    where = "lora_params(params, adapters, index=...)"
    ks = {name: tuple(lora.A.shape[:-2]) for name, lora in adapters.items()}
    flat = [n for n, lead in ks.items() if len(lead) != 1]
    if flat:
        raise ValueError(
            f"{where}: adapters {flat} are not stacked along one leading dimension (shapes of A: "
            f"{ {n: tuple(adapters[n].A.shape) for n in flat} }); routing needs lora_func.stack([...]) of K adapters"
        )
    if len({lead[0] for lead in ks.values()}) > 1:
        raise ValueError(f"{where}: the stacked adapters differ in K: {ks}; stack the same K adapters everywhere")
    first = next(iter(adapters.values()), None)
    k = first.A.shape[0] if first is not None else 0
    check_index(index, k, first.A.device if first is not None else torch.device("cpu"), where)
    out = dict(params)
    for name, lora in adapters.items():
        try:
            out[name] = RoutedLoRAWeight(params[name], lora.A, lora.B, lora.scaling, index, mode)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: adapter {name!r}: {err}") from None
    return out
