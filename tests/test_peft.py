"""PEFT directories in and out, checked against the real peft package; the apply_lora state dict."""

from __future__ import annotations

import copy
import json
import warnings

import pytest

peft = pytest.importorskip("peft")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import lora_func  # noqa: E402

from .conftest import to_device  # noqa: E402

# Everything runs in float64: PEFT adds B(A(x)) to the base output, we use the merged weight;
# the two differ only by float64 rounding of sums of a few dozen terms (~1e-15 relative), on
# any device (TF32 touches float32 only).
TOL = {"rtol": 1e-10, "atol": 1e-10}


class Net(nn.Module):
    """One of every layer kind PEFT's LoRA targets, plus a nested name."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 5)
        self.block = nn.Sequential(nn.Conv1d(5, 4, 3), nn.Conv2d(3, 4, 3))
        self.c3 = nn.Conv3d(2, 3, 2)

    def forward(self, ids, s2, s3):
        h = self.lin(self.emb(ids))  # (b, L, 5)
        return self.block[0](h.transpose(1, 2)).flatten(1), self.block[1](s2).flatten(1), self.c3(s3).flatten(1)


TARGETS = ["emb", "lin", "block.0", "block.1", "c3"]


def _net(seed: int = 0, device: str = "cpu") -> Net:
    """The base model, initialised on the CPU (the same values everywhere), then moved."""
    torch.manual_seed(seed)
    return Net().double().to(device)


def _inputs(seed: int = 1, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, then moved
    ids = torch.randint(0, 10, (2, 5), generator=g)
    return (
        ids.to(device),
        torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64).to(device),
        torch.randn(2, 2, 3, 3, 3, generator=g, dtype=torch.float64).to(device),
    )


def _ours(base: nn.Module, adapters, inputs):
    params = lora_func.effective_params(lora_func.base_params(base), adapters)
    return torch.func.functional_call(base, params, inputs)


def _reference(base: nn.Module, adapters, inputs):
    """The adapted model with W + s*B@A written out in float64, in a copy of the base on the CPU."""
    model = copy.deepcopy(base).cpu()
    with torch.no_grad():
        for name, lora in adapters.items():
            w = model.get_parameter(name)
            w += float(lora.scaling) * (lora.B.cpu().double() @ lora.A.cpu().double()).view(w.shape)
    return model(*to_device(inputs, "cpu"))


def _assert_outputs_close(a, b):
    """Outputs (one tensor or a tuple) equal within TOL, compared on the CPU."""
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.cpu(), y.cpu(), **TOL)


def _peft_model(rank_pattern, alpha_pattern, use_rslora, device, seed=0):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=use_rslora,
    )
    model = peft.get_peft_model(_net(device=device), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero: make every factor non-trivial (drawn on the CPU)
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_made_adapters_load_with_equal_outputs(tmp_path, use_rslora, device):
    model = _peft_model({"lin": 2, "block.1": 3}, {"c3": 5, "block.0": 1.5}, use_rslora, device)
    model.save_pretrained(tmp_path)
    adapters = lora_func.import_peft(tmp_path, device=device)
    assert sorted(adapters) == sorted(f"{t}.weight" for t in TARGETS)
    assert {n: a.r for n, a in adapters.items()}["lin.weight"] == 2
    expected_scaling = 5 / (4**0.5) if use_rslora else 5 / 4
    assert float(adapters["c3.weight"].scaling) == pytest.approx(expected_scaling, rel=1e-7)
    base, inputs = _net(device=device), _inputs(device=device)
    with torch.no_grad():
        _assert_outputs_close(_ours(base, adapters, inputs), model(*inputs))
        _assert_outputs_close(_ours(base, adapters, inputs), _reference(base, adapters, inputs))


def _random_adapters(base: nn.Module, ranks: dict[str, int], alphas: dict[str, float], seed: int):
    """Adapters on ``base``'s device, drawn on the CPU (the same values on every device)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, r in ranks.items():
        w = base.get_parameter(name)
        in_flat = w[0].numel()
        A = torch.randn(r, in_flat, generator=g, dtype=w.dtype).to(w.device)
        B = torch.randn(w.shape[0], r, generator=g, dtype=w.dtype).to(w.device)
        out[name] = lora_func.LoRA(A, B, torch.tensor(alphas[name] / r, device=w.device), tuple(w.shape))
    return out


@settings(max_examples=6)
@given(
    ranks=st.lists(st.integers(1, 4), min_size=5, max_size=5),
    alphas=st.lists(st.sampled_from([0.5, 1.0, 3.0, 16.0]), min_size=5, max_size=5),
    seed=st.integers(0, 1000),
)
def test_our_adapters_load_into_peft_with_equal_outputs(tmp_path_factory, device, ranks, alphas, seed):
    base = _net(device=device)
    names = [f"{t}.weight" for t in TARGETS]
    adapters = _random_adapters(base, dict(zip(names, ranks, strict=True)), dict(zip(names, alphas, strict=True)), seed)
    folder = tmp_path_factory.mktemp("peft")
    lora_func.export_peft(adapters, folder, model=base)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    inputs = _inputs(seed, device)
    with torch.no_grad():
        _assert_outputs_close(model(*inputs), _reference(base, adapters, inputs))
    # ...and back: bit for bit on every device (the file and the moves between devices copy, never round).
    back = lora_func.import_peft(folder, device=device)
    for name, lora in adapters.items():
        assert torch.equal(back[name].A, lora.A) and torch.equal(back[name].B, lora.B)
        assert float(back[name].scaling) == float(lora.scaling)


def test_layouts_are_peft_s(tmp_path, device):
    base = _net(device=device)
    adapters = _random_adapters(
        base, {n: 2 for n in ("emb.weight", "block.1.weight")}, {"emb.weight": 2.0, "block.1.weight": 2.0}, 0
    )
    lora_func.export_peft(adapters, tmp_path, model=base)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    emb = to_device(adapters["emb.weight"], "cpu")  # the file's tensors are on the CPU; copies, exact
    assert torch.equal(tensors["base_model.model.emb.lora_embedding_A"], emb.B.T)  # (r, num_embeddings)
    assert torch.equal(tensors["base_model.model.emb.lora_embedding_B"], emb.A.T)  # (embedding_dim, r)
    assert tensors["base_model.model.block.1.lora_A.weight"].shape == (2, 3, 3, 3)
    assert tensors["base_model.model.block.1.lora_B.weight"].shape == (4, 2, 1, 1)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2.0 and config["rank_pattern"] == {}


def test_fan_in_fan_out_conv1d_from_transformers(tmp_path, device):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(5, 3), nn.Tanh(), Conv1D(2, 5)).double().to(device)  # weights stored (in, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out choices
        model = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0", "2"], fan_in_fan_out=True)
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # drawn on the CPU (as p.normal_() there), the same values on every device
                p.copy_(torch.randn(p.shape, dtype=p.dtype))
    model.save_pretrained(tmp_path)
    adapters = lora_func.import_peft(tmp_path, device=device)
    assert adapters["0.weight"].shape == (3, 5)
    x = torch.randn(4, 3, dtype=torch.float64).to(device)
    with torch.no_grad():
        torch.testing.assert_close(_ours(base, adapters, (x,)), model.eval()(x), **TOL)
    # ...and out again, recognised from the module type.
    lora_func.export_peft(adapters, tmp_path / "again", model=base)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), **TOL)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"modules_to_save": ["head"]}, "modules_to_save"),
    ],
)
def test_unrepresentable_peft_features_are_errors(tmp_path, device, config, match):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    base.head = nn.Linear(2, 2)
    base.to(device)
    with warnings.catch_warnings():
        # PEFT's save warns that a LoRA bias (1-D) looks like an unsharded tensor: not our concern.
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "1"], **config))
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"import_peft\(directory\): .*features lora_func cannot represent.*{match}"):
        lora_func.import_peft(tmp_path)


def test_unknown_tensors_and_bad_files_are_errors(tmp_path, device):
    base = _net(device=device)
    lora_func.export_peft(_random_adapters(base, {"lin.weight": 2}, {"lin.weight": 2.0}, 0), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "base_model.model.lin.lora_magnitude_vector": torch.ones(5)}, str(weights))
    with pytest.raises(ValueError, match=r"cannot represent .*lora_magnitude_vector"):
        lora_func.import_peft(tmp_path)
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, str(weights))
    with pytest.raises(ValueError, match="only one of the two factors of 'lin'"):
        lora_func.import_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    save_file(tensors, str(weights))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match="'lin' has rank 2 but its config says 3"):
        lora_func.import_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    with pytest.raises(ValueError, match="init_lora_weights"):
        lora_func.import_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="not a PEFT LoRA config"):
        lora_func.import_peft(tmp_path)
    weights.write_bytes(b"garbage")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lora_func.import_peft(tmp_path)
    weights.unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"adapter_model.bin is a pickle"):
        lora_func.import_peft(tmp_path)


def test_export_errors(tmp_path, device):
    base = _net(device=device)
    good = _random_adapters(base, {"lin.weight": 2}, {"lin.weight": 2.0}, 0)["lin.weight"]
    with pytest.raises(ValueError, match=r"export_peft\(adapters, directory\): adapters\['lin.bias'\].*'.weight'"):
        lora_func.export_peft({"lin.bias": good}, tmp_path)
    with pytest.raises(ValueError, match=r"adapters\['lin.weight'\] is stacked"):
        lora_func.export_peft({"lin.weight": lora_func.stack([good, good])}, tmp_path)
    norm = nn.Sequential(nn.Bilinear(2, 3, 4)).to(device)
    with pytest.raises(ValueError, match="is on a Bilinear; PEFT's LoRA targets"):
        lora_func.export_peft({"0.weight": lora_func.init((4, 2, 3), r=1, device=device)}, tmp_path, model=norm)
    with pytest.raises(ValueError, match="grouped convolution"):
        lora_func.export_peft(
            {"0.weight": lora_func.init((4, 1, 3), r=1, device=device)},
            tmp_path,
            model=nn.Sequential(nn.Conv1d(2, 4, 3, groups=2)).to(device),
        )
    with pytest.raises(ValueError, match=r"adapters\['lin.weight'\] is for shape \(4, 3\)"):
        lora_func.export_peft({"lin.weight": lora_func.init((4, 3), r=1, device=device)}, tmp_path, model=base)
    with pytest.raises(TypeError, match="adapters must be a mapping"):
        lora_func.export_peft(good, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written on error


# --- the documented original's state dict -----------------------------------------------------


def _plain_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)).double()


def _prepared(alphas, device):
    """A model with LoRA, prepared and filled on the CPU (the same values everywhere), then moved."""
    torch.manual_seed(0)
    model = _plain_net()
    plain = copy.deepcopy(model).to(device).state_dict()
    lora_func.apply_lora(model[0], r=2, alpha=alphas["0.weight"], init="gaussian")
    lora_func.apply_lora(model[2], r=3, alpha=alphas["2.weight"], init="gaussian")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".A", ".B")):
                p.normal_()
    return model.to(device), plain


def test_state_dict_of_apply_lora_to_adapters_and_back(device):
    alphas = {"0.weight": 4.0, "2.weight": 1.5}
    model, plain = _prepared(alphas, device)
    state = model.state_dict()
    adapters = lora_func.from_state_dict(state, alpha=alphas)
    expected = lora_func.get_adapters(model)
    assert list(adapters) == list(expected)
    for name, lora in adapters.items():
        assert torch.equal(lora.A, expected[name].A) and torch.equal(lora.B, expected[name].B)
        assert float(lora.scaling) == float(expected[name].scaling) and lora.shape == expected[name].shape
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).to(device)
    base = _plain_net().to(device)
    base.load_state_dict(plain)
    with torch.no_grad():
        torch.testing.assert_close(_ours(base, adapters, (x,)), model(x), **TOL)
        _assert_outputs_close(_reference(base, adapters, (x,)), model(x))
    # Back: the same state dict, loadable into a freshly prepared model.
    back = lora_func.to_state_dict(adapters, plain)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    fresh = _plain_net().to(device)
    lora_func.apply_lora(fresh[0], r=2, alpha=alphas["0.weight"])
    lora_func.apply_lora(fresh[2], r=3, alpha=alphas["2.weight"])
    fresh.load_state_dict(back, strict=True)
    with torch.no_grad():
        # Exact on every device: the same module classes, weights and input run the same kernels.
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_state_dict_errors(device):
    model, plain = _prepared({"0.weight": 8.0, "2.weight": 8.0}, device)
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"from_state_dict\(state_dict\): state_dict holds no LoRA"):
        lora_func.from_state_dict(plain)
    with pytest.raises(ValueError, match=r"alpha has no entry for '2.weight'"):
        lora_func.from_state_dict(state, alpha={"0.weight": 1.0})
    with pytest.raises(ValueError, match=r"lacks '0.parametrizations.weight.original'"):
        lora_func.from_state_dict({k: v for k, v in state.items() if not k.endswith("original")})
    with pytest.raises(TypeError, match="alpha must be a number"):
        lora_func.from_state_dict(state, alpha="8")
    adapters = lora_func.from_state_dict(state)
    with pytest.raises(ValueError, match=r"to_state_dict\(adapters\): base_state_dict has neither '2.weight'"):
        lora_func.to_state_dict(adapters, {"0.weight": plain["0.weight"]})
    with pytest.raises(ValueError, match=r"adapters\['0.weight'\] is stacked"):
        lora_func.to_state_dict({"0.weight": lora_func.stack([adapters["0.weight"]] * 2)})
    with pytest.raises(ValueError, match=r"is for shape \(4, 3, 3, 3\) but base_state_dict has \(2, 36\)"):
        lora_func.to_state_dict({"0.weight": adapters["0.weight"]}, {"0.weight": plain["2.weight"]})


# --- per-module layouts, the conversion check, and edge cases -----------------------------------


class _ConvAndLinear(nn.Module):
    """A transformers Conv1D (weight stored (in, out)) and an nn.Linear, both square."""

    def __init__(self) -> None:
        super().__init__()
        Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
        self.c = Conv1D(6, 6)
        self.l = nn.Linear(6, 6)

    def forward(self, x):
        return self.l(torch.tanh(self.c(x)))


def test_import_with_model_takes_each_layout_from_its_module(tmp_path, device):
    # Square weights, so shapes cannot tell the layouts apart. PEFT sets fan_in_fan_out per
    # module (True for Conv1D, False for Linear) and saves whichever value it set last.
    torch.manual_seed(0)
    base = _ConvAndLinear().double().to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns as it flips fan_in_fan_out per module
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["c", "l"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.save_pretrained(tmp_path)
    adapters = lora_func.import_peft(tmp_path, model=base, device=device)
    x = torch.randn(3, 6, dtype=torch.float64, generator=g).to(device)
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(_ours(base, adapters, (x,)), expected, **TOL)
        _assert_outputs_close(_reference(base, adapters, (x,)), expected)
        # The config's one flag cannot describe both modules: without the model one is wrong.
        blind = lora_func.import_peft(tmp_path, device=device)
        assert not torch.allclose(_ours(base, blind, (x,)), expected, rtol=1e-3, atol=1e-3)


def test_import_with_model_errors(tmp_path, device):
    base = _net(device=device)
    lora_func.export_peft(_random_adapters(base, {"lin.weight": 2, "emb.weight": 2}, {"lin.weight": 2.0,
                          "emb.weight": 2.0}, 0), tmp_path, model=base)  # fmt: skip
    with pytest.raises(TypeError, match=r"import_peft\(directory\): model must be an nn.Module, got dict"):
        lora_func.import_peft(tmp_path, model={})
    with pytest.raises(
        ValueError, match=r"import_peft\(directory\): .* adapts '(lin|emb)', which the model does not have"
    ):
        lora_func.import_peft(tmp_path, model=nn.Module())
    swapped = nn.Module()
    swapped.lin, swapped.emb = nn.Embedding(6, 5, device=device), nn.Linear(10, 6, device=device)
    with pytest.raises(ValueError, match=r"'emb' is a Linear in the model but its factors are stored as an embedding"):
        lora_func.import_peft(tmp_path, model=swapped, device=device)
    odd = nn.Module()
    odd.lin, odd.emb = nn.Bilinear(6, 6, 5, device=device), nn.Embedding(10, 6, device=device)
    with pytest.raises(ValueError, match=r"'lin' is on a Bilinear; PEFT's LoRA targets"):
        lora_func.import_peft(tmp_path, model=odd, device=device)
    small = nn.Module()
    small.lin, small.emb = nn.Linear(6, 4, device=device), nn.Embedding(10, 6, device=device)
    with pytest.raises(ValueError, match=r"import_peft\(directory\): adapters\['lin.weight'\] is for shape \(5, 6\)"):
        lora_func.import_peft(tmp_path, model=small, device=device)


@pytest.mark.parametrize("kind", ["linear", "fan_in_fan_out", "embedding", "conv"])
def test_conversion_check_catches_a_wrong_layout(kind, device):
    g = torch.Generator().manual_seed(0)  # drawn on the CPU, then moved
    shape = (5, 5, 3) if kind == "conv" else (5, 5)
    A = torch.randn(2, 5 * (3 if kind == "conv" else 1), generator=g, dtype=torch.float64)
    B = torch.randn(5, 2, generator=g, dtype=torch.float64)
    lora = to_device(lora_func.LoRA(A, B, torch.tensor(0.5), shape), device)
    if kind == "conv":
        right = (lora.A.view(2, 5, 3), lora.B.view(5, 2, 1))
        wrong = (lora.A.view(2, 3, 5).transpose(1, 2), lora.B.view(5, 2, 1))  # kernel and channel axes swapped
    elif kind == "linear":
        right, wrong = (lora.A, lora.B), (lora.B.T, lora.A.T)
    else:
        right, wrong = (lora.B.T, lora.A.T), (lora.A, lora.B)
    lora_func._peft._verify(lora, kind, *right, 0.5, "f(x)", "w")
    with pytest.raises(ValueError, match=r"f\(x\): converting 'w' changed its weight update"):
        lora_func._peft._verify(lora, kind, *wrong, 0.5, "f(x)", "w")
    with pytest.raises(ValueError, match="changed its weight update"):  # and a wrong scaling
        lora_func._peft._verify(lora, kind, *right, 0.5 * (1 + 1e-6), "f(x)", "w")


def test_conversions_never_build_the_full_update(tmp_path, device):
    """The check probes the update with vectors: no tensor of out x in elements is made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    adapters = {"w.weight": lora_func.init((256, 256), r=1, init="gaussian", device=device)}
    with Largest():
        lora_func.export_peft(adapters, tmp_path)
        back = lora_func.import_peft(tmp_path, device=device)
    assert torch.equal(back["w.weight"].A, adapters["w.weight"].A)  # copies through the file: exact
    # The factors hold 256 numbers each (2 KiB as bytes); the full update would hold 65,536.
    assert 0 < Largest.numel <= 256 * 8


def test_orthogonal_init_is_plain_lora(tmp_path, device):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().to(device)
    config = peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights="orthogonal")
    model = peft.get_peft_model(copy.deepcopy(base), config)
    x = torch.randn(5, 4, dtype=torch.float64).to(device)
    with torch.no_grad():
        # B @ A = 0 up to PEFT's float32 QR (orthogonality to ~1e-7, factors ~0.1): the base is untouched.
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)
        for name, p in model.named_parameters():
            if "lora_" in name:  # drawn on the CPU (as p.normal_() there), the same values on every device
                p.copy_(torch.randn(p.shape, dtype=p.dtype))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "orthogonal"
    adapters = lora_func.import_peft(tmp_path, device=device)
    with torch.no_grad():
        torch.testing.assert_close(_ours(base, adapters, (x,)), model.eval()(x), **TOL)


def test_config_that_is_not_an_object_is_a_value_error(tmp_path, device):
    lora_func.export_peft({"lin.weight": lora_func.init((4, 3), r=1, device=device)}, tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(
        ValueError, match=r"import_peft\(directory\): '.*adapter_config.json' is not a PEFT LoRA config"
    ):
        lora_func.import_peft(tmp_path, device=device)


@pytest.mark.device_independent("an empty mapping of adapters: refused before any tensor exists")
def test_export_of_no_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"export_peft\(adapters, directory\): adapters is empty"):
        lora_func.export_peft({}, tmp_path)
    assert not list(tmp_path.iterdir())


def test_failed_export_leaves_the_directory_as_it_was(tmp_path, monkeypatch, device):
    import os

    lora_func.export_peft({"lin.weight": lora_func.init((4, 3), r=1, init="gaussian", device=device)}, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_fdopen, calls = os.fdopen, []

    def fdopen_failing_on_second_file(fd, *args, **kwargs):
        calls.append(fd)
        if len(calls) == 2:
            os.close(fd)
            raise OSError(28, "No space left on device")
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen_failing_on_second_file)
    with pytest.raises(OSError, match="No space left"):
        lora_func.export_peft({"lin.weight": lora_func.init((4, 3), r=2, init="gaussian", device=device)}, tmp_path)
    monkeypatch.undo()
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no new file, no temporary left
    assert lora_func.import_peft(tmp_path)["lin.weight"].r == 1
