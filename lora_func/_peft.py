"""Adapters in other layouts: PEFT's directories (:func:`export_peft`, :func:`import_peft`) and the
state dict of a model prepared with :func:`~lora_func.apply_lora` (:func:`from_state_dict`,
:func:`to_state_dict`).

Layouts, for a weight of shape ``shape`` and an adapter with ``A (r, in_flat)`` and
``B (out, r)`` (``W + scaling * B @ A``):

=====================  ====================================  ====================================
PEFT target            ``lora_A`` (``lora_embedding_A``)     ``lora_B`` (``lora_embedding_B``)
=====================  ====================================  ====================================
Linear                 ``A`` (r, in)                         ``B`` (out, r)
Conv1d/2d/3d           ``A`` as (r, in, kernel...)           ``B`` as (out, r, 1, ...)
Embedding              ``B.T`` (r, num_embeddings)           ``A.T`` (embedding_dim, r)
``fan_in_fan_out``     ``B.T`` (r, in)                       ``A.T`` (out, r)
=====================  ====================================  ====================================

(``fan_in_fan_out`` is for weights stored as ``(in, out)``, such as the ``Conv1D`` of
GPT-2 in ``transformers``.) Every conversion applies the weight update held by the
converted tensors, combined the way PEFT combines them, to random probe vectors and
compares the result with the adapter's own ``scaling * B @ (A @ v)`` before returning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _st_save
from torch import nn

from ._files import _check
from ._math import check_device
from ._tree import LoRA, _scaling_dtype

__all__ = ["export_peft", "from_state_dict", "import_peft", "to_state_dict"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

#: Config fields that only say which modules are targeted, how they train, or where the
#: config came from: they do not change the function an adapter computes.
_NEUTRAL = {
    "auto_mapping", "base_model_name_or_path", "ensure_weight_tying", "exclude_modules", "inference_mode",
    "layers_pattern", "layers_to_transform", "loftq_config", "lora_dropout", "megatron_config", "megatron_core",
    "peft_version", "qalora_group_size", "revision", "runtime_config", "target_modules", "task_type",
}  # fmt: skip
#: Config fields that are read.
_READ = {"peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "bias"}
#: Initialisations that leave the base weights as they are ("orthogonal" draws A and B from
#: orthogonal halves of one basis, so that B @ A = 0); the others, PiSSA, OLoRA, LoftQ, ...,
#: change the base model, which an adapter alone cannot carry.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")


def _verify(lora: LoRA, kind: str, pa: torch.Tensor, pb: torch.Tensor, scaling: float, where: str, name: str) -> None:
    """Checks that PEFT's tensors ``pa``, ``pb`` compute the update ``lora`` computes.

    Not a second copy of the LoRA formula: the right-hand side reads the tensors the way
    PEFT's ``get_delta_weight`` combines them (conv kernels flattened after the output
    channel, the transposed product for embeddings and ``fan_in_fan_out``), in PEFT's
    layout, and both sides act on a few random probe vectors rather than being
    materialised, so the check costs ``O((in + out) * r)`` per weight.
    """
    if kind == "conv":
        shape = (pb.shape[0], *pa.shape[1:])
    elif kind == "linear":
        shape = (pb.shape[0], pa.shape[1])
    else:  # PEFT stores the (in, out) product and transposes it: the weight is (pa's in, pb's out)
        shape = (pa.shape[1], pb.shape[0])
    A, B = lora.A.double(), lora.B.double()
    probe = torch.randn(A.shape[-1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probe = probe.to(A.device)
    ours = float(lora.scaling) * (B @ (A @ probe))
    bound = abs(float(lora.scaling)) * (B.abs() @ (A.abs() @ probe.abs()))
    pa, pb = pa.double().to(A.device), pb.double().to(A.device)
    if kind == "conv":  # delta[o, i, k...] = sum_r pb[o, r, 1...] * pa[r, i, k...]
        theirs = scaling * (pb.flatten(1) @ (pa.flatten(1) @ probe))
    elif kind == "linear":  # delta = pb @ pa
        theirs = scaling * (pb @ (pa @ probe))
    else:  # delta = (pb @ pa).T = pa.T @ pb.T
        theirs = scaling * (pa.T @ (pb.T @ probe))
    # Sums of the same float64 products, possibly in other orders: far below 1e-9 of the
    # sum of their magnitudes (``bound``); a wrong layout is off by the size of the update.
    if tuple(shape) != lora.shape or not bool(((ours - theirs).abs() <= 1e-9 * bound + 1e-300).all()):
        raise ValueError(f"{where}: converting {name!r} changed its weight update; this is a bug in lora_func")


def _kind_of(module: nn.Module, where: str, label: str) -> str:
    """PEFT's layer kind for ``module``: embedding, linear, conv or fan_in_fan_out."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            raise ValueError(f"{where}: {label} is on a grouped convolution, which PEFT's LoRA cannot hold")
        return "conv"
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "fan_in_fan_out"
    raise ValueError(
        f"{where}: {label} is on a {type(module).__name__}; PEFT's LoRA targets Linear, Conv1d/2d/3d, "
        "Embedding and transformers' Conv1D"
    )


def _stage(path: str, data: bytes) -> str:
    """Writes ``data`` to a new temporary file next to ``path`` (flushed to disk); returns its name."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def export_peft(
    adapters: Mapping[str, LoRA],
    directory: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes adapters as a PEFT LoRA adapter: ``adapter_model.safetensors`` and ``adapter_config.json``.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then computes what
    :func:`~lora_func.effective_params` computes. Adapters with different ranks or
    ``alpha`` go through PEFT's ``rank_pattern`` / ``alpha_pattern``, and
    ``target_modules`` names exactly the adapted modules.

    Args:
        adapters: parameter names (``"encoder.0.weight"``; PEFT adapts a module's
            ``weight``) to single, unstacked :class:`~lora_func.LoRA`.
        directory: the folder to write to (created if needed).
        model: the base model. Needed for ``nn.Embedding`` and ``transformers``'
            ``Conv1D`` targets, whose layouts differ; without it every 2-D weight is
            taken to be an ``nn.Linear``'s and every 3- to 5-D one a convolution's. With
            it, the adapters are also checked against it (:func:`~lora_func.check`).
        base_model_name_or_path: written to the config, for PEFT's hub loading.

    Raises:
        ValueError: if a name does not end in ``.weight``, an adapter is stacked, the
            model has no such module or PEFT cannot target it, or the adapters do not
            fit the model.
        TypeError: if ``adapters`` is not a mapping of names to LoRA.

    Example:
        >>> import json, os, pathlib, tempfile, torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> adapters = lora_func.init_adapters(model, "*.weight", r=2)
        >>> folder = tempfile.mkdtemp()
        >>> lora_func.export_peft(adapters, folder, model=model)
        >>> sorted(os.listdir(folder))
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> config = json.loads(pathlib.Path(folder, "adapter_config.json").read_text())
        >>> config["target_modules"], config["r"], config["lora_alpha"]
        ('(?:0|2)', 2, 8.0)
    """
    where = "export_peft(adapters, directory)"
    if not isinstance(adapters, Mapping):
        raise TypeError(f"{where}: adapters must be a mapping of names to LoRA, got {type(adapters).__name__}")
    if not adapters:
        raise ValueError(f"{where}: adapters is empty; a PEFT adapter needs at least one target module")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
        _check(adapters, model, where, missing=False, dtypes=False)
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for name, lora in adapters.items():
        if not isinstance(lora, LoRA):
            raise TypeError(f"{where}: adapters[{name!r}] must be a lora_func.LoRA, got {type(lora).__name__}")
        modname, _, pname = name.rpartition(".")
        if pname != "weight" or not modname:
            raise ValueError(f"{where}: adapters[{name!r}]: PEFT adapts a module's weight; names must end in '.weight'")
        if lora.batch_shape:
            raise ValueError(f"{where}: adapters[{name!r}] is stacked; export one with lora_func.unstack(adapters)[i]")
        if model is not None:
            kind = _kind_of(model.get_submodule(modname), where, f"adapters[{name!r}]")
        else:
            kind = "linear" if len(lora.shape) == 2 else "conv"
        A, B = lora.A.detach(), lora.B.detach()
        if kind == "conv":
            pa, pb = A.reshape(lora.r, *lora.shape[1:]), B.reshape(*B.shape, *[1] * (len(lora.shape) - 2))
        elif kind == "linear":
            pa, pb = A, B
        else:
            pa, pb = B.T, A.T
        scaling = float(lora.scaling)
        _verify(lora, kind, pa, pb, scaling, where, name)
        keys = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{_PREFIX}{modname}.{keys[0]}"] = pa.contiguous().cpu()
        tensors[f"{_PREFIX}{modname}.{keys[1]}"] = pb.contiguous().cpu()
        kinds[modname] = kind
        ranks[modname] = (lora.r, scaling * lora.r)
    fan = {k == "fan_in_fan_out" for k in kinds.values() if k != "embedding"}
    if len(fan) > 1:
        raise ValueError(
            f"{where}: adapters mix transformers' Conv1D targets with Linear/conv ones; PEFT's fan_in_fan_out is "
            "one setting per adapter: export them separately"
        )
    (r, alpha), _ = Counter(ranks.values()).most_common(1)[0]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if len(set(ranks.values())) > 1:
        # PEFT picks the first pattern that matches the end of a module's name: list every
        # target, longest names first, so that "a.0" is never taken for "0".
        for modname in sorted(ranks, key=len, reverse=True):
            rank_pattern[re.escape(modname)] = ranks[modname][0]
            alpha_pattern[re.escape(modname)] = ranks[modname][1]
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": "(?:" + "|".join(re.escape(m) for m in kinds) + ")",
        "fan_in_fan_out": fan == {True},
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    folder = os.fspath(directory)
    os.makedirs(folder, exist_ok=True)
    # Both files are written in full under temporary names before either replaces its old
    # version, so a failed write (a full disk) leaves the directory as it was, never new
    # weights with an old config. Only the two renames remain, the weights last.
    contents = {
        CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode(),
        WEIGHTS_NAME: _st_save(tensors, metadata={"format": "pt"}),
    }
    staged: dict[str, str] = {}
    try:
        for filename, data in contents.items():
            staged[filename] = _stage(os.path.join(folder, filename), data)
        for filename, tmp in list(staged.items()):
            os.replace(tmp, os.path.join(folder, filename))
            del staged[filename]
    finally:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the renames durable where the platform allows it
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(path: str, where: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: cannot read PEFT config {path!r} ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: {path!r} is not a PEFT LoRA config (a JSON {type(config).__name__}, not an object)")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: {path!r} is not a PEFT LoRA config (peft_type {config.get('peft_type')!r})")
    unsupported = {
        k: v
        for k, v in config.items()
        if k not in _NEUTRAL | _READ | {"init_lora_weights"} and v not in (None, False, {}, [], "none")
    }
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        unsupported["init_lora_weights"] = config["init_lora_weights"]
    if unsupported:
        raise ValueError(
            f"{where}: {path!r} uses PEFT features lora_func cannot represent: {unsupported} "
            "(lora_func holds plain LoRA: W + scaling * B @ A, with no bias, magnitude or other variant)"
        )
    return config


def import_peft(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> dict[str, LoRA]:
    """Reads a PEFT LoRA adapter directory (as written by ``save_pretrained``) into adapters.

    Linear, Conv1d/2d/3d, Embedding and ``fan_in_fan_out`` (transformers' ``Conv1D``)
    targets are read; ``rank_pattern``/``alpha_pattern`` and ``use_rslora`` (scaling
    ``alpha / sqrt(r)`` instead of ``alpha / r``) are honoured. Only
    ``adapter_model.safetensors`` is read, never a pickled ``adapter_model.bin``.
    Anything plain LoRA cannot hold (DoRA, LoRA biases, trained full modules, other
    variants, initialisations that change the base model) is an error, never dropped.

    Without ``model``, a 2-D pair is laid out as the config's one ``fan_in_fan_out``
    flag says. PEFT itself decides per module (``True`` for ``Conv1D``, ``False`` for
    ``nn.Linear``, whatever the config says) and saves the value it set last, so an
    adapter that targets both ``Conv1D`` and ``nn.Linear`` modules (or whose flag
    disagrees with its modules) is read correctly only with ``model=``.

    Args:
        directory: the folder holding ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        model: the base model. With it, each target's layout comes from its module
            (``nn.Linear``, ``Conv1d/2d/3d``, ``nn.Embedding`` or ``transformers``'
            ``Conv1D``), as in PEFT, and the adapters are checked against it.
        device: where to put the tensors (default: the CPU).

    Returns:
        Parameter names (``"encoder.0.weight"``) to :class:`~lora_func.LoRA`, in the
        file's order, with the file's dtypes; ready for
        :func:`~lora_func.effective_params` on the base model.

    Raises:
        FileNotFoundError: if the directory lacks either file.
        ValueError: for an unreadable file, an unsupported feature, an unknown tensor,
            or a file whose ranks disagree with its config (the message names the file);
            or, with ``model``, a target the model lacks, cannot hold, or has in
            another shape; or if ``device`` is not an available device (checked before
            anything is read).
        TypeError: if ``model`` is not an ``nn.Module``.

    Example:
        >>> import tempfile, torch, lora_func
        >>> adapters = {"0.weight": lora_func.init((4, 3, 3, 3), r=2, alpha=4.0, init="gaussian")}
        >>> folder = tempfile.mkdtemp()
        >>> lora_func.export_peft(adapters, folder)
        >>> back = lora_func.import_peft(folder)["0.weight"]
        >>> torch.equal(back.A, adapters["0.weight"].A), back.shape, float(back.scaling)
        (True, (4, 3, 3, 3), 2.0)
    """
    where = "import_peft(directory)"
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if device is not None:
        device = check_device(device, where)  # before any file is read
    folder = os.fspath(directory)
    config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{where}: no {CONFIG_NAME} in {folder!r}")
    if not os.path.isfile(weights_path):
        extra = (
            " (adapter_model.bin is a pickle, which can run code: it is not read)"
            if os.path.isfile(os.path.join(folder, "adapter_model.bin"))
            else ""
        )
        raise FileNotFoundError(f"{where}: no {WEIGHTS_NAME} in {folder!r}{extra}")
    config = _read_config(config_path, where)
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error type for bad files
        raise ValueError(f"{where}: {weights_path!r} is not a readable safetensors file ({err})") from None
    suffixes = {
        ".lora_A.weight": ("mat", "A"),
        ".lora_B.weight": ("mat", "B"),
        ".lora_embedding_A": ("embedding", "A"),
        ".lora_embedding_B": ("embedding", "B"),
    }
    found: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, t in tensors.items():
        for suffix, (family, which) in suffixes.items():
            if key.startswith(_PREFIX) and key.endswith(suffix):
                modname = key[len(_PREFIX) : -len(suffix)]
                entry = found.setdefault(modname, {"family": family})
                if entry["family"] != family:
                    unknown.append(key)
                entry[which] = t
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{where}: {weights_path!r} holds tensors plain LoRA cannot represent (DoRA magnitudes, LoRA biases, "
            f"trained modules, other variants): {unknown}"
        )
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    out: dict[str, LoRA] = {}
    for modname, entry in found.items():
        name = f"{modname}.weight"
        if "A" not in entry or "B" not in entry:
            raise ValueError(f"{where}: {weights_path!r} has only one of the two factors of {modname!r}")
        pa, pb = entry["A"], entry["B"]
        if model is not None:
            try:
                module = model.get_submodule(modname)
            except AttributeError:
                raise ValueError(
                    f"{where}: {weights_path!r} adapts {modname!r}, which the model does not have"
                ) from None
            kind = _kind_of(module, where, f"{weights_path!r}: {modname!r}")
            if (kind == "embedding") != (entry["family"] == "embedding"):
                raise ValueError(
                    f"{where}: {weights_path!r}: {modname!r} is a {type(module).__name__} in the model but its "
                    f"factors are stored as {'an embedding' if entry['family'] == 'embedding' else 'a matrix'}'s"
                )
        elif entry["family"] == "embedding":
            kind = "embedding"
        elif pa.dim() == 2:
            kind = "fan_in_fan_out" if fan_in_fan_out else "linear"
        else:
            kind = "conv"
        r = pa.shape[0]
        if (
            pa.dim() < 2
            or pa.dim() != pb.dim()
            or pb.shape[1] != r
            or (kind == "conv" and any(d != 1 for d in pb.shape[2:]))
            or (kind != "conv" and pa.dim() != 2)
        ):
            raise ValueError(
                f"{where}: {weights_path!r}: factors of {modname!r} have shapes {tuple(pa.shape)} and "
                f"{tuple(pb.shape)}, which are not a plain LoRA pair (grouped convolutions are not supported)"
            )
        r_config = _pattern_value(config.get("rank_pattern") or {}, modname, config.get("r", 8))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, modname, config.get("lora_alpha", 8)))
        if r_config != r:
            raise ValueError(f"{where}: {weights_path!r}: {modname!r} has rank {r} but its config says {r_config}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
        if kind == "conv":
            shape = (pb.shape[0], *pa.shape[1:])
            A, B = pa.reshape(r, -1), pb.reshape(pb.shape[0], r)
        elif kind == "linear":
            shape, A, B = (pb.shape[0], pa.shape[1]), pa, pb
        else:
            shape, A, B = (pa.shape[1], pb.shape[0]), pb.T.contiguous(), pa.T.contiguous()
        lora = LoRA(A, B, torch.tensor(scaling, dtype=_scaling_dtype(A.dtype)), tuple(int(d) for d in shape))
        _verify(lora, kind, pa, pb, float(lora.scaling), where, name)
        if device is not None:
            lora = LoRA(lora.A.to(device), lora.B.to(device), lora.scaling.to(device), lora.shape)
        out[name] = lora
    if model is not None:
        _check(out, model, where, missing=False, dtypes=False)
    return out


# --- the documented original's state dict ---------------------------------------------------

_PARAM_KEY = re.compile(r"^(?:(?P<prefix>.*)\.)?parametrizations\.(?P<pname>[^.]+)\.(?P<index>\d+)\.(?P<leaf>A|B)$")


def from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, alpha: float | Mapping[str, float] = 8.0
) -> dict[str, LoRA]:
    """The adapters in the state dict of a model prepared with :func:`~lora_func.apply_lora`.

    Such a state dict holds, per adapted weight, ``<module>.parametrizations.<name>.original``
    (the frozen base) and ``<module>.parametrizations.<name>.<i>.A`` / ``.B``. It does not
    hold ``alpha`` (a plain attribute of ``LoRAParam``), so give it: one number for all, or
    one per weight.

    Args:
        state_dict: ``model.state_dict()`` of the prepared model (or a loaded checkpoint).
        alpha: the ``alpha`` each weight was prepared with (``scaling = alpha / r``);
            the documented default is 8.0.

    Returns:
        Plain weight names (``"0.weight"``) to :class:`~lora_func.LoRA` (sharing the
        state dict's tensors), as :func:`~lora_func.get_adapters` would give.

    Raises:
        ValueError: if the state dict holds no LoRA, a factor or the base weight is
            missing, shapes disagree, or ``alpha`` lacks a weight.
        TypeError: if ``state_dict`` is not a mapping or ``alpha`` not a number/mapping.

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
        >>> _ = lora_func.apply_lora(model[0], r=2, alpha=4.0)
        >>> adapters = lora_func.from_state_dict(model.state_dict(), alpha=4.0)
        >>> adapters["0.weight"].shape, float(adapters["0.weight"].scaling)
        ((4, 3, 3, 3), 2.0)
    """
    where = "from_state_dict(state_dict)"
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{where}: state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, Mapping)):
        raise TypeError(f"{where}: alpha must be a number or a mapping of weight names to numbers, got {alpha!r}")
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        m = _PARAM_KEY.match(key)
        if m is None:
            continue
        prefix = f"{m['prefix']}." if m["prefix"] else ""
        entry = parts.setdefault(
            f"{prefix}{m['pname']}", {"original": f"{prefix}parametrizations.{m['pname']}.original"}
        )
        entry[m["leaf"]] = value
    if not parts:
        raise ValueError(f"{where}: state_dict holds no LoRA (keys like '<module>.parametrizations.weight.0.A')")
    out = {}
    for name, entry in parts.items():
        if "A" not in entry or "B" not in entry or entry["original"] not in state_dict:
            raise ValueError(f"{where}: state_dict lacks {entry['original']!r} or one of the factors of {name!r}")
        a = alpha.get(name) if isinstance(alpha, Mapping) else alpha
        if a is None:
            raise ValueError(f"{where}: alpha has no entry for {name!r}; give one per adapted weight")
        A, B = entry["A"], entry["B"]
        try:
            lora = LoRA(A, B, torch.tensor(float(a) / A.shape[0], dtype=_scaling_dtype(A.dtype), device=A.device),
                        tuple(state_dict[entry["original"]].shape))  # fmt: skip
        except ValueError as err:
            raise ValueError(f"{where}: {name!r}: {err}") from None
        out[name] = lora
    return out


def to_state_dict(
    adapters: Mapping[str, LoRA], base_state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A state dict for a model prepared with :func:`~lora_func.apply_lora`, from adapters.

    The inverse of :func:`from_state_dict`. Each adapter ``"<module>.<name>"`` gives
    ``<module>.parametrizations.<name>.0.A`` and ``.0.B``. With ``base_state_dict`` (the
    unprepared model's ``state_dict()``, or a prepared one), its entries are kept and an
    adapted weight's plain key is renamed to ``<module>.parametrizations.<name>.original``,
    so that ``model.load_state_dict(result)`` restores the whole prepared model. The
    state dict has no place for ``scaling``: prepare the model with
    ``apply_lora(module, name, r=lora.r, alpha=float(lora.alpha))``.

    Args:
        adapters: weight names (``"0.weight"``) to single, unstacked
            :class:`~lora_func.LoRA`.
        base_state_dict: the base model's state dict, or ``None`` for the adapter
            entries alone (``model.load_state_dict(result, strict=False)``).

    Returns:
        A new dict (the tensors are the adapters' and the base's, detached, not copies).

    Raises:
        ValueError: if an adapter is stacked, or the base lacks an adapted weight or
            has it in another shape.
        TypeError: if ``adapters`` is not a mapping of names to LoRA.

    Example:
        >>> import torch, lora_func
        >>> adapters = {"0.weight": lora_func.init((4, 3), r=2)}
        >>> sorted(lora_func.to_state_dict(adapters))
        ['0.parametrizations.weight.0.A', '0.parametrizations.weight.0.B']
    """
    where = "to_state_dict(adapters)"
    if not isinstance(adapters, Mapping):
        raise TypeError(f"{where}: adapters must be a mapping of names to LoRA, got {type(adapters).__name__}")
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for name, lora in adapters.items():
        if not isinstance(lora, LoRA):
            raise TypeError(f"{where}: adapters[{name!r}] must be a lora_func.LoRA, got {type(lora).__name__}")
        if lora.batch_shape:
            raise ValueError(f"{where}: adapters[{name!r}] is stacked; pick one with lora_func.unstack(adapters)[i]")
        modname, _, pname = name.rpartition(".")
        prefix = f"{modname}.parametrizations.{pname}" if modname else f"parametrizations.{pname}"
        renamed[name] = f"{prefix}.original"
    if base_state_dict is not None:
        for key, value in base_state_dict.items():
            out[renamed.get(key, key)] = value
        for name, lora in adapters.items():
            base = out.get(renamed[name])
            if base is None:
                raise ValueError(f"{where}: base_state_dict has neither {name!r} nor {renamed[name]!r}")
            if tuple(base.shape) != lora.shape:
                raise ValueError(
                    f"{where}: adapters[{name!r}] is for shape {lora.shape} but base_state_dict has {tuple(base.shape)}"
                )
    for name, lora in adapters.items():
        prefix = renamed[name].removesuffix("original")
        out[f"{prefix}0.B"] = lora.B.detach()
        out[f"{prefix}0.A"] = lora.A.detach()
    return out
