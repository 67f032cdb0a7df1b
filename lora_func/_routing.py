"""``RoutedLoRAWeight``: one frozen weight, K stacked adapters, and each example's choice.

Serving a batch in which example ``i`` uses adapter ``index[i]`` (``-1``: the base model
alone) takes the same weight tensor for every example, so a routed weight is one tensor
subclass that carries the base weight, the stacked factors ``A`` ``(K, r, in)``, ``B``
``(K, out, r)``, ``scaling`` ``(K,)`` and the ``(batch,)`` index. The leading dimension of
the input to ``F.linear`` / ``F.conv*d`` / ``F.embedding`` is the batch. No per-example
weight is built and there is no Python loop over adapters:

* ``F.linear``: ``x W^T + b`` once, plus ``s_i · (x_i A_i^T) B_i^T`` as two batched
  matmuls over the gathered factors ``A[index]`` ``(batch, r, in)`` and ``B[index]``;
* ``F.conv1d/2d/3d``: the base convolution, plus one convolution with all ``K·r``
  ``A`` kernels at once (same stride, padding, dilation and groups), from which each
  example's ``r`` channels (per group) are gathered, then the ``B`` step as a batched
  matmul over channels;
* ``F.embedding``: the base lookup plus ``s_i · B_i[tokens] A_i``, gathered.

Examples with index ``-1`` get a scaling of zero (a mask, not a branch), so their output is
the base model's and no adapter receives gradient from them. Gradients reach exactly the
adapters in ``index``; the others get exact zeros.

Measured (torch 2.13, CPU, 2 threads, ``F.linear`` with dim 1024, 64 examples × 16 tokens,
16 adapters of rank 8, index uniform in ``[-1, 16)``; three runs, medians of 30 rounds):
this gather + batched-matmul form took 1.00-1.06x the time of one adapter on the same
tokens; sorting the examples by adapter and running one factored matmul per segment took
1.10-1.19x (and needs a Python loop over the adapters present and data-dependent shapes,
which ``torch.compile`` cannot put in one graph); one matmul with all ``K·r`` rows of
``A`` followed by a gather took 1.09-1.16x. Convolutions use that last form for the
``A`` step (one convolution is cheaper than ``batch`` small ones). The gathered factors
cost ``batch·r·(in+out)`` memory, small next to the activations.

``mode="materialize"`` (the reference route) instead merges the K weights with the
library's one formula and gives each example its own merged weight (``batch·out·in``
memory): use it to check the factored route, not to serve. ``"auto"`` is ``"factored"``.

Any other operation on a routed weight (``w.sum()``, ``w @ x``, ``F.conv_transpose2d``,
``F.embedding`` with ``max_norm``) is a ``ValueError`` naming it: there is no single merged
weight to give it. Metadata (``shape``, ``dtype``, ``device``) is the base weight's.

``torch.compile`` (checked on torch 2.13, CPU, backends eager, aot_eager and inductor): an
inference function that calls :func:`lora_func.lora_params` with ``index=`` and
``functional_call`` compiles with ``fullgraph=True`` and matches eager (a new index reuses
the graph), as do ``torch.func.grad`` of a loss and a loss whose backward runs outside.
Inside compiled code the index range is not checked (that reads the index's minimum and
maximum, a graph break); an index out of range there fails in the gather.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ._math import _update
from ._weight import _METADATA, _REQUIRES_GRAD, _VALUE_GETTERS, check_fit, check_mode

__all__ = ["RoutedLoRAWeight"]

_DisableTF = torch._C.DisableTorchFunctionSubclass


class RoutedLoRAWeight(torch.Tensor):
    """A weight whose adapter is chosen per example: for example ``i``, ``merge(base, adapter index[i])``.

    The index is kept as the attribute ``adapter_index`` (``Tensor.index`` is taken).

    Made by :func:`lora_func.lora_params` with ``index=``; pass it where the weight goes
    (``torch.func.functional_call``). ``F.linear``, ``F.conv1d/2d/3d`` and ``F.embedding``
    compute each example's own factored update (see the module docs); any other use of
    the weight is a ``ValueError``.

    Args:
        base: the frozen weight.
        A: the stacked ``(K, r, in_flat)`` factors.
        B: the stacked ``(K, out, r)`` factors.
        scaling: the ``(K,)`` scalings.
        index: a ``(batch,)`` integer tensor with values in ``[-1, K)`` (not range-checked
            here: :func:`lora_func.lora_params` does that).
        mode: ``"auto"`` or ``"factored"`` (the same route), or ``"materialize"``.

    Raises:
        TypeError: if a factor or ``index`` is not a tensor of the right kind.
        ValueError: if the shapes do not fit or ``mode`` is unknown.

    Example:
        >>> import torch, torch.nn.functional as F, lora_func
        >>> W = torch.randn(4, 3)
        >>> ad = lora_func.stack([lora_func.init((4, 3), r=2, init="gaussian") for _ in range(2)])
        >>> w = lora_func.RoutedLoRAWeight(W, ad.A, ad.B, ad.scaling, torch.tensor([1, -1]))
        >>> y = F.linear(torch.ones(2, 3), w)
        >>> merged1 = lora_func.merge(W, lora_func.unstack(ad)[1])
        >>> torch.allclose(y[0], F.linear(torch.ones(3), merged1)), torch.allclose(y[1], W.sum(1))
        (True, True)
    """

    base: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scaling: torch.Tensor
    adapter_index: torch.Tensor
    route: str

    __slots__ = ("A", "B", "adapter_index", "base", "route", "scaling")

    @staticmethod
    def __new__(
        cls,
        base: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: torch.Tensor,
        index: torch.Tensor,
        mode: str = "auto",
    ) -> RoutedLoRAWeight:
        where = "RoutedLoRAWeight(base, A, B, scaling, index)"
        check_mode(mode, where)
        for name, t in (("base", base), ("A", A), ("B", B), ("scaling", scaling), ("index", index)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if A.dim() != 3 or B.dim() != 3 or scaling.shape != A.shape[:1] or B.shape[0] != A.shape[0]:
            raise ValueError(
                f"{where}: A {tuple(A.shape)}, B {tuple(B.shape)} and scaling {tuple(scaling.shape)} are not "
                "K stacked (r, in), (out, r) factors and (K,) scalings"
            )
        check_fit(base, A[0], B[0], scaling[0], where)
        check_index(index, A.shape[0], base.device, where, check_range=False)
        return _make_routed(base, A, B, scaling, index, mode)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"RoutedLoRAWeight(shape={tuple(self.base.shape)}, K={self.A.shape[0]}, r={self.A.shape[-2]}, "
            f"batch={self.adapter_index.shape[0]}, dtype={str(self.base.dtype).removeprefix('torch.')}, "
            f"mode={self.route!r})"
        )

    def __tensor_flatten__(self) -> tuple[list[str], str]:
        return ["base", "A", "B", "scaling", "adapter_index"], self.route

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], mode: str, outer_size: Any, outer_stride: Any) -> Any:
        return _make_routed(inner["base"], inner["A"], inner["B"], inner["scaling"], inner["adapter_index"], mode)

    def _stable_hash_for_caching(self) -> str:
        return f"lora_func.RoutedLoRAWeight:{self.route}"

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        with _DisableTF():
            if handler is not None:
                out = handler(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            elif func == _REQUIRES_GRAD:
                w = args[0]
                return any(t.requires_grad for t in (w.base, w.A, w.B, w.scaling))
            elif func in _METADATA or (func.__name__ == "__get__" and func not in _VALUE_GETTERS):
                return func(*args, **kwargs)
        _refuse(func)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        _refuse(func)


def _refuse(func: Any) -> None:
    name = getattr(func, "__name__", None) or str(func)
    raise ValueError(
        f"RoutedLoRAWeight: {name} cannot use a routed weight: each example has its own adapter, so there is "
        "no single merged weight; only F.linear, F.conv1d/2d/3d and F.embedding (without max_norm, "
        "scale_grad_by_freq or sparse) take one, with the batch as the input's leading dimension"
    )


def _make_routed(
    base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, index: torch.Tensor, mode: str
) -> RoutedLoRAWeight:
    self = torch.Tensor._make_wrapper_subclass(
        RoutedLoRAWeight, base.shape, strides=base.stride(), dtype=base.dtype, device=base.device, requires_grad=False
    )
    self.base, self.A, self.B, self.scaling, self.adapter_index, self.route = base, A, B, scaling, index, mode
    return self  # type: ignore[no-any-return]


def check_index(index: Any, k: int, device: torch.device, where: str, *, check_range: bool = True) -> torch.Tensor:
    """``index`` if it is a ``(batch,)`` integer tensor on ``device`` with values in ``[-1, k)``."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{where}: index must be a (batch,) integer tensor, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{where}: index must have an integer dtype (torch.int64), got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{where}: index must have shape (batch,), got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{where}: index is on {index.device} but the weights are on {device}; move it")
    if check_range and index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= k:
            raise ValueError(
                f"{where}: index holds values in [{lo}, {hi}]; with {k} stacked adapters it must lie in [-1, {k}) "
                "(-1 means the base model alone)"
            )
    return index


# --- the routes -------------------------------------------------------------------------------


def _check_batch(w: RoutedLoRAWeight, batch: int, op: str) -> None:
    if batch != w.adapter_index.shape[0]:
        raise ValueError(
            f"{op}: the input has {batch} examples (its leading dimension) but the routed weight's index "
            f"has {w.adapter_index.shape[0]}; give one adapter index per example"
        )


def _picked(w: RoutedLoRAWeight, batch: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's adapter (``-1`` read as ``0``) and scaling (zero where index is -1: the mask)."""
    _check_batch(w, batch, op)
    idx = w.adapter_index.clamp(min=0)
    dt = w.base.dtype
    s = torch.where(w.adapter_index >= 0, w.scaling.to(dt)[idx], torch.zeros((), dtype=dt, device=idx.device))
    return idx, s


def _materialized(w: RoutedLoRAWeight) -> torch.Tensor:
    """Each example's merged weight ``(batch, *shape)``: K merges by the one formula, base for -1."""
    merged = _update(w.base, w.A, w.B, w.scaling)
    return torch.cat([merged, w.base.unsqueeze(0)])[w.adapter_index]  # index -1 picks the appended base


def _linear(input: Any, weight: Any, bias: Any = None) -> Any:
    if type(weight) is not RoutedLoRAWeight or isinstance(bias, RoutedLoRAWeight):
        return NotImplemented
    if input.dim() < 2:
        raise ValueError(
            f"F.linear: a routed weight needs an input of shape (batch, ..., in), got {tuple(input.shape)}"
        )
    batch = input.shape[0]
    tokens = input.shape[1:-1].numel()  # explicit sizes, not -1: zero-size batches must reshape too
    if weight.route == "materialize":
        _check_batch(weight, batch, "F.linear")
        x = input.reshape(batch, tokens, input.shape[-1])
        out = (x @ _materialized(weight).mT).reshape(*input.shape[:-1], weight.base.shape[0])
        return out if bias is None else out + bias
    idx, s = _picked(weight, batch, "F.linear")
    dt = weight.base.dtype
    A, B = weight.A.to(dt)[idx], weight.B.to(dt)[idx]  # (batch, r, in), (batch, out, r)
    x = input.reshape(batch, tokens, input.shape[-1])
    h = torch.bmm(x, A.mT) * s.view(batch, 1, 1)
    delta = torch.bmm(h, B.mT).reshape(*input.shape[:-1], B.shape[1])
    return F.linear(input, weight.base, bias) + delta


def _conv_route(conv: Callable[..., torch.Tensor], name: str) -> Callable[..., Any]:
    def route(
        input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: Any = 1
    ) -> Any:
        if type(weight) is not RoutedLoRAWeight or isinstance(bias, RoutedLoRAWeight):
            return NotImplemented
        shape = weight.base.shape
        n = len(shape) - 2
        if input.dim() != n + 2:
            raise ValueError(
                f"{name}: a routed weight needs a batched input (batch, channels, ...), got shape {tuple(input.shape)}"
            )
        batch = input.shape[0]
        if batch == 0:  # no examples: the base convolution gives the right (empty) shape
            _check_batch(weight, batch, name)
            return conv(input, weight.base, bias, stride, padding, dilation, groups)
        if weight.route == "materialize":
            _check_batch(weight, batch, name)
            # Per-example weights as one grouped convolution over the examples stacked on channels.
            per = _materialized(weight).reshape(batch * shape[0], *shape[1:])
            x = input.reshape(1, batch * input.shape[1], *input.shape[2:])
            out = conv(x, per, None, stride, padding, dilation, batch * groups)
            out = out.reshape(batch, shape[0], *out.shape[2:])
            return out if bias is None else out + bias.view(-1, *([1] * n))
        idx, s = _picked(weight, batch, name)
        K, r = weight.A.shape[0], weight.A.shape[1]
        out_g = shape[0] // groups
        kernel_a = weight.A.to(weight.base.dtype).reshape(K * r, *shape[1:])
        if groups != 1:
            kernel_a = kernel_a.repeat(groups, *([1] * (n + 1)))
        h = conv(input, kernel_a, None, stride, padding, dilation, groups)  # (batch, groups*K*r, *spatial)
        spatial = h.shape[2:]
        h = h.reshape(batch, groups, K, r, spatial.numel())
        pick = idx.view(batch, 1, 1, 1, 1).expand(batch, groups, 1, r, h.shape[-1])
        h = h.gather(2, pick).squeeze(2) * s.view(batch, 1, 1, 1)  # (batch, groups, r, P)
        Bg = weight.B.to(weight.base.dtype)[idx].reshape(batch, groups, out_g, r)
        delta = torch.matmul(Bg, h).reshape(batch, shape[0], *spatial)  # (batch, groups, out_g, P)
        return conv(input, weight.base, bias, stride, padding, dilation, groups) + delta

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
    if type(weight) is not RoutedLoRAWeight:
        return NotImplemented
    if max_norm is not None or scale_grad_by_freq or sparse:
        return NotImplemented  # their gradients need one merged table: refused
    if input.dim() < 1:
        raise ValueError("F.embedding: a routed weight needs indices with a leading batch dimension")
    batch, num = input.shape[0], weight.base.shape[0]
    if weight.route == "materialize":
        _check_batch(weight, batch, "F.embedding")
        tables = _materialized(weight)  # (batch, num, dim)
        rows = torch.arange(batch, device=input.device).view(batch, *([1] * (input.dim() - 1)))
        out = tables[rows, input]
    else:
        idx, s = _picked(weight, batch, "F.embedding")
        dt = weight.base.dtype
        A, r = weight.A.to(dt)[idx], weight.A.shape[1]  # (batch, r, dim)
        tokens = input.shape[1:].numel()
        rows = weight.B.to(dt)[idx.view(batch, *([1] * (input.dim() - 1))), input].reshape(batch, tokens, r)
        delta = torch.bmm(rows * s.view(batch, 1, 1), A).reshape(*input.shape, A.shape[-1])
        out = F.embedding(input, weight.base, padding_idx) + delta
        if padding_idx is None:
            return out
    if padding_idx is not None:  # no gradient through the padding row, as F.embedding
        pad = padding_idx + num if padding_idx < 0 else padding_idx
        out = torch.where((input == pad).unsqueeze(-1), out.detach(), out)
    return out


_HANDLERS: dict[Any, Callable[..., Any]] = {
    F.linear: _linear,
    F.conv1d: _conv_route(F.conv1d, "F.conv1d"),
    F.conv2d: _conv_route(F.conv2d, "F.conv2d"),
    F.conv3d: _conv_route(F.conv3d, "F.conv3d"),
    F.embedding: _embedding,
}
