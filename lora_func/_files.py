"""Adapters on disk (:func:`save`, :func:`load`, :func:`load_metadata`) and checked on the way in
(:func:`check`).

A file is one `safetensors <https://github.com/huggingface/safetensors>`_ file: raw tensors
and a JSON header, no pickle, so opening an untrusted file cannot run code. Every leaf is a
tensor named ``<name>.A``, ``<name>.B``, ``<name>.scaling`` (``A``, ``B``, ``scaling`` for a
single :class:`~lora_func.LoRA`); the header key ``"lora_func"`` holds the format version,
each adapter's weight shape, rank and ``alpha``, and the caller's metadata.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _st_save
from torch import nn

from ._math import check_device
from ._targets import _params_of
from ._tree import LoRA

__all__ = ["check", "load", "load_metadata", "save"]

#: The header key of a lora_func file, and the version of its layout.
HEADER_KEY = "lora_func"
FORMAT_VERSION = 1
_LEAVES = ("A", "B", "scaling")


def _as_named(adapters: Any, where: str) -> tuple[str, dict[str, LoRA]]:
    """``("single", {"": lora})`` or ``("dict", adapters)``, checking types."""
    if isinstance(adapters, LoRA):
        adapters = {"": adapters}
        kind = "single"
    elif isinstance(adapters, Mapping):
        kind = "dict"
    else:
        raise TypeError(
            f"{where}: adapters must be a lora_func.LoRA or a mapping of names to LoRA, got {type(adapters).__name__}"
        )
    for name, lora in adapters.items():
        if not isinstance(name, str) or not (name or kind == "single"):
            raise TypeError(f"{where}: adapter names must be non-empty strings, got {name!r}")
        if not isinstance(lora, LoRA):
            raise TypeError(f"{where}: adapters[{name!r}] must be a lora_func.LoRA, got {type(lora).__name__}")
        label = "adapters" if kind == "single" else f"adapters[{name!r}]"
        if not all(isinstance(t, torch.Tensor) for t in (lora.A, lora.B, lora.scaling)):
            raise TypeError(f"{where}: {label} has leaves that are not tensors")
        if any(t.is_meta for t in (lora.A, lora.B, lora.scaling)):
            raise ValueError(f"{where}: {label} is on the meta device and holds no values to save")
    return kind, dict(adapters)


def _key(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


def save(
    adapters: LoRA | Mapping[str, LoRA], path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> None:
    """Writes adapters to one safetensors file, atomically.

    The file is first written to a temporary file in the same folder, flushed to disk
    (``fsync``) and then renamed over ``path``: if anything fails on the way, an existing
    file at ``path`` is left as it was. Tensors are stored bit for bit in their own dtype
    (``bfloat16`` included) and device-independent; :func:`load` gives them back.

    Args:
        adapters: one :class:`~lora_func.LoRA` or a mapping from names (``"0.weight"``)
            to :class:`~lora_func.LoRA`, single or stacked (:func:`~lora_func.stack`).
        path: the file to write (conventionally ``*.safetensors``).
        metadata: the caller's own information (a dict from strings to JSON-serialisable
            values), stored in the header and read back by :func:`load_metadata`.

    Raises:
        TypeError: if ``adapters`` is not a LoRA or a mapping of names to LoRA (with
            tensor leaves), ``path`` is not a path, or ``metadata`` is not a dict of strings
            to JSON values that load back unchanged.
        ValueError: if an adapter is on the meta device (it holds no values), or its
            scaling is not finite.
        OSError: if the file cannot be written (the old file, if any, is kept).

    Example:
        >>> import os, tempfile, torch, lora_func
        >>> adapters = {"0.weight": lora_func.init((4, 3), r=2, init="gaussian")}
        >>> path = os.path.join(tempfile.mkdtemp(), "adapters.safetensors")
        >>> lora_func.save(adapters, path, metadata={"step": 100})
        >>> torch.equal(lora_func.load(path)["0.weight"].A, adapters["0.weight"].A)
        True
        >>> lora_func.load_metadata(path)
        {'step': 100}
    """
    where = "save(adapters, path)"
    target = _path(path, where)
    kind, named = _as_named(adapters, where)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise TypeError(f"{where}: metadata must be a dict from strings to JSON-serialisable values, got {metadata!r}")
    try:  # what load_metadata will give back must be what was given: no int keys turned into str, no tuples
        same = json.loads(json.dumps(dict(metadata), allow_nan=False)) == dict(metadata)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: metadata must hold only JSON-serialisable values ({err})") from None
    if not same:
        raise TypeError(
            f"{where}: metadata would not load back as given (JSON has only str keys, lists and finite numbers): "
            f"{metadata!r}"
        )
    header: dict[str, Any] = {"format": "lora_func.adapters", "version": FORMAT_VERSION, "kind": kind, "adapters": {}}
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, lora in named.items():
        if not bool(torch.isfinite(lora.scaling).all()):
            raise ValueError(f"{where}: adapter {name!r} has a non-finite scaling {lora.scaling.tolist()}")
        header["adapters"][name] = {
            "shape": list(lora.shape),
            "r": lora.r,
            "batch_shape": list(lora.batch_shape),
            "alpha": lora.alpha.detach().double().cpu().tolist(),
        }
        for leaf in _LEAVES:
            t = getattr(lora, leaf).detach().contiguous()
            if t.untyped_storage().data_ptr() in storages:
                t = t.clone()  # safetensors refuses tensors that share memory (e.g. views from unstack)
            storages.add(t.untyped_storage().data_ptr())
            tensors[_key(name, leaf)] = t.cpu()
    header["metadata"] = dict(metadata)
    text = json.dumps(header, allow_nan=False)
    data = _st_save(tensors, metadata={HEADER_KEY: text})
    _atomic_write(target, data)


def _file_mode(path: str) -> int:
    """The mode a plain ``open(path, "wb")`` would leave: the old file's, or 0o666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file in the same folder,
    flushed and synced, then renamed over ``path``; a failure leaves the old file as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    mode = _file_mode(path)
    # A short fixed prefix: any name that fits the file system still fits with it.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lora_func.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)  # mkstemp makes 0o600 files; keep the mode a plain write would give
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable where the platform allows it.
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _path(path: Any, where: str) -> str:
    """``path`` as a string, or a ``TypeError`` naming ``where`` if it is not a path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _read(
    path: str | os.PathLike[str], where: str, with_tensors: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The parsed header and the tensors of a lora_func file, or a ValueError naming it."""
    name = _path(path, where)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{where}: no file at {name!r}")
    try:
        with safe_open(name, framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except Exception as err:  # safetensors raises its own error type for bad files
        raise ValueError(f"{where}: {name!r} is not a readable safetensors file ({err})") from None
    if HEADER_KEY not in raw:
        raise ValueError(f"{where}: {name!r} is a safetensors file but not a lora_func adapter file (no header)")
    try:
        header = json.loads(raw[HEADER_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: {name!r} has a corrupt lora_func header ({err})") from None
    if not isinstance(header, dict) or header.get("format") != "lora_func.adapters":
        raise ValueError(f"{where}: {name!r} has a header that is not a lora_func adapter header")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: {name!r} has format version {header.get('version')!r}; this lora_func reads "
            f"version {FORMAT_VERSION}"
        )
    return header, tensors


def load(path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> LoRA | dict[str, LoRA]:
    """Reads adapters written by :func:`save`, bit for bit.

    Only tensors and a JSON header are read (safetensors): no code in the file runs.

    Args:
        path: the file.
        device: where to put the tensors (default: the CPU).

    Returns:
        What was saved: one :class:`~lora_func.LoRA`, or a dict from names to
        :class:`~lora_func.LoRA` in the saved order.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if the file is truncated, corrupt, not a lora_func adapter file, or
            its tensors disagree with its header (the message names the file), or
            ``device`` is not a device.

    Example:
        >>> import os, tempfile, torch, lora_func
        >>> stacked = lora_func.stack([lora_func.init((4, 3), r=2, alpha=a) for a in (1.0, 2.0)])
        >>> path = os.path.join(tempfile.mkdtemp(), "sweep.safetensors")
        >>> lora_func.save(stacked, path)
        >>> lora_func.load(path).scaling
        tensor([0.5000, 1.0000])
    """
    where = "load(path)"
    if device is not None:
        device = check_device(device, where)
    name = _path(path, where)
    header, tensors = _read(path, where)
    entries = header.get("adapters")
    kind = header.get("kind")
    if not isinstance(entries, dict) or kind not in ("single", "dict") or (kind == "single" and list(entries) != [""]):
        raise ValueError(f"{where}: {name!r} has a corrupt lora_func header (bad 'adapters' or 'kind')")
    expected = {_key(n, leaf) for n in entries for leaf in _LEAVES}
    if set(tensors) != expected:
        raise ValueError(
            f"{where}: {name!r} does not hold the tensors its header lists "
            f"(missing {sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)})"
        )
    out: dict[str, LoRA] = {}
    for n, info in entries.items():
        A, B, scaling = (tensors[_key(n, leaf)] for leaf in _LEAVES)
        try:
            lora = LoRA(A, B, scaling, info["shape"])
            if lora.r != info["r"] or list(lora.batch_shape) != info["batch_shape"]:
                raise ValueError(f"rank {lora.r} and batch shape {lora.batch_shape} differ from the header's")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: {name!r}: adapter {n!r} does not match its header ({err})") from None
        if device is not None:
            lora = LoRA(A.to(device), B.to(device), scaling.to(device), lora.shape)
        out[n] = lora
    return out[""] if kind == "single" else out


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The caller's metadata stored by :func:`save` (without reading the tensors).

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: as :func:`load`, for a file that is not a lora_func adapter file.

    Example:
        >>> import os, tempfile, lora_func
        >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> lora_func.save(lora_func.init((4, 3), r=2), path, metadata={"task": "digits"})
        >>> lora_func.load_metadata(path)["task"]
        'digits'
    """
    header, _ = _read(path, "load_metadata(path)", with_tensors=False)
    meta = header.get("metadata", {})
    if not isinstance(meta, dict):
        raise ValueError(f"load_metadata(path): {os.fspath(path)!r} has a corrupt lora_func header")
    return meta


def _lora_weights(module: nn.Module) -> list[str]:
    """Plain names (``"0.weight"``) of the weights that carry a parametrization with ``A`` and ``B``."""
    names = set()
    for name, _ in module.named_parameters():
        parts = name.split(".")
        if len(parts) >= 4 and parts[-4] == "parametrizations" and parts[-1] == "A":
            names.add(".".join([*parts[:-4], parts[-3]]))
    return sorted(names)


def _problems(
    adapters: Mapping[str, LoRA],
    params: Mapping[str, torch.Tensor],
    required: Iterable[str],
    dtypes: bool,
    owner: str,
) -> list[str]:
    problems = []
    required = list(required)
    missing = [n for n in required if n not in adapters]
    if missing:
        problems.append(f"missing adapters for {missing}")
    for name, lora in adapters.items():
        if name not in params:
            problems.append(f"adapters[{name!r}] names no parameter of the {owner} (unexpected)")
            continue
        p = params[name]
        if tuple(p.shape) != lora.shape:
            problems.append(f"adapters[{name!r}] is for shape {lora.shape} but the weight has shape {tuple(p.shape)}")
        if dtypes and (lora.A.dtype != p.dtype or lora.B.dtype != p.dtype):
            problems.append(
                f"adapters[{name!r}] has dtype A {lora.A.dtype}, B {lora.B.dtype} but the weight has dtype {p.dtype}"
            )
    return problems


def _check(
    adapters: Any,
    module_or_params: Any,
    where: str,
    *,
    targets: str | Iterable[str] | None = None,
    missing: bool = True,
    dtypes: bool = True,
) -> None:
    """:func:`check` with the caller's name in the error; ``missing=False`` skips missing targets."""
    if not isinstance(dtypes, bool):
        raise TypeError(f"{where}: dtypes must be a bool, got {type(dtypes).__name__}")
    if not isinstance(adapters, Mapping):
        raise TypeError(f"{where}: adapters must be a mapping of names to LoRA, got {type(adapters).__name__}")
    for name, lora in adapters.items():
        if not isinstance(lora, LoRA):
            raise TypeError(f"{where}: adapters[{name!r}] must be a lora_func.LoRA, got {type(lora).__name__}")
        if not all(isinstance(t, torch.Tensor) for t in (lora.A, lora.B, lora.scaling)):
            raise TypeError(f"{where}: adapters[{name!r}] has leaves that are not tensors")
    params = _params_of(module_or_params, where)
    untyped = {n: type(params[n]).__name__ for n in adapters if n in params and not isinstance(params[n], torch.Tensor)}
    if untyped:
        raise TypeError(f"{where}: module_or_params must map names to tensors; got {untyped}")
    required: list[str] = []
    if missing:
        if targets is None:
            if isinstance(module_or_params, nn.Module):
                required = _lora_weights(module_or_params)
        else:
            patterns = [targets] if isinstance(targets, str) else list(targets)
            if not all(isinstance(p, str) for p in patterns):
                raise TypeError(f"{where}: targets must be a glob pattern or a list of them, got {targets!r}")
            required = [n for n in params if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            required += [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in params)]
    owner = "module" if isinstance(module_or_params, nn.Module) else "params"
    problems = _problems(adapters, params, required, dtypes, owner)
    if len(problems) == 1:
        raise ValueError(f"{where}: {problems[0]}")
    if problems:
        raise ValueError(f"{where}: {len(problems)} problems: " + "; ".join(problems))


def check(
    adapters: Mapping[str, LoRA],
    module_or_params: nn.Module | Mapping[str, torch.Tensor],
    *,
    targets: str | Iterable[str] | None = None,
    dtypes: bool = True,
) -> None:
    """Checks that adapters fit a model, reporting every problem at once.

    Four kinds of problem are collected and raised together in one ``ValueError``
    (``"<n> problems: ...; ..."``):

    - *missing*: a weight that should have an adapter has none. Which weights should is
      given by ``targets``; by default, for a module, the weights that already carry a
      LoRA parametrization (:func:`~lora_func.apply_lora`), and for a mapping, none.
    - *unexpected*: an adapter names no parameter.
    - *shape*: an adapter was made for a weight of another shape.
    - *dtype* (when ``dtypes=True``): ``A`` or ``B`` is not in the weight's dtype.

    Devices are not compared: :func:`~lora_func.set_adapters` copies values across devices
    (adapters read by :func:`~lora_func.load` onto the CPU fit a CUDA model), and the
    functional routes name both devices when they meet a mismatch.

    Args:
        adapters: names (``"0.weight"``) to :class:`~lora_func.LoRA`, single or stacked.
        module_or_params: the model (its parameters as in
            :func:`~lora_func.base_params`) or a mapping from names to tensors.
        targets: glob patterns (or one) naming the weights that must have an adapter; a
            pattern that matches no parameter is reported as missing too.
        dtypes: whether a dtype difference is a problem (mixed precision, e.g. float32
            adapters on a bfloat16 model, is legitimate: pass ``False``).

    Raises:
        ValueError: listing every problem found.
        TypeError: if ``adapters`` is not a mapping of names to LoRA, or
            ``module_or_params`` is neither a module nor a mapping.

    Example:
        >>> import torch, lora_func
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> lora_func.check(lora_func.init_adapters(model, "*.weight", r=2), model)
        >>> lora_func.check({"0.weight": lora_func.init((2, 2), r=1), "9.weight": lora_func.init((2, 2), r=1)},
        ...                 model, targets="*.weight")
        Traceback (most recent call last):
        ...
        ValueError: check(adapters, module_or_params): 3 problems: missing adapters for ['1.weight']; ...
    """
    _check(adapters, module_or_params, "check(adapters, module_or_params)", targets=targets, dtypes=dtypes)
