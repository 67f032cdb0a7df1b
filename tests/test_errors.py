"""Bad input: every public function refuses it with a clear error and changes nothing.

The catalogue feeds each public function wrong shapes, bad ranks and alphas, unknown init
names, bases and adapters on different devices ("meta" stands in for a second device on a
CPU-only machine) or in dtypes that cannot be combined, misspelt parameter names, leaves
that are not tensors, stacks of adapters of different ranks, and the double apply / missing
remove cases. Each must raise ``ValueError`` or ``TypeError`` with a message that names the
function and the argument, and leave every module and adapter exactly as it was: every
tensor bit for bit, every ``requires_grad`` flag, the parameter objects themselves, the
module's class and its parametrizations.

A hypothesis test then calls the public API with random arguments: the only exceptions
allowed are the documented ones.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lora_func

from .conftest import requires_cuda, to_device

# --- the world every case runs against -------------------------------------------------------


def world(device: str) -> dict[str, Any]:
    """Fresh modules and adapters on ``device``: a plain model, a model with LoRA, and adapters for them.

    Everything is drawn on the CPU (a CPU generator, the CPU global RNG) and then moved, so the
    values are the same on every device.
    """
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(4, 2, 3))
    with_lora = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    lora_func.apply_lora(with_lora[0], r=2, init="gaussian")
    with_lora[2].weight.requires_grad_(False)  # a frozen plain weight: its flag must survive too
    ints = nn.Linear(3, 4)
    ints.weight = nn.Parameter(torch.arange(12).reshape(4, 3), requires_grad=False)
    adapters = to_device(lora_func.init_adapters(plain, "*.weight", r=2, init="gaussian", generator=g), device)
    lo = lora_func.init((4, 3), r=2, alpha=4.0, init="gaussian", generator=g)
    A = lora_func.init((4, 3), r=2, init="gaussian", generator=g).A
    lo = to_device(lo, device).replace(A=A.to(device).requires_grad_())  # a leaf on the device, whose flag can change
    return {
        "plain": plain.to(device),
        "with_lora": with_lora.to(device),
        "ints": ints.to(device),
        "adapters": adapters,
        "lo": lo,
        "r3": to_device(lora_func.init((4, 3), r=3, init="gaussian", generator=g), device),
        "stacked": lora_func.stack([lo, lo]),
        "meta": lora_func.LoRA(lo.A.detach().to("meta"), lo.B.to("meta"), lo.scaling.to("meta"), lo.shape),
        "leafless": torch_pytree.tree_map(lambda _: 1, lo),
        "W": torch.randn(4, 3, generator=g).to(device),
        "Wc": torch.randn(2, 4, 3, generator=g).to(device),
    }


def _dev(w: dict[str, Any]) -> torch.device:
    """The device the world ``w`` lives on."""
    return w["W"].device


def _dev_re(device: str | torch.device) -> str:
    """A pattern for ``device`` as messages print it: ``cpu``; ``cuda`` or ``cuda:0`` for the first GPU."""
    d = torch.device(device)
    if d.type == "cpu":
        return "cpu"
    return re.escape(d.type) + (rf"(:{d.index})?" if d.index is not None else r"(:\d+)?")


def _bits(t: torch.Tensor) -> Any:
    """The tensor's identity, metadata and exact bits (NaN == NaN, -0.0 != 0.0)."""
    meta = (id(t), t.dtype, tuple(t.shape), t.device, t.requires_grad)
    if t.is_meta:
        return meta
    return (*meta, t.detach().contiguous().reshape(-1).view(torch.uint8).clone())


def _module_state(m: nn.Module) -> Any:
    classes = [(name, type(sub), type(sub).forward) for name, sub in m.named_modules()]
    chains = {}
    for name, sub in m.named_modules():
        if torch.nn.utils.parametrize.is_parametrized(sub):
            for pname, chain in sub.parametrizations.items():
                chains[f"{name}.{pname}"] = [(type(p), id(p)) for p in chain]
    tensors = {k: _bits(v) for k, v in m.state_dict(keep_vars=True).items()}
    return classes, chains, tensors


def snapshot(w: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in w.items():
        if isinstance(value, nn.Module):
            out[key] = _module_state(value)
        else:
            leaves, spec = torch_pytree.tree_flatten(value)
            out[key] = (spec, [_bits(x) if isinstance(x, torch.Tensor) else x for x in leaves])
    return out


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        _assert_equal(before[key], after[key], key)


def _assert_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} changed"
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where} changed"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where} changed keys"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, f"{where} changed: {a!r} -> {b!r}"


# --- the catalogue ---------------------------------------------------------------------------

V, T = ValueError, TypeError
nan, inf = math.nan, math.inf
Case = tuple[str, Callable[[dict[str, Any]], Any], type[Exception], str]


def _corrupt_file(w: dict[str, Any]) -> str:
    path = os.path.join(tempfile.mkdtemp(), "bad.safetensors")
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    return path


def _peft_dir(config: dict[str, Any]) -> str:
    import json

    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(b"")
    return folder


CASES: list[Case] = [
    # init: shapes, r, alpha, init names, dtypes, devices
    ("init-shape-1d", lambda w: lora_func.init((4,)), V, r"init: unsupported weight shape \(4,\)"),
    ("init-shape-6d", lambda w: lora_func.init((2,) * 6), V, r"init: unsupported weight shape"),
    ("init-shape-zero", lambda w: lora_func.init((4, 0)), V, r"init: weight shape must have positive"),
    ("init-shape-str", lambda w: lora_func.init("ab"), T, r"init: weight shape must be a sequence of ints"),
    ("init-r0", lambda w: lora_func.init((4, 3), r=0), V, r"init: r must be a positive int, got 0"),
    ("init-r-neg", lambda w: lora_func.init((4, 3), r=-2), V, r"init: r must be a positive int, got -2"),
    ("init-r-float", lambda w: lora_func.init((4, 3), r=2.5), T, r"init: r must be a positive int, got 2.5"),
    ("init-r-bool", lambda w: lora_func.init((4, 3), r=True), T, r"init: r must be a positive int, got True"),
    ("init-alpha-nan", lambda w: lora_func.init((4, 3), alpha=nan), V, r"init: alpha must be a finite number"),
    ("init-alpha-inf", lambda w: lora_func.init((4, 3), alpha=-inf), V, r"init: alpha must be a finite number"),
    ("init-alpha-str", lambda w: lora_func.init((4, 3), alpha="8"), T, r"init: alpha must be a finite number"),
    ("init-name", lambda w: lora_func.init((4, 3), init="kaiming"), V, r"init: unknown init 'kaiming'"),
    ("init-dtype-int", lambda w: lora_func.init((4, 3), dtype=torch.int64), T, r"init: dtype must be"),
    ("init-dtype-str", lambda w: lora_func.init((4, 3), dtype="float32"), T, r"init: dtype must be"),
    ("init-device", lambda w: lora_func.init((4, 3), device="nowhere"), V, r"init: device 'nowhere' is not"),
    # LoRA: the node's own checks
    ("LoRA-A-list", lambda w: lora_func.LoRA([[1.0]], w["lo"].B, 1.0, (4, 3)), T, r"LoRA: A must be a torch"),
    ("LoRA-A-int", lambda w: lora_func.LoRA(w["lo"].A.long(), w["lo"].B, 1.0, (4, 3)), T, r"LoRA: A must have a"),
    ("LoRA-devices", lambda w: lora_func.LoRA(w["lo"].A, w["meta"].B, 1.0, (4, 3)), V, r"LoRA: A is on <dev> but B"),
    ("LoRA-scaling-nan", lambda w: lora_func.LoRA(w["lo"].A, w["lo"].B, nan, (4, 3)), V, r"LoRA: scaling must be"),
    ("LoRA-scaling-str", lambda w: lora_func.LoRA(w["lo"].A, w["lo"].B, "1", (4, 3)), T, r"LoRA: scaling must be"),
    ("LoRA-rank", lambda w: lora_func.LoRA(w["lo"].A, w["r3"].B, 1.0, (4, 3)), V, r"LoRA: A .* has rank 2 but B"),
    ("LoRA-shape", lambda w: lora_func.LoRA(w["lo"].A, w["lo"].B, 1.0, (3, 4)), V, r"LoRA: factors .* do not fit"),
    ("replace-field", lambda w: w["lo"].replace(C=1), T, r"LoRA.replace: unknown field"),
    # delta / merge
    ("delta-not-lora", lambda w: lora_func.delta(w["W"]), T, r"delta\(lora\): lora must be a lora_func.LoRA"),
    ("delta-leaves", lambda w: lora_func.delta(w["leafless"]), T, r"delta\(lora\): lora's leaves must be tensors"),
    ("merge-base-list", lambda w: lora_func.merge([1.0], w["lo"]), T, r"merge\(base, lora\): base must be a torch"),
    ("merge-shape", lambda w: lora_func.merge(w["W"].T, w["lo"]), V, r"merge\(base, lora\): base has shape \(3, 4\)"),
    ("merge-int", lambda w: lora_func.merge(w["W"].long(), w["lo"]), T, r"merge\(base, lora\): base must have a"),
    ("merge-bool", lambda w: lora_func.merge(w["W"] > 0, w["lo"]), T, r"merge\(base, lora\): base must have a"),
    ("merge-device", lambda w: lora_func.merge(w["W"], w["meta"]), V, r"merge\(base, lora\): base is on <dev> but"),
    ("merge-leaves", lambda w: lora_func.merge(w["W"], w["leafless"]), T, r"merge\(base, lora\): lora's leaves"),
    (
        "merge-finite",
        lambda w: lora_func.merge(w["W"] * inf, w["lo"], check_finite=True),
        V,
        r"merge\(base, lora\): the merged weight has 12 non-finite",
    ),
    (
        "merge-finite-type",
        lambda w: lora_func.merge(w["W"], w["lo"], check_finite=torch.tensor([], device=_dev(w))),
        T,
        r"merge\(base, lora\): check_finite must be a bool",
    ),
    # init_adapters
    ("ia-params-none", lambda w: lora_func.init_adapters({"w": None}, "w"), T, r"init_adapters: module_or_params must"),
    ("ia-module", lambda w: lora_func.init_adapters(3, "*"), T, r"init_adapters: module_or_params must be"),
    ("ia-misspelt", lambda w: lora_func.init_adapters(w["plain"], "0.wieght"), V, r"targets \['0.wieght'\] match no"),
    ("ia-empty", lambda w: lora_func.init_adapters(w["plain"], []), V, r"init_adapters: targets is empty"),
    ("ia-targets-int", lambda w: lora_func.init_adapters(w["plain"], 3), T, r"init_adapters: targets must be"),
    ("ia-bias", lambda w: lora_func.init_adapters(w["plain"], "*"), V, r"init_adapters: targets match parameters"),
    ("ia-r0", lambda w: lora_func.init_adapters(w["plain"], "*.weight", r=0), V, r"init_adapters: r must be"),
    ("ia-r-float", lambda w: lora_func.init_adapters(w["plain"], "*.weight", r=2.5), T, r"init_adapters: r must"),
    ("ia-alpha", lambda w: lora_func.init_adapters(w["plain"], "*.weight", alpha=inf), V, r"init_adapters: alpha"),
    ("ia-init", lambda w: lora_func.init_adapters(w["plain"], "*.weight", init="he"), V, r"init_adapters: unknown"),
    # effective_params and lora_params: names, shapes, devices, dtypes, leaves
    *[
        case
        for fn, tag in ((lora_func.effective_params, "effective_params"), (lora_func.lora_params, "lora_params"))
        for case in (
            (
                f"{tag}-misspelt",
                lambda w, fn=fn: fn(lora_func.base_params(w["plain"]), {"0.wieght": w["adapters"]["0.weight"]}),
                V,
                rf"{tag}\(params, adapters\): adapters \['0.wieght'\] name no parameter",
            ),
            (
                f"{tag}-shape",
                lambda w, fn=fn: fn(lora_func.base_params(w["plain"]), {"2.weight": w["lo"]}),
                V,
                rf"{tag}\(params, adapters\): adapter '2.weight'",
            ),
            (
                f"{tag}-device",
                lambda w, fn=fn: fn({"w": w["W"].to("meta")}, {"w": w["lo"]}),
                V,
                rf"{tag}\(params, adapters\): adapter 'w': .*base is on meta",
            ),
            (
                f"{tag}-int",
                lambda w, fn=fn: fn({"w": w["W"].long()}, {"w": w["lo"]}),
                T,
                rf"{tag}\(params, adapters\): adapter 'w': .*floating-point",
            ),
            (
                f"{tag}-leaves",
                lambda w, fn=fn: fn({"w": w["W"]}, {"w": w["leafless"]}),
                T,
                rf"{tag}\(params, adapters\): adapters \['w'\] have leaves that are not tensors",
            ),
            (
                f"{tag}-not-lora",
                lambda w, fn=fn: fn({"w": w["W"]}, {"w": w["W"]}),
                T,
                rf"{tag}\(params, adapters\): adapters must map names to lora_func.LoRA",
            ),
            (
                f"{tag}-params-none",
                lambda w, fn=fn: fn({"w": None}, {"w": w["lo"]}),
                T,
                rf"{tag}\(params, adapters\): params must hold tensors where adapters apply",
            ),
            (
                f"{tag}-params",
                lambda w, fn=fn: fn([w["W"]], {"w": w["lo"]}),
                T,
                rf"{tag}\(params, adapters\): params must be a mapping",
            ),
        )
    ],
    (
        "lora_params-mode",
        lambda w: lora_func.lora_params({"w": w["W"]}, {"w": w["lo"]}, mode="fast"),
        V,
        r"lora_params\(params, adapters\): unknown mode 'fast'",
    ),
    (
        "lora_params-stacked",
        lambda w: lora_func.lora_params({"w": w["W"]}, {"w": w["stacked"]}),
        V,
        r"lora_params\(params, adapters\): adapter 'w': .*batch dimensions",
    ),
    # LoRAWeight
    ("LW-base", lambda w: lora_func.LoRAWeight([1.0], w["lo"]), T, r"LoRAWeight\(base, lora\): base must be a"),
    ("LW-lora", lambda w: lora_func.LoRAWeight(w["W"], w["W"]), T, r"LoRAWeight\(base, lora\): lora must be a"),
    ("LW-missing", lambda w: lora_func.LoRAWeight(w["W"]), T, r"LoRAWeight\(base, lora\): lora is missing"),
    ("LW-mode", lambda w: lora_func.LoRAWeight(w["W"], w["lo"], "fast"), V, r"LoRAWeight\(base, lora\): unknown mode"),
    ("LW-shape", lambda w: lora_func.LoRAWeight(w["W"].T, w["lo"]), V, r"LoRAWeight\(base, lora\): base has shape"),
    ("LW-int", lambda w: lora_func.LoRAWeight(w["W"].long(), w["lo"]), T, r"LoRAWeight\(base, lora\): base must have"),
    ("LW-device", lambda w: lora_func.LoRAWeight(w["W"], w["meta"]), V, r"LoRAWeight\(base, lora\): base is on <dev>"),
    ("LW-leaves", lambda w: lora_func.LoRAWeight(w["W"], w["leafless"]), T, r"LoRAWeight\(base, lora\): A and B must"),
    ("LW-stacked", lambda w: lora_func.LoRAWeight(w["W"], w["stacked"]), V, r"LoRAWeight\(base, lora\): lora has"),
    # stack / unstack
    ("stack-ranks", lambda w: lora_func.stack([w["lo"], w["r3"]]), V, r"stack\(trees\): trees\[1\].* rank 3"),
    (
        "stack-ranks-dict",
        lambda w: lora_func.stack([{"a": w["lo"]}, {"a": w["r3"]}]),
        V,
        r"stack\(trees\): trees\[1\]\['a'\] has weight shape \(4, 3\) and rank 3",
    ),
    ("stack-devices", lambda w: lora_func.stack([w["lo"], w["meta"]]), V, r"stack\(trees\): trees\[1\] has a leaf on"),
    ("stack-empty", lambda w: lora_func.stack([]), V, r"stack\(trees\): trees must be a non-empty"),
    ("stack-single", lambda w: lora_func.stack(w["lo"]), V, r"stack\(trees\): trees must be a non-empty"),
    ("stack-leaves", lambda w: lora_func.stack([w["lo"], w["leafless"]]), T, r"stack\(trees\): trees\[1\] has a leaf"),
    (
        "stack-structure",
        lambda w: lora_func.stack([{"a": w["lo"]}, {"b": w["lo"]}]),
        V,
        r"stack\(trees\): trees\[1\] does not have the structure",
    ),
    ("unstack-0d", lambda w: lora_func.unstack(w["lo"]), V, r"unstack\(tree\): a leaf is 0-d"),
    ("unstack-empty", lambda w: lora_func.unstack({}), V, r"unstack\(tree\): tree has no leaves"),
    ("unstack-leaves", lambda w: lora_func.unstack([1, 2]), T, r"unstack\(tree\): leaves must be tensors"),
    # arithmetic
    ("scale-nan", lambda w: lora_func.scale(w["lo"], nan), V, r"scale\(lora, c\): c must be a finite number"),
    ("scale-str", lambda w: lora_func.scale(w["lo"], "2"), T, r"scale\(lora, c\): c must be a real number"),
    ("scale-bool", lambda w: lora_func.scale(w["lo"], True), T, r"scale\(lora, c\): c must be a real number"),
    (
        "scale-shape",
        lambda w: lora_func.scale(w["lo"], torch.ones(3, device=_dev(w))),
        V,
        r"scale\(lora, c\): c of shape \(3,\)",
    ),
    ("scale-meta", lambda w: lora_func.scale(w["lo"], torch.tensor(2.0, device="meta")), V, r"scale\(lora, c\): c"),
    ("scale-leaves", lambda w: lora_func.scale(w["leafless"], 2.0), T, r"scale\(lora, c\): lora has an adapter"),
    ("scale-tree", lambda w: lora_func.scale({"a": 1}, 2.0), T, r"scale\(lora, c\): lora must be a lora_func.LoRA"),
    ("add-shapes", lambda w: lora_func.add(w["lo"], w["adapters"]["2.weight"]), V, r"add\(a, b\): a was made for"),
    ("add-devices", lambda w: lora_func.add(w["lo"], w["meta"]), V, r"add\(a, b\): a is on <dev> but b on meta"),
    ("add-leaves", lambda w: lora_func.add(w["lo"], w["leafless"]), T, r"add\(a, b\): b has an adapter"),
    ("add-structure", lambda w: lora_func.add({"x": w["lo"]}, {"y": w["lo"]}), V, r"add\(a, b\): a and b must have"),
    ("truncate-r0", lambda w: lora_func.truncate(w["lo"], 0), V, r"truncate\(lora, r\): r must be a positive int"),
    ("truncate-float", lambda w: lora_func.truncate(w["lo"], 2.5), T, r"truncate\(lora, r\): r must be a positive"),
    ("truncate-bool", lambda w: lora_func.truncate(w["lo"], True), T, r"truncate\(lora, r\): r must be a positive"),
    ("truncate-leaves", lambda w: lora_func.truncate(w["leafless"], 1), T, r"truncate\(lora, r\): lora has an"),
    ("ws-len", lambda w: lora_func.weighted_sum(w["stacked"], [1.0]), V, r"weighted_sum\(stacked, weights\): weights"),
    ("ws-str", lambda w: lora_func.weighted_sum(w["stacked"], "ab"), T, r"weighted_sum\(stacked, weights\): weights"),
    ("ws-single", lambda w: lora_func.weighted_sum(w["lo"], [1.0]), V, r"weighted_sum\(stacked, weights\): stacked"),
    ("ws-rank", lambda w: lora_func.weighted_sum(w["stacked"], [1.0, 2.0], rank=0), V, r"weighted_sum.* r must be"),
    ("ws-nan", lambda w: lora_func.weighted_sum(w["stacked"], [1.0, math.nan]), V, r"weighted_sum.*must be finite"),
    ("ws-inf", lambda w: lora_func.weighted_sum(w["stacked"], [-math.inf, 1]), V, r"weighted_sum.*must be finite"),
    ("mean-single", lambda w: lora_func.mean(w["lo"]), V, r"mean\(stacked\): stacked must have a leading K"),
    # files
    ("save-meta", lambda w: lora_func.save(w["meta"], "unused"), V, r"save\(adapters, path\): adapters is on the meta"),
    ("save-leaves", lambda w: lora_func.save(w["leafless"], "x"), T, r"save\(adapters, path\): adapters has leaves"),
    ("save-type", lambda w: lora_func.save([w["lo"]], "x"), T, r"save\(adapters, path\): adapters must be a"),
    (
        "save-metadata",
        lambda w: lora_func.save(w["lo"], "x", metadata={"t": object()}),
        T,
        r"save\(adapters, path\): metadata must hold only JSON",
    ),
    ("load-corrupt", lambda w: lora_func.load(_corrupt_file(w)), V, r"load\(path\): .* is not a readable safetensors"),
    ("load-device", lambda w: lora_func.load(_corrupt_file(w), device="gpu9"), V, r"load\(path\): device 'gpu9'"),
    ("check-misspelt", lambda w: lora_func.check({"0.wieght": w["lo"]}, w["plain"]), V, r"check\(adapters, module_or"),
    (
        "check-shape",
        lambda w: lora_func.check({"2.weight": w["lo"]}, w["plain"], targets="2.weight"),
        V,
        r"check\(adapters, module_or_params\): adapters\['2.weight'\] is for shape",
    ),
    ("check-leaves", lambda w: lora_func.check({"0.weight": w["leafless"]}, w["plain"]), T, r"check\(.*leaves"),
    # the stateful layer
    ("LP-shape", lambda w: lora_func.LoRAParam((4,), device=_dev(w)), V, r"LoRAParam: unsupported weight shape \(4,\)"),
    ("LP-r0", lambda w: lora_func.LoRAParam((4, 3), r=0, device=_dev(w)), V, r"LoRAParam: r must be a positive int"),
    ("LP-r-float", lambda w: lora_func.LoRAParam((4, 3), r=2.5, device=_dev(w)), T, r"LoRAParam: r must be a positive"),
    ("LP-alpha", lambda w: lora_func.LoRAParam((4, 3), alpha=nan, device=_dev(w)), V, r"LoRAParam: alpha must be"),
    ("LP-init", lambda w: lora_func.LoRAParam((4, 3), init="xavier", device=_dev(w)), V, r"LoRAParam: unknown init"),
    ("LP-dtype", lambda w: lora_func.LoRAParam((4, 3), device=_dev(w), dtype=torch.int32), T, r"LoRAParam: dtype must"),
    ("LP-device", lambda w: lora_func.LoRAParam((4, 3), device="gpu9"), V, r"LoRAParam: device 'gpu9' is not"),
    (
        "LP-forward-shape",
        lambda w: w["with_lora"][0].parametrizations.weight[0](w["W"].T),
        V,
        r"LoRAParam.forward\(W_base\): W_base has shape \(3, 4\)",
    ),
    (
        "LP-forward-int",
        lambda w: w["with_lora"][0].parametrizations.weight[0](w["W"].long()),
        T,
        r"LoRAParam.forward\(W_base\): W_base must be a floating-point",
    ),
    (
        "LP-forward-device",
        lambda w: w["with_lora"][0].parametrizations.weight[0](w["W"].to("meta")),
        V,
        r"LoRAParam.forward\(W_base\): W_base has shape \(4, 3\) on meta",
    ),
    (
        "apply-twice",
        lambda w: lora_func.apply_lora(w["with_lora"][0]),
        V,
        r"apply_lora\(module, 'weight'\): weight already has a LoRA parametrization; call remove_lora",
    ),
    (
        "apply-misspelt",
        lambda w: lora_func.apply_lora(w["plain"][0], "wieght"),
        V,
        r"apply_lora.*no parameter 'wieght'",
    ),
    ("apply-module", lambda w: lora_func.apply_lora(w["lo"]), T, r"apply_lora.*module must be an nn.Module"),
    ("apply-name-int", lambda w: lora_func.apply_lora(w["plain"][0], 0), T, r"apply_lora.*param_name must be a str"),
    ("apply-bias", lambda w: lora_func.apply_lora(w["plain"][0], "bias"), V, r"apply_lora.*unsupported weight shape"),
    ("apply-r0", lambda w: lora_func.apply_lora(w["plain"][0], r=0), V, r"apply_lora.*r must be a positive int"),
    ("apply-r-float", lambda w: lora_func.apply_lora(w["plain"][0], r=2.5), T, r"apply_lora.*r must be a positive"),
    ("apply-r-bool", lambda w: lora_func.apply_lora(w["plain"][0], r=True), T, r"apply_lora.*r must be a positive"),
    ("apply-alpha", lambda w: lora_func.apply_lora(w["plain"][0], alpha=inf), V, r"apply_lora.*alpha must be a finite"),
    ("apply-init", lambda w: lora_func.apply_lora(w["plain"][0], init="he"), V, r"apply_lora.*unknown init 'he'"),
    ("apply-int", lambda w: lora_func.apply_lora(w["ints"]), T, r"apply_lora\(module, 'weight'\): weight has dtype"),
    ("apply-device", lambda w: lora_func.apply_lora(w["plain"][0], device="meta"), V, r"apply_lora.*device meta"),
    ("apply-device-bad", lambda w: lora_func.apply_lora(w["plain"][0], device="gpu9"), V, r"apply_lora.*device 'gpu9'"),
    (
        "remove-missing",
        lambda w: lora_func.remove_lora(w["plain"][0]),
        V,
        r"remove_lora\(module, 'weight'\): weight has no LoRA parametrization",
    ),
    ("remove-misspelt", lambda w: lora_func.remove_lora(w["with_lora"][0], "wieght"), V, r"remove_lora.*'wieght'"),
    (
        "remove-finite-type",
        lambda w: lora_func.remove_lora(w["with_lora"][0], check_finite=None),
        T,
        r"remove_lora\(module, 'weight'\): check_finite must be a bool",
    ),
    (
        "check-dtypes",
        lambda w: lora_func.check({}, w["plain"], dtypes=torch.ones(2, device=_dev(w))),
        T,
        r"check\(.*dtypes must be",
    ),
    ("check-params", lambda w: lora_func.check({"w": w["lo"]}, {"w": None}), T, r"check\(.*must map names to tensors"),
    ("remove-merge", lambda w: lora_func.remove_lora(w["with_lora"][0], merge="yes"), T, r"remove_lora.*merge must"),
    (
        "remove-finite",
        lambda w: (
            w["with_lora"][0].parametrizations.weight[0].__setattr__("scaling", inf),
            lora_func.remove_lora(w["with_lora"][0], check_finite=True),
        ),
        V,
        r"remove_lora\(module, 'weight'\): the merged weight has .* non-finite",
    ),
    (
        "set-misspelt",
        lambda w: lora_func.set_adapters(w["plain"], {"0.wieght": w["lo"], "0.weight": w["lo"]}),
        V,
        r"set_adapters\(module, adapters\): adapters\['0.wieght'\] names no parameter",
    ),
    (
        "set-shape",
        lambda w: lora_func.set_adapters(w["plain"], {"0.weight": w["lo"], "2.weight": w["lo"]}),
        V,
        r"set_adapters\(module, adapters\): adapters\['2.weight'\] is for shape",
    ),
    (
        "set-rank",
        lambda w: lora_func.set_adapters(w["with_lora"], {"0.weight": w["r3"]}),
        V,
        r"set_adapters\(module, adapters\): adapters\['0.weight'\] has rank 3",
    ),
    (
        "set-stacked",
        lambda w: lora_func.set_adapters(w["plain"], {"0.weight": w["stacked"]}),
        V,
        r"set_adapters\(module, adapters\): adapters\['0.weight'\] is a stack",
    ),
    (
        "set-meta",
        lambda w: lora_func.set_adapters(w["plain"], {"0.weight": w["meta"]}),
        V,
        r"set_adapters\(module, adapters\): adapters\['0.weight'\] is on the meta device",
    ),
    (
        "set-scaling",
        lambda w: lora_func.set_adapters(
            w["plain"], {"0.weight": w["lo"].replace(scaling=torch.tensor(nan, device=_dev(w)))}
        ),
        V,
        r"set_adapters\(module, adapters\): adapters\['0.weight'\] has non-finite scaling",
    ),
    (
        "set-leaves",
        lambda w: lora_func.set_adapters(w["plain"], {"0.weight": w["leafless"]}),
        T,
        r"set_adapters\(module, adapters\): adapters\['0.weight'\] has leaves that are not tensors",
    ),
    ("set-type", lambda w: lora_func.set_adapters(w["plain"], [w["lo"]]), T, r"set_adapters.*adapters must be a"),
    ("set-module", lambda w: lora_func.set_adapters(3, {}), T, r"set_adapters.*module must be an nn.Module"),
    ("get-module", lambda w: lora_func.get_adapters(w["lo"]), T, r"get_adapters\(module\): module must be"),
    ("base-module", lambda w: lora_func.base_params({}), T, r"base_params\(module\): module must be"),
    (
        "mp-no-lora",
        lambda w: lora_func.module_params(w["with_lora"], {"2.weight": w["adapters"]["0.weight"]}),
        V,
        r"module_params\(module, adapters\): adapters\['2.weight'\] names no weight with LoRA",
    ),
    (
        "mp-rank",
        lambda w: lora_func.module_params(w["with_lora"], {"0.weight": w["r3"]}),
        V,
        r"module_params\(module, adapters\): adapters\['0.weight'\] has shape \(4, 3\) and rank 3",
    ),
    ("mp-type", lambda w: lora_func.module_params(w["with_lora"], {"0.weight": 1}), T, r"module_params.*must be a"),
    # interop and distributed
    ("fsd-empty", lambda w: lora_func.from_state_dict({}), V, r"from_state_dict.*holds no LoRA"),
    ("fsd-type", lambda w: lora_func.from_state_dict([1]), T, r"from_state_dict.*state_dict must be a mapping"),
    ("tsd-stacked", lambda w: lora_func.to_state_dict({"0.weight": w["stacked"]}), V, r"to_state_dict.*is stacked"),
    ("tsd-type", lambda w: lora_func.to_state_dict([w["lo"]]), T, r"to_state_dict.*adapters must be a mapping"),
    (
        "export-name",
        lambda w: lora_func.export_peft({"0.bias": w["lo"]}, tempfile.mkdtemp()),
        V,
        r"export_peft.*names must end in '.weight'",
    ),
    (
        "import-config",
        lambda w: lora_func.import_peft(_peft_dir({"peft_type": "IA3"})),
        V,
        r"import_peft.*is not a PEFT LoRA config",
    ),
    (  # the device is checked first: this folder holds no files at all
        "import-device",
        lambda w: lora_func.import_peft(tempfile.mkdtemp(), device="gpu0"),
        V,
        r"import_peft\(directory\): device 'gpu0' is not a valid, available torch device",
    ),
    ("meta-corrupt", lambda w: lora_func.load_metadata(_corrupt_file(w)), V, r"load_metadata\(path\): .* not a"),
    ("ep-type", lambda w: lora_func.effective_params({"w": w["W"]}, [w["lo"]]), T, r"effective_params.*adapters must"),
    ("arg-op", lambda w: lora_func.all_reduce_grads(w["adapters"], op="max"), V, r"all_reduce_grads: op must be"),
    ("save-path", lambda w: lora_func.save(w["adapters"], 3), T, r"save\(adapters, path\): path must be a str"),
    ("load-path", lambda w: lora_func.load(None), T, r"load\(path\): path must be a str"),
    # --- training many adapters, merge_error
    ("stack-seeds", lambda w: lora_func.init_stack(w["plain"], "*.weight", seeds=[]), V, r"init_stack: seeds must be"),
    ("stack-seed-f", lambda w: lora_func.init_stack(w["plain"], "*.weight", seeds=[1.0]), T, r"init_stack: seeds must"),
    (
        "stack-alphas",
        lambda w: lora_func.init_stack(w["plain"], "*.weight", seeds=[1, 2], alphas=[1.0]),
        V,
        r"init_stack: alphas has 1 values but there are 2 seeds",
    ),
    ("stack-target", lambda w: lora_func.init_stack(w["plain"], "*.wieght", seeds=[1]), V, r"targets .* match no"),
    ("pick-range", lambda w: lora_func.pick(w["stacked"], 5), V, r"pick\(stacked, k\): k=5 is out of range"),
    ("pick-k", lambda w: lora_func.pick(w["stacked"], 1.0), T, r"pick\(stacked, k\): k must be an int"),
    ("pick-flat", lambda w: lora_func.pick(w["lo"], 0), V, r"pick\(stacked, k\): stacked must be"),
    ("clip-flat", lambda w: lora_func.clip_per_adapter(w["adapters"], 1.0), V, r"clip_per_adapter.*not stacked"),
    ("clip-norm", lambda w: lora_func.clip_per_adapter(w["stacked"], -1.0), V, r"clip_per_adapter.*max_norm must be"),
    ("norms-none", lambda w: lora_func.adapter_norms({"x": w["W"]}), V, r"adapter_norms.*holds no lora_func\.LoRA"),
    ("assign-shape", lambda w: lora_func.assign_grads({"a": w["lo"]}, {"a": w["stacked"]}), V, r"a gradient has shape"),
    ("assign-names", lambda w: lora_func.assign_grads({"a": w["lo"]}, {"b": w["lo"]}), V, r"grads holds adapters"),
    ("me-model", lambda w: lora_func.merge_error(w["lo"], None, w["W"]), T, r"merge_error.*model must be an nn"),
    (
        "me-none",
        lambda w: lora_func.merge_error(w["plain"], None, torch.ones(1, 3, device=_dev(w))),
        V,
        r"merge_error.*no adapters",
    ),
    (
        "me-misfit",
        lambda w: lora_func.merge_error(w["plain"], {"2.weight": w["lo"]}, torch.ones(1, 3, device=_dev(w))),
        V,
        r"2\.weight",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "match"), [pytest.param(f, e, m, id=i) for i, f, e, m in CASES])
def test_bad_input_is_refused_and_changes_nothing(
    device: str, fn: Callable[[dict[str, Any]], Any], exc: type[Exception], match: str
) -> None:
    w = world(device)
    before = snapshot(w)
    with pytest.raises(exc, match=match.replace("<dev>", _dev_re(_dev(w)))):
        fn(w)
    assert_same(before, snapshot(w))


@pytest.mark.device_independent("checks the names of the cases; makes no tensors")
def test_catalogue_ids_are_unique() -> None:
    ids = [i for i, *_ in CASES]
    assert len(ids) == len(set(ids))


def test_routing_indices_out_of_range(device: str) -> None:
    w = world(device)
    params = {"w": w["W"]}
    before = snapshot(w)
    with pytest.raises(ValueError, match=r"lora_params.*index"):
        lora_func.lora_params(params, {"w": w["stacked"]}, index=torch.tensor([0, 2], device=device))
    with pytest.raises(ValueError, match=r"lora_params.*index"):
        lora_func.lora_params(params, {"w": w["stacked"]}, index=torch.tensor([-3], device=device))
    with pytest.raises(TypeError, match=r"lora_params.*index"):
        lora_func.lora_params(params, {"w": w["stacked"]}, index=torch.tensor([0.5], device=device))
    with pytest.raises(ValueError, match=r"lora_params.*index must have shape \(batch,\)"):
        lora_func.lora_params(params, {"w": w["stacked"]}, index=torch.tensor([[0]], device=device))
    with pytest.raises(ValueError, match=r"lora_params.*not stacked"):
        lora_func.lora_params(params, {"w": w["lo"]}, index=torch.tensor([0], device=device))
    assert_same(before, snapshot(w))


# --- bases and adapters on two real devices (with CUDA) ------------------------------------------

#: Mismatches between two devices that both hold values. ``w["far"]`` is ``w["lo"]`` and
#: ``w["far_W"]`` is ``w["W"]`` on the other device (the CPU for a world on CUDA, CUDA for one
#: on the CPU); ``<dev>`` and ``<far>`` in a pattern stand for the two devices.
CROSS_DEVICE_CASES: list[Case] = [
    (
        "init-generator",
        lambda w: lora_func.init((4, 3), init="gaussian", device=_dev(w), generator=torch.Generator(_far(w))),
        V,
        r"init: generator is on <far> but the factors are made on <dev>",
    ),
    (
        "init_adapters-generator",
        lambda w: lora_func.init_adapters(w["plain"], "*.weight", init="gaussian", generator=torch.Generator(_far(w))),
        V,
        r"init_adapters: generator is on <far> but the targets are on <dev>",
    ),
    ("LoRA", lambda w: lora_func.LoRA(w["lo"].A, w["far"].B, 1.0, (4, 3)), V, r"LoRA: A is on <dev> but B is on <far>"),
    (
        "merge",
        lambda w: lora_func.merge(w["W"], w["far"]),
        V,
        r"merge\(base, lora\): base is on <dev> but lora is on <far>",
    ),
    *[
        (
            tag,
            lambda w, fn=fn: fn({"w": w["W"]}, {"w": w["far"]}),
            V,
            rf"{tag}\(params, adapters\): adapter 'w': .*base is on <dev>.* on <far>",
        )
        for fn, tag in ((lora_func.effective_params, "effective_params"), (lora_func.lora_params, "lora_params"))
    ],
    (
        "LoRAWeight",
        lambda w: lora_func.LoRAWeight(w["W"], w["far"]),
        V,
        r"LoRAWeight\(base, lora\): base is on <dev>, A on <far>",
    ),
    (
        "stack",
        lambda w: lora_func.stack([w["lo"], w["far"]]),
        V,
        r"stack\(trees\): trees\[1\] has a leaf on <far> but trees\[0\] is on <dev>",
    ),
    ("add", lambda w: lora_func.add(w["lo"], w["far"]), V, r"add\(a, b\): a is on <dev> but b on <far>"),
    (
        "LoRAParam.forward",
        lambda w: w["with_lora"][0].parametrizations.weight[0](w["far_W"]),
        V,
        r"LoRAParam.forward\(W_base\): W_base has shape \(4, 3\) on <far>, but .* on <dev>",
    ),
    (
        "apply_lora",
        lambda w: lora_func.apply_lora(w["plain"][0], device=_far(w)),
        V,
        r"apply_lora\(module, 'weight'\): device <far> differs from the weight's device <dev>",
    ),
    (
        "lora_params-index",
        lambda w: lora_func.lora_params(
            {"w": w["W"]}, {"w": w["stacked"]}, index=torch.tensor([0], device=w["far_W"].device)
        ),
        V,
        r"lora_params\(params, adapters, index=...\): index is on <far> but the weights are on <dev>",
    ),
]


def _far(w: dict[str, Any]) -> str:
    """The other device: ``"cpu"`` for a world on CUDA, ``"cuda"`` for one on the CPU."""
    return "cpu" if _dev(w).type != "cpu" else "cuda"


@requires_cuda
@pytest.mark.parametrize(("fn", "exc", "match"), [pytest.param(f, e, m, id=i) for i, f, e, m in CROSS_DEVICE_CASES])
def test_two_real_devices_are_refused_and_change_nothing(
    device: str, fn: Callable[[dict[str, Any]], Any], exc: type[Exception], match: str
) -> None:
    w = world(device)
    w["far"], w["far_W"] = to_device(w["lo"], _far(w)), w["W"].to(_far(w))
    before = snapshot(w)
    match = match.replace("<dev>", _dev_re(_dev(w))).replace("<far>", _dev_re(w["far_W"].device))
    with pytest.raises(exc, match=match):
        fn(w)
    assert_same(before, snapshot(w))


#: Public names that take no argument that could be wrong (constants, predicates).
NO_BAD_INPUT = {"INITS", "is_lora", "trainable"}


@pytest.mark.device_independent("reads this file's source and lora_func.__all__; makes no tensors")
def test_catalogue_feeds_every_public_function() -> None:
    """Every public function of the modules this catalogue covers has at least one case."""
    import inspect

    text = inspect.getsource(inspect.getmodule(test_catalogue_feeds_every_public_function))  # type: ignore[arg-type]
    covered = {name for name in lora_func.__all__ if f"lora_func.{name}(" in text}
    covered |= {"LoRA"}  # its cases call lora_func.LoRA(...) and .replace
    home = {name: getattr(getattr(lora_func, name), "__module__", "") for name in lora_func.__all__}
    ours = {n for n, mod in home.items() if mod.rsplit(".", 1)[-1] in MODULES}
    missing = sorted(ours - covered - NO_BAD_INPUT)
    assert not missing, f"public functions without a bad-input case: {missing}"


#: The modules whose public functions the catalogue covers (newer modules bring their own error tests).
MODULES = {
    "_tree", "_math", "_targets", "_weight", "_arith", "_files", "_stateful", "_bridge", "_peft", "_dist", "_train",
    "_merge_error",
}  # fmt: skip


def test_snapshot_sees_every_kind_of_change(device: str) -> None:
    """The comparison above can fail: each kind of change it must catch, it catches."""
    changes: list[Callable[[dict[str, Any]], Any]] = [
        lambda w: w["W"].view(-1)[0].neg_(),  # one value
        lambda w: w["Wc"].copy_(
            torch.where(w["Wc"] == 0, -0.0, w["Wc"]).nextafter(torch.full_like(w["Wc"], inf))
        ),  # 1 ulp
        lambda w: w["lo"].B.view(-1)[3].fill_(nan),  # NaN in an adapter
        lambda w: w["lo"].A.requires_grad_(False),  # a flag
        lambda w: w["plain"][0].weight.requires_grad_(False),
        lambda w: lora_func.apply_lora(w["plain"][0]),  # class and parametrizations
        lambda w: lora_func.remove_lora(w["with_lora"][0], merge=False),
        lambda w: setattr(w["plain"][0], "weight", nn.Parameter(w["plain"][0].weight.detach().clone())),
        lambda w: w["adapters"].pop("0.weight"),  # structure
        lambda w: w["with_lora"][0].parametrizations.weight[0].A.data.zero_(),
    ]
    for i, change in enumerate(changes):
        w = world(device)
        before = snapshot(w)
        change(w)
        with pytest.raises(AssertionError):
            assert_same(before, snapshot(w))
        assert_same(snapshot(w), snapshot(w)), f"change {i}: a snapshot differs from itself"


# --- fuzzing the public API ------------------------------------------------------------------

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool]


@st.composite
def _tensors(draw: st.DrawFn, device: str) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    dtype = draw(st.sampled_from(_DTYPES))
    fill = draw(st.sampled_from([0.0, 1.0, -2.5, nan, inf]))
    t = torch.full(shape, fill, device=device) if dtype.is_floating_point else torch.ones(shape, device=device)
    return t.to(dtype)


@st.composite
def _loras(draw: st.DrawFn, device: str) -> lora_func.LoRA:
    shape = draw(st.sampled_from([(4, 3), (2, 3), (4, 2, 3), (2, 2, 2, 2), (3, 1, 1, 1, 2)]))
    r = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    alpha = draw(st.sampled_from([1.0, 8.0]))
    lo = lora_func.init(shape, r=r, alpha=alpha, init="gaussian", dtype=dtype, device=device)
    return lora_func.stack([lo, lo]) if draw(st.booleans()) else lo


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 9),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=6),
    st.sampled_from(["*.weight", "weight", "0.weight", "kaimingA_zeroB", "zeros", "auto", "factored", "cpu", "meta"]),
    st.sampled_from(_DTYPES),
    st.just(torch.device("meta")),
)


@functools.cache
def _anything(device: str) -> st.SearchStrategy[Any]:
    """Junk arguments; the tensors and adapters among them are on ``device``, like the valid ones."""
    leaves = st.one_of(_scalars, _tensors(device), _loras(device), st.tuples(st.integers(-1, 5), st.integers(-1, 5)))
    return st.one_of(
        leaves,
        st.lists(leaves, max_size=3),
        st.dictionaries(st.sampled_from(["0.weight", "weight", "2.weight", "w", "bias", ""]), leaves, max_size=3),
    )


def _module() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _good(name: str, module: nn.Module, folder: str, device: str) -> tuple[list[Any], dict[str, Any]]:
    """A valid call of ``name`` on ``device`` (the fuzzer then replaces some of its arguments)."""
    lo = lora_func.init((4, 3), r=2, init="gaussian", device=device)
    stacked = lora_func.stack([lo, lo])
    params = lora_func.base_params(module)
    path = os.path.join(folder, "a.safetensors")
    lora_func.save({"0.weight": lo}, path)
    calls: dict[str, tuple[list[Any], dict[str, Any]]] = {
        "init": ([(4, 3), 2, 8.0, "gaussian"], {"dtype": torch.float64, "device": device}),
        "delta": ([lo], {}),
        "merge": ([params["0.weight"], lo], {"check_finite": True}),
        "init_adapters": ([module, "*.weight"], {"r": 2, "alpha": 4.0, "init": "zeros"}),
        "effective_params": ([params, {"0.weight": lo}], {}),
        "lora_params": ([params, {"0.weight": lo}], {"mode": "factored"}),
        "stack": ([[lo, lo]], {}),
        "unstack": ([stacked], {}),
        "LoRA": ([lo.A, lo.B, 0.5, (4, 3)], {}),
        "LoRAParam": ([(4, 3), 2, 8.0, "zeros", device], {"dtype": torch.float32}),
        "LoRAWeight": ([params["0.weight"], lo, "auto"], {}),
        "apply_lora": ([module[2], "weight", 2, 4.0, "gaussian"], {}),
        "remove_lora": ([module[0], "weight", True], {"check_finite": True}),
        "set_adapters": ([module, {"0.weight": lo}], {}),
        "get_adapters": ([module], {}),
        "module_params": ([module, {"0.weight": lo}], {}),
        "scale": ([{"0.weight": lo}, 2.0], {}),
        "add": ([lo, lo], {}),
        "truncate": ([lo, 1], {}),
        "weighted_sum": ([stacked, [0.5, 0.5]], {"rank": 1}),
        "mean": ([stacked], {"rank": 2}),
        "save": ([{"0.weight": lo}, path], {"metadata": {"step": 1}}),
        "load": ([path], {"device": device}),
        "check": ([{"0.weight": lo}, module], {"targets": "0.weight", "dtypes": True}),
        "base_params": ([module], {}),
    }
    return calls[name]


#: Documented exceptions beyond ValueError/TypeError: file functions may fail on the file system.
EXTRA = {"save": (OSError,), "load": (OSError,)}


@settings(max_examples=1500)
@given(
    data=st.data(),
    name=st.sampled_from(
        sorted(
            [
                "init",
                "delta",
                "merge",
                "init_adapters",
                "effective_params",
                "lora_params",
                "stack",
                "unstack",
                "LoRA",
                "LoRAParam",
                "LoRAWeight",
                "apply_lora",
                "remove_lora",
                "set_adapters",
                "get_adapters",
                "module_params",
                "scale",
                "add",
                "truncate",
                "weighted_sum",
                "mean",
                "save",
                "load",
                "check",
                "base_params",
            ]
        )
    ),
)
def test_fuzz_public_api_raises_only_documented_errors(device: str, data: st.DataObject, name: str) -> None:
    module = _module().to(device)
    lora_func.apply_lora(module[0], r=2, init="gaussian")
    with tempfile.TemporaryDirectory() as folder:
        args, kwargs = _good(name, module, folder, device)
        # Replace some arguments with random values, drop trailing ones, or pass junk keywords.
        for i in data.draw(st.lists(st.integers(0, max(len(args) - 1, 0)), max_size=2), label="replaced"):
            if args:
                args[i] = data.draw(_anything(device), label=f"arg{i}")
        for k in list(kwargs):
            if data.draw(st.booleans(), label=f"replace {k}"):
                kwargs[k] = data.draw(_anything(device), label=k)
        args = args[: data.draw(st.integers(0, len(args)), label="n_args")] if data.draw(st.booleans()) else args
        cwd = os.getcwd()
        os.chdir(folder)  # a random string given as a path writes here, not in the repository
        try:
            getattr(lora_func, name)(*args, **kwargs)
        except (ValueError, TypeError, *EXTRA.get(name, ())):
            pass
        finally:
            os.chdir(cwd)
