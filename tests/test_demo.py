"""The demo's pieces: the data split, the one-vmap sweep, evaluation, the merge check, and a tiny run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lora_func
from lora_func import demo

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def _model_and_data(device: str, n: int = 40, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A model and data drawn on the CPU (the same values on every device), moved to ``device``."""
    torch.manual_seed(seed)
    model = demo.make_model().to(device=device, dtype=dtype).requires_grad_(False)
    params = {k: v.detach() for k, v in lora_func.base_params(model).items()}
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 1, 8, 8, generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, 5, (n,), generator=gen).to(device)
    return model, params, x, y


def _reference_logits(model, adapter, x):
    """The model with every adapted weight replaced by W + s * B @ A, written out in float64."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, lora in adapter.items():
            path, _, pname = name.rpartition(".")
            W = getattr(ref.get_submodule(path), pname)
            update = float(lora.scaling) * (lora.B.double() @ lora.A.double())
            W.copy_(W + update.reshape(W.shape))
    return ref(x.double())


@pytest.mark.device_independent("the split is index bookkeeping on CPU tensors; Split.to moves it whole")
def test_split_separates_tasks_and_holds_out_rows() -> None:
    from sklearn.datasets import load_digits

    target = torch.as_tensor(load_digits().target)
    split = demo.load_digits_split(seed=3, heldout=0.3)
    sets = {"pre": split.pre_idx, "pre_test": split.pre_test_idx, "train": split.train_idx, "test": split.test_idx}
    # Digits 0-4 for pretraining, 5-9 for adapting; labels are digit % 5, matching the rows.
    for name in ("pre", "pre_test"):
        assert set(target[sets[name]].tolist()) == {0, 1, 2, 3, 4}
    for name in ("train", "test"):
        assert set(target[sets[name]].tolist()) == {5, 6, 7, 8, 9}
    for idx, labels in ((split.pre_idx, split.pre_y), (split.train_idx, split.train_y), (split.test_idx, split.test_y)):
        assert torch.equal(labels, target[idx] % 5)
    # Every row is in exactly one set, and each task holds out about 30% of its rows.
    all_rows = torch.cat(list(sets.values()))
    assert len(all_rows) == len(target) == len(set(all_rows.tolist()))
    for fit, held in ((split.pre_idx, split.pre_test_idx), (split.train_idx, split.test_idx)):
        assert abs(len(held) / (len(fit) + len(held)) - 0.3) < 0.01
    # Images are the dataset's, scaled to [0, 1].
    images = torch.as_tensor(load_digits().images, dtype=torch.float32)
    assert torch.equal(split.test_x[:, 0], images[split.test_idx] / 16)
    assert float(split.train_x.max()) == 1.0 and float(split.train_x.min()) == 0.0


@pytest.mark.device_independent("the split is index bookkeeping on CPU tensors")
def test_split_depends_on_seed() -> None:
    a, b = demo.load_digits_split(seed=0), demo.load_digits_split(seed=1)
    assert not torch.equal(a.test_idx, b.test_idx)
    assert torch.equal(a.test_idx, demo.load_digits_split(seed=0).test_idx)


def test_sweep_in_one_vmap_equals_separate_runs(device: str) -> None:
    model, params, x, y = _model_and_data(device)
    alphas, seeds = [2.0, 16.0], [3, 7]
    kw = {"steps": 4, "r": 2, "lr": 1e-2, "batch": 8}
    stacked, losses = demo.train_sweep(model, params, x, y, alphas, seeds, **kw)
    assert losses.shape == (4, 2)
    for k in range(2):
        alone, alone_losses = demo.train_sweep(model, params, x, y, alphas[k : k + 1], seeds[k : k + 1], **kw)
        for name, lora in lora_func.unstack(stacked)[k].items():
            # float64 throughout: the batched and unbatched kernels differ only in rounding
            # order (~1e-16 relative), which four Adam steps do not amplify past 1e-10.
            torch.testing.assert_close(lora.A, alone[name].A[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(lora.B, alone[name].B[0], rtol=1e-10, atol=1e-12)
            assert float(lora.scaling) == alphas[k] / 2
        torch.testing.assert_close(losses[:, k], alone_losses[:, 0], rtol=1e-10, atol=0)
    # The adapters moved away from their identity start, and differently (own alpha, seed and batches).
    B = stacked["8.weight"].B
    assert B.abs().min() > 0 and not torch.allclose(B[0], B[1])


def test_sweep_first_loss_is_the_frozen_models_loss_on_each_adapters_batch(device: str) -> None:
    # B starts at zero, so at step 0 each adapter is the identity: its loss is the base
    # model's loss on that adapter's own batch (drawn from its own seed).
    model, params, x, y = _model_and_data(device)
    seeds = [5, 9]
    _, losses = demo.train_sweep(model, params, x, y, [1.0, 4.0], seeds, steps=1, r=2, batch=8)
    idx = demo._sampler(seeds, len(x), 8, x.device)()
    assert not torch.equal(idx[0], idx[1])
    for k in range(2):
        expected = F.cross_entropy(model(x[idx[k]]), y[idx[k]])
        torch.testing.assert_close(losses[0, k], expected, rtol=1e-12, atol=0)


def test_evaluate_matches_written_out_merge(device: str) -> None:
    model, params, x, y = _model_and_data(device, n=30)
    gens = [torch.Generator(device).manual_seed(s) for s in (0, 1)]
    trees = [
        lora_func.init_adapters(params, "*.weight", r=3, alpha=a, init="gaussian", generator=g)
        for a, g in zip((1e3, 3e3), gens, strict=True)
    ]
    # gaussian init has std 1e-4; make the updates large enough to change predictions.
    trees = [{k: v.replace(A=v.A * 100, B=v.B * 100) for k, v in t.items()} for t in trees]
    loss, acc = demo.evaluate(model, params, lora_func.stack(trees), x, y)
    for k, tree in enumerate(trees):
        logits = _reference_logits(model, tree, x)
        # Same float64 weights computed in a different order: agreement to ~1e-12.
        torch.testing.assert_close(loss[k], F.cross_entropy(logits, y), rtol=1e-10, atol=0)
        assert round(float(acc[k]) * len(y)) == int((logits.argmax(-1) == y).sum())
    assert not torch.allclose(loss[0], loss[1])


def _trained_adapter(params):
    gen = torch.Generator(next(iter(params.values())).device).manual_seed(4)
    tree = lora_func.init_adapters(params, "*.weight", r=2, alpha=8.0, init="gaussian", generator=gen)
    return {k: v.replace(A=v.A * 1e3, B=v.B * 1e3) for k, v in tree.items()}


def test_check_merge_passes_for_a_faithful_module_and_leaves_it_alone(device: str) -> None:
    model, params, x, _ = _model_and_data(device, dtype=torch.float32)
    adapter = _trained_adapter(params)
    before = copy.deepcopy(model.state_dict())
    result = demo.check_merge(model, params, adapter, x)
    assert result["passed"] is True
    assert result["with_lora_max_abs_diff"] <= 1e-5 and result["merged_max_abs_diff"] <= 1e-5
    # The adapter matters (the check compares something), and the model itself is untouched.
    base = model(x)
    assert (
        torch.func.functional_call(model, lora_func.effective_params(params, adapter), (x,)) - base
    ).abs().max() > 1e-2
    assert sorted(model.state_dict()) == sorted(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["0.weight", "8.weight"])
def test_check_merge_catches_a_wrong_weight(name: str, device: str) -> None:
    model, params, x, _ = _model_and_data(device, dtype=torch.float32)
    adapter = _trained_adapter(params)
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        path, _, pname = name.rpartition(".")
        getattr(wrong.get_submodule(path), pname).add_(1e-3)
    result = demo.check_merge(wrong, params, adapter, x)
    assert result["passed"] is False
    assert result["with_lora_max_abs_diff"] > 1e-5 and result["merged_max_abs_diff"] > 1e-5


def test_time_routes_reports_both_routes(device: str) -> None:
    model, params, x, y = _model_and_data(device, dtype=torch.float32)
    speed = demo.time_routes(model, params, x, y, [1.0, 2.0], [0, 1], steps=2, r=2, batch=8)
    assert speed["vmap"] > 0 and speed["loop"] > 0
    assert speed["speedup"] == pytest.approx(speed["loop"] / speed["vmap"])


def test_tiny_run_end_to_end(tmp_path, capsys, device: str) -> None:
    argv = ["--adapters", "2", "--steps", "4", "--pretrain-steps", "30", "--out", str(tmp_path), "--json"]
    argv += ["--seed", "2", "--device", device]
    assert demo.main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout holds the JSON only; the table goes to stderr
    assert "held-out acc" in captured.err and "training" in captured.err
    assert [a["alpha"] for a in summary["adapters"]] == [1.0, 2.0]
    assert [a["seed"] for a in summary["adapters"]] == [2, 3]
    accs = [a["heldout_accuracy"] for a in summary["adapters"]]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert summary["best"]["heldout_accuracy"] == max(accs) == accs[summary["best"]["adapter"]]
    assert summary["check"]["passed"] is True
    assert summary["speed"]["speedup"] > 0
    assert summary["pretrained_from_cache"] is False and summary["device"] == device
    assert summary["threads"] == 1  # the CLI's default
    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert (tmp_path / summary["best"]["file"]).exists()
    assert list((tmp_path / "cache").iterdir())

    # A second run reuses the pretrained weights and, with the same seeds, gets the same
    # results: exactly on the CPU; CUDA's conv backward may add in another order from run to
    # run, which can move an accuracy by at most a row or two of the held-out set.
    assert demo.main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["pretrained_from_cache"] is True
    assert again["pretrain_accuracy"] == summary["pretrain_accuracy"]
    again_accs = [a["heldout_accuracy"] for a in again["adapters"]]
    if device == "cpu":
        assert again_accs == accs
    else:
        assert again_accs == pytest.approx(accs, abs=0.01)


def test_saved_adapter_loads_back(tmp_path, device: str) -> None:
    _, params, _, _ = _model_and_data(device, dtype=torch.float32)
    adapter = _trained_adapter(params)
    path = demo.save_adapter(adapter, tmp_path, {"alpha": 8.0})
    loaded = lora_func.load(path, device=device)
    assert sorted(loaded) == sorted(adapter)
    for name, lora in adapter.items():
        assert torch.equal(loaded[name].A, lora.A) and torch.equal(loaded[name].B, lora.B)
        assert torch.equal(loaded[name].scaling, lora.scaling) and loaded[name].shape == lora.shape
    assert lora_func.load_metadata(path) == {"alpha": 8.0}


@pytest.mark.device_independent("argument parsing, before any tensor is made")
def test_cli_rejects_bad_counts(capsys) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--adapters", "0"])
    assert "--adapters must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--threads", "0"])
    assert "--threads must be at least 1" in capsys.readouterr().err


@pytest.mark.device_independent("an import in a subprocess; the model is built on the CPU and only its shape read")
def test_module_imports_without_the_demo_extra() -> None:
    # The doctest run imports every module of lora_func: scikit-learn, matplotlib and tqdm
    # are imported only inside the functions that need them.
    code = (
        "import sys; sys.modules.update(dict.fromkeys(['sklearn', 'matplotlib', 'tqdm'])); "
        "import lora_func.demo; print(lora_func.demo.make_model()[0].weight.shape)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.Size([16, 1, 3, 3])"


def test_a_corrupt_pretraining_cache_is_retrained_not_fatal(tmp_path, device: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8).to(device), torch.randint(0, 5, (8,)).to(device)
    cache = tmp_path / "cache" / "base.pt"
    cache.parent.mkdir()
    cache.write_bytes(b"PK\x03\x04 truncated")
    model = demo.make_model().to(device)
    assert demo.pretrain(model, x, y, steps=2, batch=4, cache=cache) is False  # retrained
    again = demo.make_model().to(device)
    assert demo.pretrain(again, x, y, steps=2, batch=4, cache=cache) is True  # and rewritten whole
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))
    assert not list(cache.parent.glob("*.partial"))
