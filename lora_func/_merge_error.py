"""What merging costs: the output difference between a merged and an unmerged model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import nn
from torch.func import functional_call

from ._bridge import _lora_modules, get_adapters
from ._files import _check
from ._stateful import remove_lora
from ._targets import base_params, effective_params, lora_params
from ._tree import LoRA

__all__ = ["merge_error"]


def merge_error(model: nn.Module, adapters: Mapping[str, LoRA] | None = None, inputs: Any = ()) -> float:
    """The largest absolute output difference between the merged and the unmerged model.

    *Unmerged*: every adapted layer computes ``x Wᵀ + s·(x Aᵀ) Bᵀ`` (the factored form,
    :func:`~lora_func.lora_params` with ``mode="factored"``). *Merged*: the layers use the
    weight ``merge(W, lora)``, rounded to the base dtype, as after
    ``remove_lora(merge=True)``. In float32 the two agree to rounding; for bfloat16 and
    float16 bases the merged weight cannot hold a small update exactly, and this number
    shows what folding it in costs on your inputs. The model is not changed.

    Args:
        model: the model. Either a plain model with ``adapters`` given, or a model prepared
            with :func:`~lora_func.apply_lora` (its own adapters are used when ``adapters``
            is ``None``).
        adapters: names (``"0.weight"``) to :class:`~lora_func.LoRA`.
        inputs: the model's input: a tensor, or a tuple of positional arguments.

    Returns:
        ``max |merged(inputs) - unmerged(inputs)|`` over every output tensor, as a float.

    Raises:
        ValueError: if there are no adapters, or they do not fit the model.
        TypeError: if ``model`` is not an ``nn.Module`` or ``adapters`` not a mapping of
            :class:`~lora_func.LoRA`.

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16)
        >>> _ = lora_func.apply_lora(model[0], r=4, init="gaussian")
        >>> x = torch.randn(8, 64, dtype=torch.bfloat16)
        >>> lora_func.merge_error(model, inputs=x) >= 0.0
        True
    """
    where = "merge_error(model, adapters, inputs)"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if adapters is not None and not isinstance(adapters, Mapping):
        raise TypeError(f"{where}: adapters must be a mapping of names to LoRA, got {type(adapters).__name__}")
    wrong = {k: type(v).__name__ for k, v in (adapters or {}).items() if not isinstance(v, LoRA)}
    if wrong:
        raise TypeError(f"{where}: adapters must map names to lora_func.LoRA; got {wrong}")
    plain = model
    if _lora_modules(model):
        if adapters is None:
            adapters = get_adapters(model)
        plain = copy.deepcopy(model)
        for sub, pname, _ in _lora_modules(plain).values():
            remove_lora(sub, pname, merge=False)
    if not adapters:
        raise ValueError(f"{where}: no adapters: give adapters, or a model prepared with apply_lora")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    params = base_params(plain)
    _check(adapters, params, where, missing=False, dtypes=False)  # names and shapes, before any forward
    with torch.no_grad():
        merged = functional_call(plain, effective_params(params, adapters), args)
        unmerged = functional_call(plain, lora_params(params, adapters, mode="factored"), args)
    worst = 0.0
    for a, b in zip(torch_pytree.tree_leaves(merged), torch_pytree.tree_leaves(unmerged), strict=True):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel():
            worst = max(worst, float((a.double() - b.double()).abs().max()))
    return worst
