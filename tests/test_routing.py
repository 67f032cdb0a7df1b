"""Per-example routing: ``lora_params(params, stacked, index=idx)`` against a loop over examples.

The reference runs each example alone through ``functional_call`` with its own merged weight,
written out in float64 (``W + s·B@A`` of adapter ``idx[i]``, or ``W`` for ``-1``), and with
``lora_func.merge`` of that adapter. Outputs and gradients (to the stacked ``A``, ``B`` and
``scaling`` and to the input) of the routed call must match it; adapters no example uses
must get exactly zero gradient.

Tolerances: the sizes drawn here keep every reduction to at most a few hundred terms of
magnitude ~1, so a float32 result is within ``1e-4`` of the float64 one relative to the
largest reference value (n·2⁻²⁴·Σ|terms| with room to spare); float64 gets ``1e-10``.

Every test runs on each available device: models, inputs and adapters are drawn on the CPU
and moved, and the float64 loop reference runs on the CPU, where results are compared.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import lora_func as lf

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
MODES = ("auto", "materialize")


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """``got`` (on any device) equals ``want`` up to ``TOL[dtype]`` relative to its largest entry, on the CPU."""
    want = want.detach().cpu().double()
    scale = float(want.abs().max()) + 1.0 if want.numel() else 1.0
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=0.0, atol=TOL[dtype] * scale)


def stacked_adapters(params: dict[str, torch.Tensor], k: int, r: int, seed: int, dtype: torch.dtype) -> dict:
    """K adapters with non-zero B and distinct scalings, stacked, on the weights' device (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, W in params.items():
        if name.endswith("weight"):
            in_flat = W[0].numel()
            A = torch.randn(k, r, in_flat, generator=g).to(W.device, dtype)
            B = torch.randn(k, W.shape[0], r, generator=g).to(W.device, dtype)
            s = (torch.rand(k, generator=g) + 0.5).to(W.device, dtype)
            out[name] = lf.LoRA(A, B, s, tuple(W.shape))
    return out


def loop_reference(model: nn.Module, params: dict, stacked: dict, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each example alone, with its own merged weight written out in float64, on the CPU.

    ``functional_call`` replaces every parameter of these buffer-free models by a CPU float64
    one, so the reference runs on the CPU whatever device ``model`` is on. ``.cpu()`` keeps
    the autograd graph of leaves given on the CPU (the gradient reference).
    """
    outs = []
    p64 = {n: p.detach().cpu().double() for n, p in params.items()}
    for i, k in enumerate(index.tolist()):
        merged = dict(p64)
        if k >= 0:
            for name, lo in stacked.items():
                A, B, s = (t[k].cpu().double() for t in (lo.A, lo.B, lo.scaling))
                merged[name] = p64[name] + s * (B @ A).reshape(p64[name].shape)
        xi = x[i : i + 1].cpu()
        outs.append(functional_call(model, merged, (xi.double() if xi.is_floating_point() else xi,)))
    return torch.cat(outs)


def routed(model: nn.Module, params: dict, stacked: dict, index: torch.Tensor, x: torch.Tensor, mode: str) -> Any:
    return functional_call(model, lf.lora_params(params, stacked, index=index, mode=mode), (x,))


def make_model(
    kind: str, dims: dict[str, Any], dtype: torch.dtype, device: str
) -> tuple[nn.Module, torch.Tensor, torch.Generator]:
    """A model and an input, drawn on the CPU from ``dims["seed"]``, then moved to ``device``."""
    g = torch.Generator().manual_seed(dims["seed"])
    torch.manual_seed(dims["seed"])
    b = dims["batch"]
    if kind == "linear":
        model: nn.Module = nn.Sequential(nn.Linear(dims["a"], dims["b"]), nn.Tanh(), nn.Linear(dims["b"], 3))
        x = torch.randn(b, *dims["lead"], dims["a"], generator=g)
    elif kind in ("conv1d", "conv2d"):
        n = 1 if kind == "conv1d" else 2
        conv = nn.Conv1d if n == 1 else nn.Conv2d
        groups = dims["groups"]
        model = conv(2 * groups, dims["b"] * groups, 3, stride=dims["stride"], padding=dims["padding"], groups=groups)
        x = torch.randn(b, 2 * groups, *([5] * n), generator=g)
    else:
        model = nn.Embedding(dims["a"] + 2, dims["b"], padding_idx=dims["pad"])
        x = torch.randint(0, dims["a"] + 2, (b, *dims["lead"]), generator=g)
    model = model.to(device=device, dtype=dtype)
    return model, (x.to(device, dtype) if x.is_floating_point() else x.to(device)), g


cases = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["linear", "conv1d", "conv2d", "embedding"]),
        "a": st.integers(1, 6),
        "b": st.integers(1, 5),
        "lead": st.lists(st.integers(1, 3), max_size=2),
        "batch": st.integers(1, 6),
        "k": st.integers(1, 4),
        "r": st.integers(1, 3),
        "groups": st.sampled_from([1, 2]),
        "stride": st.integers(1, 2),
        "padding": st.integers(0, 1),
        "pad": st.sampled_from([None, 0]),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "mode": st.sampled_from(MODES),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=200)  # ~5 ms each: the four layer kinds get ~50 draws apiece
@given(case=cases, data=st.data())
def test_routing_matches_loop_of_merged_weights(device: str, case: dict[str, Any], data: st.DataObject) -> None:
    dtype, k = case["dtype"], case["k"]
    model, x, _ = make_model(case["kind"], case, dtype, device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    stacked = stacked_adapters(params, k, case["r"], case["seed"], dtype)
    index_cpu = torch.tensor(
        data.draw(st.lists(st.integers(-1, k - 1), min_size=case["batch"], max_size=case["batch"]))
    )
    index = index_cpu.to(device)
    want = loop_reference(model, params, stacked, index, x)

    # Outputs.
    got = routed(model, params, stacked, index, x, case["mode"])
    assert got.dtype == dtype
    close(got, want, dtype)
    # The library's own merge, per example, agrees too.
    for i, ki in enumerate(index.tolist()):
        eff = params if ki < 0 else lf.effective_params(params, {n: lf.unstack(a)[ki] for n, a in stacked.items()})
        close(functional_call(model, eff, (x[i : i + 1],))[0], want[i], dtype)

    # Gradients, with a fixed random cotangent, against the loop's (float64 leaves).
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    live = {n: a.replace(A=a.A.clone().requires_grad_(), B=a.B.clone().requires_grad_()) for n, a in stacked.items()}
    live = {n: a.replace(scaling=a.scaling.clone().requires_grad_()) for n, a in live.items()}
    xg = x.clone().requires_grad_() if x.is_floating_point() else x
    (routed(model, params, live, index, xg, case["mode"]).double() * cot.to(device)).sum().backward()
    # The reference's leaves: float64 copies on the CPU.
    ref = {
        n: a.replace(A=a.A.cpu().double().requires_grad_(), B=a.B.cpu().double().requires_grad_())
        for n, a in stacked.items()
    }
    ref = {n: a.replace(scaling=a.scaling.cpu().double().requires_grad_()) for n, a in ref.items()}
    xr = x.detach().cpu().double().requires_grad_() if x.is_floating_point() else x
    out_ref = loop_reference(model, params, ref, index, xr)
    if out_ref.requires_grad:  # not when every index is -1 and the input is integer
        (out_ref * cot).sum().backward()
    used = torch.zeros(k, dtype=torch.bool)
    used[index_cpu[index_cpu >= 0]] = True
    for n in stacked:
        for leaf in ("A", "B", "scaling"):
            g_got, g_want = getattr(live[n], leaf).grad, getattr(ref[n], leaf).grad
            if g_want is None:  # the loop never touched the stack: every index was -1
                g_want = torch.zeros_like(getattr(ref[n], leaf))
            close(g_got, g_want, dtype)
            assert torch.all(g_got.cpu()[~used] == 0), f"{n}.{leaf}: an unused adapter got gradient"
    if x.is_floating_point():
        close(xg.grad, xr.grad, dtype)


def test_unused_adapters_get_exactly_zero_and_used_ones_do_not(device: str) -> None:
    """The zero-gradient check above can fail: used adapters do get gradient."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    stacked = stacked_adapters(params, 4, 2, 0, torch.float32)
    live = {n: a.replace(A=a.A.clone().requires_grad_()) for n, a in stacked.items()}
    index = torch.tensor([2, -1, 0, 2], device=device)
    routed(model, params, live, index, torch.randn(4, 4).to(device), "auto").sum().backward()
    norms = live["weight"].A.grad.flatten(1).abs().sum(1)
    assert (norms[[0, 2]] > 0).all() and (norms[[1, 3]] == 0).all()


def test_all_minus_one_is_the_base_model(device: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 2)).to(device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    stacked = stacked_adapters(params, 3, 2, 1, torch.float32)
    x = torch.randn(5, 2, 4, 4).to(device)
    got = routed(model, params, stacked, torch.full((5,), -1, device=device), x, "auto")
    torch.testing.assert_close(got, model(x), rtol=0, atol=1e-6)


def test_compiled_inference_fullgraph_matches_eager(device: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    stacked = stacked_adapters(params, 4, 2, 2, torch.float32)
    tokens, index = torch.randint(0, 10, (5, 7)).to(device), torch.tensor([3, -1, 0, 0, 2], device=device)

    def infer(stacked: dict, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return functional_call(model, lf.lora_params(params, stacked, index=index), (tokens,))

    eager = infer(stacked, tokens, index)
    compiled = torch.compile(infer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(stacked, tokens, index), eager, rtol=0, atol=1e-6)
    # A different routing reuses the graph and still routes (the index is an input, not a constant).
    other = torch.tensor([0, 1, 2, 3, -1], device=device)
    torch.testing.assert_close(compiled(stacked, tokens, other), infer(stacked, tokens, other), rtol=0, atol=1e-6)
    # Gradients of a compiled torch.func.grad equal eager ones.
    loss = lambda s: infer(s, tokens, index).square().sum()  # noqa: E731
    got = torch.compile(torch.func.grad(loss), fullgraph=True, backend="aot_eager")(stacked)
    want = torch.func.grad(loss)(stacked)
    for a, b in zip(lf.trainable(got), lf.trainable(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("op", "match"),
    [
        # w.device is metadata (the base weight's): each operand is made where the weight is.
        (lambda w: w.sum(), r"sum cannot use a routed weight"),
        (lambda w: w @ torch.ones(3, device=w.device), r"matmul cannot use a routed weight"),
        (
            lambda w: torch.nn.functional.embedding(
                torch.zeros(2, 1, dtype=torch.long, device=w.device), w, max_norm=1.0
            ),
            r"embedding",
        ),
        (
            lambda w: torch.nn.functional.linear(torch.ones(3, 3, device=w.device), w),
            r"F.linear: the input has 3 examples",
        ),
        (
            lambda w: torch.nn.functional.linear(torch.ones(3, device=w.device), w),
            r"F.linear: a routed weight needs an input",
        ),
    ],
    ids=["sum", "matmul", "embedding-max_norm", "batch-mismatch", "unbatched"],
)
def test_ops_without_a_routed_form_are_refused(op: Any, match: str, device: str) -> None:
    W = torch.randn(4, 3).to(device)
    stacked = stacked_adapters({"weight": W}, 2, 2, 0, torch.float32)
    w = lf.lora_params({"weight": W}, stacked, index=torch.tensor([0, 1], device=device))["weight"]
    assert isinstance(w, lf.RoutedLoRAWeight) and w.shape == (4, 3) and w.dtype == torch.float32
    assert w.device == W.device
    with pytest.raises(ValueError, match=match):
        op(w)


def test_lora_params_refuses_bad_routing(device: str) -> None:
    # Weights and indices on the device: the device check must not fire before the one each case is about.
    W = torch.randn(4, 3).to(device)
    stacked = stacked_adapters({"weight": W}, 2, 2, 0, torch.float32)
    single = {"weight": lf.unstack(stacked["weight"])[0]}
    with pytest.raises(ValueError, match=r"lora_params.*index.*not stacked"):
        lf.lora_params({"weight": W}, single, index=torch.tensor([0], device=device))
    with pytest.raises(ValueError, match=r"lora_params.*differ in K"):
        lf.lora_params(
            {"weight": W, "v": W},
            {"weight": stacked["weight"], "v": lf.stack([single["weight"]] * 3)},
            index=torch.tensor([0], device=device),
        )
    with pytest.raises(ValueError, match=r"lora_params.*index must have shape \(batch,\)"):
        lf.lora_params({"weight": W}, stacked, index=torch.tensor([[0]], device=device))
    with pytest.raises(TypeError, match=r"lora_params.*index must be a \(batch,\) integer tensor"):
        lf.lora_params({"weight": W}, stacked, index=[0, 1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"lora_params.*integer dtype"):
        lf.lora_params({"weight": W}, stacked, index=torch.tensor([True], device=device))
    with pytest.raises(ValueError, match=r"lora_params.*index is on meta"):
        lf.lora_params({"weight": W}, stacked, index=torch.tensor([0], device="meta"))
    with pytest.raises(ValueError, match=r"lora_params.*must lie in \[-1, 2\)"):
        lf.lora_params({"weight": W}, stacked, index=torch.tensor([0, 2], device=device))
    with pytest.raises(ValueError, match=r"lora_params.*unknown mode"):
        lf.lora_params({"weight": W}, stacked, index=torch.tensor([0], device=device), mode="fast")
