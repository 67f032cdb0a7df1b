"""save/load (safetensors, atomic, bit-exact) and check (every problem reported at once).

Every test runs on each available device (the ``device`` fixture): adapters are drawn on the
CPU (the same values everywhere) and moved to ``device``, saved from there, and loaded back
both to the CPU (the default) and to ``device``. A round trip copies bits and computes
nothing, so it is compared with ``torch.equal`` on every device.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import lora_func

from .conftest import to_device

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _random_lora(shape, r, dtype, device, batch=(), alpha=2.0, seed=0):
    """A LoRA on ``device``, drawn on the CPU so that its values are the same on every device."""
    g = torch.Generator().manual_seed(seed)
    in_flat = 1
    for d in shape[1:]:
        in_flat *= d
    A = torch.randn(*batch, r, in_flat, generator=g).to(dtype)
    B = torch.randn(*batch, shape[0], r, generator=g).to(dtype)
    scaling = torch.full(batch, alpha / r, dtype=torch.float32)
    return lora_func.LoRA(A.to(device), B.to(device), scaling.to(device), shape)


def _assert_same(a: lora_func.LoRA, b: lora_func.LoRA) -> None:
    """Same shape, and every leaf on the same device with the same dtype and bits."""
    assert a.shape == b.shape
    for leaf in ("A", "B", "scaling"):
        x, y = getattr(a, leaf), getattr(b, leaf)
        assert x.device == y.device and x.dtype == y.dtype and torch.equal(x, y), leaf


shapes = st.sampled_from([(4, 3), (5, 2, 3), (4, 2, 3, 3), (3, 2, 2, 1, 2)])


@given(
    shape=shapes,
    r=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    k=st.sampled_from([None, 1, 3]),
    single=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_bit_exact(tmp_path_factory, device, shape, r, dtype, k, single, seed):
    batch = () if k is None else (k,)
    lora = _random_lora(shape, r, dtype, device, batch, alpha=float(seed % 7 + 1), seed=seed)
    adapters = lora if single else {"enc.0.weight": lora, "head.weight": _random_lora((2, 4), 1, dtype, device, batch)}
    path = tmp_path_factory.mktemp("rt") / "a.safetensors"
    lora_func.save(adapters, path, metadata={"seed": seed, "tags": ["x", 1.5]})
    for where in ("cpu", device):  # saved from device; loaded to the CPU (the default) and back to device
        back = lora_func.load(path) if where == "cpu" else lora_func.load(path, device=device)
        if single:
            _assert_same(back, to_device(lora, where))
        else:
            assert list(back) == list(adapters)
            for name in adapters:
                _assert_same(back[name], to_device(adapters[name], where))
    assert lora_func.load_metadata(path) == {"seed": seed, "tags": ["x", 1.5]}


def test_file_layout_and_header(tmp_path, device):
    adapters = {"0.weight": _random_lora((4, 2, 3, 3), 2, torch.float32, device, alpha=6.0)}
    path = tmp_path / "a.safetensors"
    lora_func.save(adapters, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["0.weight.A", "0.weight.B", "0.weight.scaling"]
        header = json.loads(f.metadata()["lora_func"])
    assert header["version"] == 1
    assert header["adapters"]["0.weight"] == {"shape": [4, 2, 3, 3], "r": 2, "batch_shape": [], "alpha": 6.0}


def test_unstacked_views_sharing_memory_are_saved(tmp_path, device):
    # unstack gives views of one storage; safetensors refuses shared memory unless copied.
    views = lora_func.unstack(_random_lora((4, 3), 2, torch.float32, device, (2,)))
    path = tmp_path / "v.safetensors"
    lora_func.save({"a": views[0], "b": views[1]}, path)
    back = lora_func.load(path)
    _assert_same(back["a"], to_device(views[0], "cpu"))
    _assert_same(back["b"], to_device(views[1], "cpu"))
    back = lora_func.load(path, device=device)
    _assert_same(back["a"], views[0])
    _assert_same(back["b"], views[1])


def test_load_to_device(tmp_path, device):
    lora = _random_lora((4, 3), 2, torch.bfloat16, "cpu")  # saved from the CPU, loaded onto device
    lora_func.save(lora, tmp_path / "a.safetensors")
    back = lora_func.load(tmp_path / "a.safetensors", device=device)
    assert back.A.device.type == device and back.scaling.device.type == device
    _assert_same(to_device(back, "cpu"), lora)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, failing, device):
    path = tmp_path / "a.safetensors"
    old = {"w": _random_lora((4, 3), 2, torch.float32, device, seed=1)}
    lora_func.save(old, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk full"):
        lora_func.save({"w": _random_lora((4, 3), 2, torch.float32, device, seed=2)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]  # the temporary file is gone
    _assert_same(lora_func.load(path, device=device)["w"], old["w"])


def test_truncated_file_is_a_clear_error(tmp_path, device):
    path = tmp_path / "a.safetensors"
    lora_func.save({"w": _random_lora((8, 8), 4, torch.float32, device)}, path)
    data = path.read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a readable safetensors file"):
            lora_func.load(path, device=device)


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path, device):
    # Loading to device: the file is refused as it is read, before anything is placed there.
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"garbage.safetensors.*not a readable safetensors file"):
        lora_func.load(garbage, device=device)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2, device=device)}, str(foreign))
    with pytest.raises(ValueError, match=r"foreign.safetensors.*not a lora_func adapter file"):
        lora_func.load(foreign, device=device)
    with pytest.raises(ValueError, match=r"foreign.safetensors.*not a lora_func adapter file"):
        lora_func.load_metadata(foreign)
    with pytest.raises(FileNotFoundError, match="no file at"):
        lora_func.load(tmp_path / "absent.safetensors", device=device)


def _header(**adapters):
    return {"format": "lora_func.adapters", "version": 1, "kind": "dict", "adapters": adapters, "metadata": {}}


def test_header_and_tensors_must_agree(tmp_path, device):
    path = tmp_path / "bad.safetensors"
    tensors = {
        "w.A": torch.zeros(2, 3, device=device),
        "w.B": torch.zeros(4, 2, device=device),
        "w.scaling": torch.tensor(1.0, device=device),
    }
    info = {"shape": [4, 3], "r": 2, "batch_shape": [], "alpha": 2.0}
    save_file(tensors, str(path), metadata={"lora_func": json.dumps(_header(w=info, v=info))})
    with pytest.raises(ValueError, match=r"bad.safetensors.*missing \['v.A', 'v.B', 'v.scaling'\]"):
        lora_func.load(path, device=device)
    save_file(tensors, str(path), metadata={"lora_func": json.dumps(_header(w={**info, "shape": [4, 5]}))})
    with pytest.raises(ValueError, match=r"bad.safetensors.*adapter 'w' does not match its header"):
        lora_func.load(path, device=device)
    save_file(tensors, str(path), metadata={"lora_func": json.dumps({**_header(w=info), "version": 99})})
    with pytest.raises(ValueError, match=r"bad.safetensors.*format version 99"):
        lora_func.load(path, device=device)
    save_file(tensors, str(path), metadata={"lora_func": "{not json"})
    with pytest.raises(ValueError, match=r"bad.safetensors.*corrupt lora_func header"):
        lora_func.load(path, device=device)


def test_save_argument_errors(tmp_path, device):
    lora = _random_lora((4, 3), 2, torch.float32, device)
    with pytest.raises(TypeError, match=r"save\(adapters, path\): metadata must hold only JSON"):
        lora_func.save(lora, tmp_path / "a.safetensors", metadata={"x": object()})
    with pytest.raises(TypeError, match=r"save\(adapters, path\): metadata must be a dict from strings"):
        lora_func.save(lora, tmp_path / "a.safetensors", metadata={1: 2})
    with pytest.raises(TypeError, match=r"save\(adapters, path\): adapters\['w'\] must be a lora_func.LoRA"):
        lora_func.save({"w": torch.zeros(2, device=device)}, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match=r"save\(adapters, path\): adapters must be a lora_func.LoRA or a mapping"):
        lora_func.save([lora], tmp_path / "a.safetensors")
    assert not os.listdir(tmp_path)


# --- check -----------------------------------------------------------------------------------


def _model(device):
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv2d(4, 2, 3), torch.nn.Linear(2, 2)).to(device)


def test_check_accepts_fitting_adapters(device):
    model = _model(device)
    adapters = lora_func.init_adapters(model, "*.weight", r=2)
    assert all(a.A.device == model[0].weight.device for a in adapters.values())
    lora_func.check(adapters, model, targets="*.weight")
    lora_func.check({}, dict(model.named_parameters()))


def test_check_reports_every_problem_at_once(device):
    model = _model(device)
    adapters = {
        "0.weight": lora_func.init((4, 3), r=2, dtype=torch.float64, device=device),  # dtype
        "1.weight": lora_func.init((2, 4, 5, 5), r=2, device=device),  # shape
        "7.weight": lora_func.init((2, 2), r=1, device=device),  # unexpected
    }
    with pytest.raises(ValueError) as info:
        lora_func.check(adapters, model, targets=["*.weight", "enc.*"])
    msg = str(info.value)
    assert msg.startswith("check(adapters, module_or_params): 4 problems: ")
    assert "missing adapters for ['2.weight', 'enc.*']" in msg
    assert "adapters['7.weight'] names no parameter of the module (unexpected)" in msg
    assert "adapters['1.weight'] is for shape (2, 4, 5, 5) but the weight has shape (2, 4, 3, 3)" in msg
    assert (
        "adapters['0.weight'] has dtype A torch.float64, B torch.float64 but the weight has dtype torch.float32" in msg
    )
    # Mixed precision on request: the dtype problem goes, the others stay.
    with pytest.raises(ValueError) as info:
        lora_func.check(adapters, model, dtypes=False)
    assert "dtype" not in str(info.value) and "adapters['7.weight'] names no parameter" in str(info.value)


def test_check_defaults_to_the_weights_that_carry_lora(device):
    model = _model(device)
    lora_func.apply_lora(model[0], r=2)
    lora_func.apply_lora(model[2], r=2)
    with pytest.raises(ValueError, match=r"missing adapters for \['2.weight'\]"):
        lora_func.check({"0.weight": lora_func.init((4, 3), r=2, device=device)}, model)
    lora_func.check(lora_func.get_adapters(model), model)


def test_check_type_errors(device):
    with pytest.raises(
        TypeError, match=r"check\(adapters, module_or_params\): adapters\['w'\] must be a lora_func.LoRA"
    ):
        lora_func.check({"w": torch.zeros(2, 2, device=device)}, _model(device))
    with pytest.raises(TypeError, match=r"module_or_params must be an nn.Module or a mapping"):
        lora_func.check({}, [1, 2])
    with pytest.raises(TypeError, match="adapters must be a mapping"):
        lora_func.check(lora_func.init((2, 2), r=1, device=device), _model(device))


def test_set_adapters_reports_every_problem_at_once(device):
    model = _model(device)
    adapters = {
        "1.weight": lora_func.init((2, 4, 5, 5), r=2, device=device),
        "7.weight": lora_func.init((2, 2), r=1, device=device),
    }
    with pytest.raises(ValueError) as info:
        lora_func.set_adapters(model, adapters)
    msg = str(info.value)
    assert msg.startswith("set_adapters(module, adapters)")
    assert "7.weight" in msg and "(2, 4, 5, 5)" in msg
    assert lora_func.get_adapters(model) == {}  # nothing changed
