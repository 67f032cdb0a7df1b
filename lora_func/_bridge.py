"""The bridge between the stateful layer and the functional core: a module prepared with
``apply_lora`` gives its adapters as :class:`~lora_func.LoRA` nodes (``get_adapters``), takes
them back (``set_adapters``), and runs under ``torch.func.functional_call`` with other
adapters in place of its own (``module_params``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.utils.parametrize as P
from torch import nn

from ._files import _check
from ._math import check_weight_shape
from ._stateful import LoRAParam, _chain, _lora_of, apply_lora
from ._tree import LoRA

__all__ = ["get_adapters", "module_params", "set_adapters"]


def _lora_modules(module: nn.Module) -> dict[str, tuple[nn.Module, str, LoRAParam]]:
    out = {}
    for prefix, mod in module.named_modules():
        if not P.is_parametrized(mod):
            continue
        for pname in cast(nn.ModuleDict, mod.parametrizations).keys():
            lora = _lora_of(mod, pname)
            if lora is not None:
                out[f"{prefix}.{pname}" if prefix else pname] = (mod, pname, lora)
    return out


def get_adapters(module: nn.Module) -> dict[str, LoRA]:
    """The adapters of a module prepared with :func:`apply_lora`, as :class:`LoRA` nodes.

    Keyed like :func:`~lora_func.init_adapters`, by the base parameter's name
    (``"0.weight"``). As with ``state_dict()``, ``A`` and ``B`` are detached tensors that
    share storage with the module's parameters: clone them (or :func:`~lora_func.stack`
    them, which copies) to keep a snapshot.

    Args:
        module: any module; those of its weights that carry a :class:`LoRAParam` are read.

    Returns:
        A dict from parameter name to :class:`LoRA` (empty if no weight has LoRA).

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4))
        >>> _ = lora_func.apply_lora(model[0], r=2, alpha=4.0)
        >>> adapters = lora_func.get_adapters(model)
        >>> list(adapters), float(adapters["0.weight"].scaling)
        (['0.weight'], 2.0)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"get_adapters(module): module must be an nn.Module, got {type(module).__name__}")
    out = {}
    for name, (_, _, lora) in _lora_modules(module).items():
        node = lora.lora()
        out[name] = LoRA(node.A.detach(), node.B.detach(), node.scaling, node.shape)
    return out


def set_adapters(module: nn.Module, adapters: Mapping[str, LoRA]) -> None:
    """Copies adapters into a module, applying LoRA where a weight has none yet.

    The inverse of :func:`get_adapters`: after ``set_adapters(m, a)``,
    ``get_adapters(m)`` equals ``a`` (values are copied, so later changes to ``a`` do not
    reach the module). A weight that already has LoRA keeps its :class:`LoRAParam`
    (``A``, ``B``, ``scaling`` and ``alpha`` are updated, cast to its dtype); one without
    gets ``apply_lora`` first, with factors in the adapter's dtype. Everything is checked
    before anything changes.

    Args:
        module: the model.
        adapters: parameter names (``"0.weight"``) to single, unstacked :class:`LoRA`
            nodes (pick one out of a stack with :func:`~lora_func.unstack`).

    Raises:
        ValueError: if a name matches no parameter, a shape or rank does not fit, an
            adapter is stacked, or its scaling is not finite.
        TypeError: if ``adapters`` is not a mapping of names to :class:`LoRA`.

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4))
        >>> adapters = lora_func.init_adapters(model, "0.weight", r=2, init="gaussian")
        >>> lora_func.set_adapters(model, adapters)
        >>> torch.equal(lora_func.get_adapters(model)["0.weight"].A, adapters["0.weight"].A)
        True
    """
    where = "set_adapters(module, adapters)"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: module must be an nn.Module, got {type(module).__name__}")
    # Types, unknown names and shape mismatches, all reported in one error (dtypes need not
    # match: values are cast). What is left to check here is what check() does not know.
    _check(adapters, module, where, missing=False, dtypes=False)
    plan = []
    for name, lora in adapters.items():
        if lora.batch_shape:
            raise ValueError(
                f"{where}: adapters[{name!r}] is a stack of {lora.batch_shape} adapters; "
                "pick one with lora_func.unstack(adapters)[i]"
            )
        if any(t.is_meta for t in (lora.A, lora.B, lora.scaling)):
            raise ValueError(f"{where}: adapters[{name!r}] is on the meta device and holds no values to copy")
        if not bool(torch.isfinite(lora.scaling).all()):
            raise ValueError(f"{where}: adapters[{name!r}] has non-finite scaling {lora.scaling.item()}")
        modpath, _, pname = name.rpartition(".")
        sub = module.get_submodule(modpath)  # check() has confirmed that the name exists
        existing = _lora_of(sub, pname)
        if existing is not None and existing.r != lora.r:
            raise ValueError(
                f"{where}: adapters[{name!r}] has rank {lora.r} but the module's LoRA has rank {existing.r}; "
                f"call remove_lora on it first"
            )
        if existing is None:
            check_weight_shape(lora.shape, where)
            if not getattr(sub, pname).dtype.is_floating_point:
                raise TypeError(
                    f"{where}: adapters[{name!r}] names a {getattr(sub, pname).dtype} weight; LoRA needs a float one"
                )
        plan.append((sub, pname, existing, lora))
    for sub, pname, existing, lora in plan:
        if existing is None:
            # "zeros" draws no random numbers: setting adapters leaves the global RNG alone.
            # The new factors keep the adapter's dtype (float32 adapters over a bf16 model stay float32).
            existing = apply_lora(sub, pname, r=lora.r, alpha=float(lora.alpha), init="zeros", dtype=lora.A.dtype)
        with torch.no_grad():
            existing.A.copy_(lora.A)
            existing.B.copy_(lora.B)
        # Keep the module's own (float64) alpha when the adapter's scaling is that value rounded to
        # the adapter's precision: a get_adapters / set_adapters round trip changes nothing.
        if float(lora.scaling) != float(torch.tensor(existing.scaling, dtype=lora.scaling.dtype)):
            existing.scaling = float(lora.scaling)
            existing.alpha = existing.scaling * existing.r


def module_params(module: nn.Module, adapters: Mapping[str, LoRA]) -> dict[str, torch.Tensor]:
    """The parameters of a module prepared with :func:`apply_lora`, with its adapters replaced.

    The result goes to ``torch.func.functional_call(module, result, args)``: every weight
    named in ``adapters`` (``"0.weight"``) computes ``W + scaling * (B @ A)`` with the given
    adapter's ``A``, ``B`` and ``scaling`` instead of the module's own, and the module is
    not changed. This is how a model prepared the stateful way is trained functionally
    (``grad``, ``vmap`` over :func:`~lora_func.stack`-ed adapters); put the chosen adapter
    back with :func:`set_adapters`. (For a model without parametrizations use
    :func:`~lora_func.effective_params`.)

    The parametrization multiplies by its own ``scaling``, so the adapter's ``B`` is passed
    as ``B * (adapter.scaling / module.scaling)``: the same weight up to rounding, with
    gradients flowing to the adapter's ``A``, ``B`` and ``scaling``.

    Args:
        module: the model, with LoRA on every weight named in ``adapters``.
        adapters: parameter names to :class:`LoRA` (stacked ones under ``vmap``).

    Returns:
        A new dict keyed like ``module.named_parameters()``.

    Raises:
        ValueError: if an adapter names a weight without LoRA, or its shape or rank differs.
        TypeError: if ``adapters`` is not a mapping of names to :class:`LoRA`.

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4))
        >>> _ = lora_func.apply_lora(model[0], r=2)
        >>> adapters = {"0.weight": lora_func.init((4, 3), r=2, alpha=16.0, init="gaussian")}
        >>> params = lora_func.module_params(model, adapters)
        >>> y = torch.func.functional_call(model, params, (torch.ones(1, 3),))
        >>> W = lora_func.merge(model[0].parametrizations.weight.original, adapters["0.weight"])
        >>> torch.allclose(y, torch.nn.functional.linear(torch.ones(1, 3), W, model[0].bias))
        True
    """
    where = "module_params(module, adapters)"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(adapters, Mapping):
        raise TypeError(f"{where}: adapters must be a mapping of names to LoRA, got {type(adapters).__name__}")
    found = _lora_modules(module)
    out: dict[str, torch.Tensor] = dict(module.named_parameters())
    for name, lora in adapters.items():
        if not isinstance(lora, LoRA):
            raise TypeError(f"{where}: adapters[{name!r}] must be a lora_func.LoRA, got {type(lora).__name__}")
        if name not in found:
            raise ValueError(
                f"{where}: adapters[{name!r}] names no weight with LoRA; weights with LoRA are {list(found)}"
            )
        sub, pname, param = found[name]
        if lora.shape != param.weight_shape or lora.r != param.r:
            raise ValueError(
                f"{where}: adapters[{name!r}] has shape {lora.shape} and rank {lora.r}, "
                f"but the module's LoRA has shape {param.weight_shape} and rank {param.r}"
            )
        if param.scaling == 0:
            raise ValueError(
                f"{where}: the module's LoRA on {name!r} has alpha 0, so no adapter can pass through it; "
                "give it a non-zero alpha (set_adapters sets one)"
            )
        prefix = name[: len(name) - len(pname)] + f"parametrizations.{pname}."
        index = list(_chain(sub, pname)).index(param)
        # A tensor divisor: CUDA divides by a Python number as a * (1 / b), and s * (1 / s) is not always 1
        ratio = lora.scaling / torch.full_like(lora.scaling, param.scaling)
        out[f"{prefix}{index}.A"] = lora.A
        out[f"{prefix}{index}.B"] = lora.B * ratio.reshape(*ratio.shape, 1, 1)
    return out
