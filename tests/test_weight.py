"""LoRAWeight and lora_params: every route (factored, materialize, auto) against float64 references.

The references are written out here in float64: ``W + s * B @ A`` reshaped to the weight,
then the plain ``F.linear`` / ``F.convNd`` / ``F.embedding``. Outputs and gradients (with
respect to ``A``, ``B`` and the input) of each route must match them.

Every test runs on each available device: data are drawn on the CPU (CPU generators, or
the global seed) and moved, so the values are the same everywhere, and the float64
references are computed on the CPU, where the results are brought back to be compared.

Tolerances: a float32 result of a sum over ``n`` terms is off by at most about
``n · 2⁻²⁴ · Σ|terms|``; with the small sizes drawn here (reductions of at most a few hundred
terms of magnitude ~1) ``1e-4`` relative to the largest reference value bounds it with room
to spare. float64 results get ``1e-10``. bfloat16 (8 bits of mantissa) gets ``3e-2``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

import lora_func as lf

MODES = ("factored", "materialize", "auto")
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """``got`` (on any device) equals the float64 ``want`` up to ``TOL[dtype]`` relative to its largest entry.

    Both are compared on the CPU.
    """
    want = want.cpu()
    scale = float(want.abs().max()) + 1.0
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=0.0, atol=TOL[dtype] * scale)


def to(tree, device: str | torch.device):  # type: ignore[no-untyped-def]
    """Every tensor of ``tree`` (tensors, LoRA nodes, dicts of them) moved to ``device``."""
    return tree_map(lambda t: t.to(device), tree)


def make_lora(
    shape: tuple[int, ...], r: int, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> lf.LoRA:
    """An adapter with B non-zero (the default init's zero B would hide mistakes in B's use).

    Drawn on the CPU and moved, so its values are the same on every device.
    """
    g = torch.Generator().manual_seed(seed)
    in_flat = 1
    for d in shape[1:]:
        in_flat *= d
    A = torch.randn(r, in_flat, generator=g).to(device=device, dtype=dtype)
    B = torch.randn(shape[0], r, generator=g).to(device=device, dtype=dtype)
    return lf.LoRA(A, B, 0.5 + seed % 3, shape)


def merged64(W: torch.Tensor, lora: lf.LoRA) -> torch.Tensor:
    """The float64 reference effective weight, written out, on the CPU."""
    A, B, s = lora.A.cpu().double(), lora.B.cpu().double(), lora.scaling.cpu().double()
    return W.cpu().double() + s * (B @ A).reshape(W.shape)


def with_factors(lora: lf.LoRA, A: torch.Tensor, B: torch.Tensor) -> lf.LoRA:
    return lf.LoRA(A, B, lora.scaling, lora.shape)


def check_route(op, W, lora, x, mode, dtype, device):  # type: ignore[no-untyped-def]
    """Output and gradients (A, B, x) of ``op(x, LoRAWeight)`` on ``device`` against the float64 reference.

    ``W``, ``lora`` and ``x`` are CPU tensors: the reference is computed from them on the CPU,
    the route under test from copies moved to ``device``. ``op(x, w)`` must put any tensor of
    its own on ``w.device``.
    """
    W_d, lora_d, x_d = W.to(device), to(lora, device), x.to(device)

    def ours(A, B, x):  # type: ignore[no-untyped-def]
        return op(x, lf.LoRAWeight(W_d, with_factors(lora_d, A, B), mode))

    def ref(A, B, x):  # type: ignore[no-untyped-def]
        eff = W.double() + lora.scaling.double() * (B @ A).reshape(W.shape)
        return op(x, eff)

    A64, B64, x64 = lora.A.double(), lora.B.double(), x.double()
    out = ours(lora_d.A, lora_d.B, x_d)
    want = ref(A64, B64, x64)
    assert out.dtype == W.dtype and out.device == W_d.device
    close(out, want, dtype)
    # A fixed random cotangent, so that every output entry matters to the gradients.
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cot_d = cot.to(device)
    grads = grad(lambda A, B, x: (ours(A, B, x).double() * cot_d).sum(), argnums=(0, 1, 2))(lora_d.A, lora_d.B, x_d)
    wants = grad(lambda A, B, x: (ref(A, B, x) * cot).sum(), argnums=(0, 1, 2))(A64, B64, x64)
    for g, w in zip(grads, wants, strict=True):
        close(g, w, dtype)
    # The merged route through effective_params (the library's own reference) agrees too.
    close(op(x_d, lf.merge(W_d, lora_d)), want, dtype)


@given(
    out_f=st.integers(1, 24),
    in_f=st.integers(1, 24),
    r=st.integers(1, 6),
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_float64_reference(device, out_f, in_f, r, lead, bias, dtype, mode, seed) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    lora = make_lora((out_f, in_f), r, seed, dtype)

    def op(x, w):  # type: ignore[no-untyped-def]
        return F.linear(x, w, None if b is None else b.to(w.device, w.dtype))

    check_route(op, W, lora, x, mode, dtype, device)


@st.composite
def conv_cases(draw):  # type: ignore[no-untyped-def]
    n = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    in_c = groups * draw(st.integers(1, 3))
    out_c = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    padding = draw(st.one_of(st.sampled_from(["same", "valid"]), st.tuples(*[st.integers(0, 2)] * n)))
    stride = (1,) * n if padding == "same" else tuple(draw(st.integers(1, 3)) for _ in range(n))
    size = tuple(dilation[i] * (k[i] - 1) + draw(st.integers(1, 5 if n < 3 else 3)) for i in range(n))
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    return n, groups, in_c, out_c, k, stride, padding, dilation, size, batch


CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# torch's own notice that 'same' padding with an even kernel copies the input; not ours.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@given(
    case=conv_cases(),
    r=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    mode=st.sampled_from(MODES),
    keywords=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_matches_float64_reference(device, case, r, dtype, mode, keywords, seed) -> None:  # type: ignore[no-untyped-def]
    n, groups, in_c, out_c, k, stride, padding, dilation, size, batch = case
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_c, in_c // groups, *k, generator=g).to(dtype)
    b = torch.randn(out_c, generator=g).to(dtype)
    x = torch.randn(*batch, in_c, *size, generator=g).to(dtype)
    lora = make_lora(tuple(W.shape), r, seed, dtype)
    conv = CONVS[n]

    def op(x, w):  # type: ignore[no-untyped-def]
        bias = b.to(w.device, w.dtype)
        if keywords:  # the keyword form, as some code calls it
            return conv(input=x, weight=w, bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
        return conv(x, w, bias, stride, padding, dilation, groups)  # nn.ConvNd's positional form

    check_route(op, W, lora, x, mode, dtype, device)


@given(
    num=st.integers(2, 20),
    dim=st.integers(1, 12),
    r=st.integers(1, 4),
    tokens=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    padding_idx=st.one_of(st.none(), st.integers(-2, 1)),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_embedding_matches_float64_reference(device, num, dim, r, tokens, padding_idx, mode, seed) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(num, dim, generator=g)
    lora = make_lora((num, dim), r, seed)
    idx = torch.randint(0, num, tokens, generator=g)
    if padding_idx is not None:
        idx.view(-1)[0] = padding_idx % num  # make sure a padding position is there
    A64, B64 = lora.A.double(), lora.B.double()
    cot = torch.randn(*tokens, dim, generator=g, dtype=torch.float64)
    W_d, lora_d, idx_d, cot_d = W.to(device), to(lora, device), idx.to(device), cot.to(device)

    def ours(A, B):  # type: ignore[no-untyped-def]
        return F.embedding(idx_d, lf.LoRAWeight(W_d, with_factors(lora_d, A, B), mode), padding_idx)

    def ref(A, B):  # type: ignore[no-untyped-def]
        eff = W.double() + lora.scaling.double() * (B @ A)
        return F.embedding(idx, eff, padding_idx)

    close(ours(lora_d.A, lora_d.B), ref(A64, B64), torch.float32)
    got = grad(lambda A, B: (ours(A, B).double() * cot_d).sum(), argnums=(0, 1))(lora_d.A, lora_d.B)
    want = grad(lambda A, B: (ref(A, B) * cot).sum(), argnums=(0, 1))(A64, B64)
    for a, b in zip(got, want, strict=True):
        close(a, b, torch.float32)


def test_embedding_options_that_need_the_merged_table(device: str) -> None:
    W = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    lora = make_lora((6, 4), 2, 0)
    idx = torch.tensor([0, 2, 2, 5])
    eff = merged64(W, lora)
    w = lf.LoRAWeight(W.to(device), to(lora, device), "factored")
    for kwargs in ({"scale_grad_by_freq": True}, {"max_norm": 1.0}):
        got = F.embedding(idx.to(device), w, **kwargs)
        close(got, F.embedding(idx, eff.clone(), **kwargs), torch.float32)


# --- through functional_call: lora_params against effective_params ---------------------------


def conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),
        torch.nn.GELU(),
        torch.nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding="same"),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 5),
    ).requires_grad_(False)


def random_adapters(params, seed: int = 0):  # type: ignore[no-untyped-def]
    """Adapters for every weight of ``params``, drawn on the CPU, on the weights' device."""
    return {
        n: make_lora(tuple(params[n].shape), 2, seed + i, device=params[n].device)
        for i, n in enumerate(sorted(params))
        if n.endswith("weight")
    }


@pytest.mark.parametrize("mode", MODES)
def test_lora_params_equals_effective_params_under_grad_and_autograd(mode: str, device: str) -> None:
    model = conv_model().to(device)
    params = lf.base_params(model)
    adapters = random_adapters(params)
    x = torch.randn(2, 3, 8, 8).to(device)

    def loss(ad, make):  # type: ignore[no-untyped-def]
        return functional_call(model, make(params, ad), (x,)).square().mean()

    lp = lambda p, a: lf.lora_params(p, a, mode=mode)  # noqa: E731
    torch.testing.assert_close(loss(adapters, lp), loss(adapters, lf.effective_params), rtol=1e-5, atol=0)
    got = grad(loss)(adapters, lp)
    want = grad(loss)(adapters, lf.effective_params)
    for n in adapters:
        torch.testing.assert_close((got[n].A, got[n].B), (want[n].A, want[n].B), rtol=1e-4, atol=1e-6)
    # Plain autograd: leaves that require grad, loss.backward().
    leaves = {
        n: with_factors(a, a.A.clone().requires_grad_(), a.B.clone().requires_grad_()) for n, a in adapters.items()
    }
    loss(leaves, lp).backward()
    for n in adapters:
        torch.testing.assert_close(leaves[n].A.grad, want[n].A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(leaves[n].B.grad, want[n].B, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_vmap_over_stacked_adapters_equals_a_loop(mode: str, device: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).requires_grad_(False)
    model = model.to(device)
    params = lf.base_params(model)
    trees = [random_adapters(params, seed) for seed in (0, 10, 20)]
    xs = torch.randn(3, 5, 6).to(device)

    def loss(ad, x, make):  # type: ignore[no-untyped-def]
        return functional_call(model, make(params, ad), (x,)).square().sum()

    lp = lambda p, a: lf.lora_params(p, a, mode=mode)  # noqa: E731
    got = vmap(grad(loss), in_dims=(0, 0, None))(lf.stack(trees), xs, lp)
    for i, tree in enumerate(trees):
        want = grad(loss)(tree, xs[i], lf.effective_params)
        for n in tree:
            torch.testing.assert_close(got[n].A[i], want[n].A, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got[n].B[i], want[n].B, rtol=1e-4, atol=1e-6)


def test_auto_picks_the_cheaper_route(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    merges = []
    original = lf.LoRAWeight.materialize
    monkeypatch.setattr(lf.LoRAWeight, "materialize", lambda self: merges.append(1) or original(self))
    W = torch.randn(16, 16).to(device)
    w = lf.LoRAWeight(W, make_lora((16, 16), 2, 0, device=device))  # merge costs 16·16·r, factored tokens·32·r
    F.linear(torch.randn(4, 16).to(device), w)
    assert merges == []
    F.linear(torch.randn(9, 16).to(device), w)
    assert merges == [1]
    # A conv counts output pixels: 1 image of 2x2 outputs is cheap to factor, 8x8 is not.
    Wc = torch.randn(8, 8, 3, 3).to(device)
    wc = lf.LoRAWeight(Wc, make_lora((8, 8, 3, 3), 2, 0, device=device))
    F.conv2d(torch.randn(1, 8, 4, 4).to(device), wc)
    assert merges == [1]
    F.conv2d(torch.randn(1, 8, 10, 10).to(device), wc)
    assert merges == [1, 1]


def test_other_ops_see_the_merged_weight_with_gradients(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 4, generator=g)
    lora = make_lora((5, 4), 3, 0)
    v = torch.randn(4, dtype=torch.float64, generator=g)
    W_d, lora_d = W.to(device), to(lora, device)

    def uses(w):  # type: ignore[no-untyped-def]
        # w.device is metadata (the base weight's): v goes where w is, the CPU for the reference.
        return [w.sum(), w @ v.to(w.device, w.dtype), w.T, torch.add(w, 1), w * w, w.flatten(), w[1:3]]

    def ours(A, B):  # type: ignore[no-untyped-def]
        return uses(lf.LoRAWeight(W_d, with_factors(lora_d, A, B)))

    def ref(A, B):  # type: ignore[no-untyped-def]
        return uses(W.double() + lora.scaling.double() * (B @ A))

    got, want = ours(lora_d.A, lora_d.B), ref(lora.A.double(), lora.B.double())
    for a, b in zip(got, want, strict=True):
        assert type(a) is torch.Tensor
        close(a, b, torch.float32)
    total = lambda f: lambda A, B: sum(t.double().sum() for t in f(A, B))  # noqa: E731
    got_g = grad(total(ours), argnums=(0, 1))(lora_d.A, lora_d.B)
    want_g = grad(total(ref), argnums=(0, 1))(lora.A.double(), lora.B.double())
    for a, b in zip(got_g, want_g, strict=True):
        close(a, b, torch.float32)
    # A conv this module does not factor (transposed) merges too.
    Wt = torch.randn(3, 2, 3, generator=g)
    lt = make_lora((3, 2, 3), 2, 1)
    x = torch.randn(1, 3, 5, generator=g)
    got_t = F.conv_transpose1d(x.to(device), lf.LoRAWeight(Wt.to(device), to(lt, device)))
    close(got_t, F.conv_transpose1d(x.double(), merged64(Wt, lt)), torch.float32)


def test_metadata_is_the_base_weights_and_merges_nothing(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setattr(lf.LoRAWeight, "materialize", lambda self: pytest.fail("metadata access merged the weight"))
    W = torch.randn(5, 4, dtype=torch.float64).to(device)
    lora = make_lora((5, 4), 2, 0, torch.float64, device)
    w = lf.LoRAWeight(W, lora)
    assert (w.shape, w.dtype, w.device, w.ndim, w.dim(), w.size(1), w.numel(), len(w)) == (
        torch.Size([5, 4]), torch.float64, W.device, 2, 2, 4, 20, 5,
    )  # fmt: skip
    assert not w.requires_grad
    lora.A.requires_grad_()
    assert lf.LoRAWeight(W, lora).requires_grad
    assert repr(w) == "LoRAWeight(shape=(5, 4), r=2, dtype=float64, mode='auto')"
    assert w.lora.A is lora.A and w.lora.shape == (5, 4)


def test_compiled_training_step_fullgraph(device: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)).requires_grad_(False)
    model = model.to(device)
    params = lf.base_params(model)
    adapters = random_adapters(params)
    x = torch.randn(4, 6).to(device)

    def loss(ad):  # type: ignore[no-untyped-def]
        return functional_call(model, lf.lora_params(params, ad), (x,)).square().mean()

    def step(ad):  # type: ignore[no-untyped-def]
        g = grad(loss)(ad)
        return {n: with_factors(a, a.A - 0.1 * g[n].A, a.B - 0.1 * g[n].B) for n, a in ad.items()}

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(adapters)
    # For inference a LoRAWeight can also be an argument of the compiled function.
    w = lf.LoRAWeight(params["0.weight"], adapters["0.weight"])
    y = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True, backend="aot_eager")(x, w)
    close(y, x.cpu().double() @ merged64(params["0.weight"], adapters["0.weight"]).T, torch.float32)
    want = step(adapters)
    for n in adapters:
        torch.testing.assert_close(got[n].A, want[n].A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[n].B, want[n].B, rtol=1e-5, atol=1e-6)


# --- errors ---------------------------------------------------------------------------------


def test_errors(device: str) -> None:
    # On the device, so that no check about devices fires before the one each case is about.
    W = torch.randn(4, 3).to(device)
    lora = make_lora((4, 3), 2, 0, device=device)
    with pytest.raises(ValueError, match=r"LoRAWeight\(base, lora\): unknown mode 'fast'"):
        lf.LoRAWeight(W, lora, "fast")
    with pytest.raises(ValueError, match=r"lora_params\(params, adapters\): unknown mode 'fast'"):
        lf.lora_params({"w": W}, {"w": lora}, mode="fast")
    with pytest.raises(TypeError, match=r"LoRAWeight\(base, lora\): base must be a torch.Tensor"):
        lf.LoRAWeight([[1.0]], lora)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"LoRAWeight\(base, lora\): lora must be a lora_func.LoRA"):
        lf.LoRAWeight(W, (lora.A, lora.B))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"lora is missing"):
        lf.LoRAWeight(W)
    with pytest.raises(TypeError, match=r"either lora or A, B and scaling"):
        lf.LoRAWeight(W, lora, A=lora.A)
    with pytest.raises(ValueError, match=r"LoRAWeight\(base, lora\): lora has batch dimensions \(2,\)"):
        lf.LoRAWeight(W, lf.stack([lora, lora]))
    with pytest.raises(ValueError, match=r"lora_params\(params, adapters\): adapter 'w': .*batch dimensions"):
        lf.lora_params({"w": W}, {"w": lf.stack([lora, lora])})
    with pytest.raises(ValueError, match=r"base has shape \(3, 4\)"):
        lf.LoRAWeight(W.T.contiguous(), lora)
    with pytest.raises(ValueError, match=r"lora_params\(params, adapters\): adapter 'w': .*shape \(3, 4\)"):
        lf.lora_params({"w": W.T.contiguous()}, {"w": lora})
    with pytest.raises(ValueError, match=r"lora_params\(params, adapters\): adapters \['v'\] name no parameter"):
        lf.lora_params({"w": W}, {"v": lora})
    with pytest.raises(TypeError, match=r"lora_params\(params, adapters\): adapters must map names to lora_func.LoRA"):
        lf.lora_params({"w": W}, {"w": W})
    with pytest.raises(ValueError, match=r"scaling must be a 0-d tensor"):
        lf.LoRAWeight(W, A=lora.A, B=lora.B, scaling=torch.ones(2, device=device))
    with pytest.raises(ValueError, match=r"were made for another shape"):
        lf.LoRAWeight(W, A=lora.A, B=torch.randn(5, 2).to(device), scaling=lora.scaling)
