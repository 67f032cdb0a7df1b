"""The core routes on every available device (``device`` fixture: CPU, and CUDA where present),
against a float64 reference computed on the CPU; and the GPU check script in its CPU smoke mode.

Tolerance: inputs, weights and factors are positive, so no sum cancels and every intermediate
is bounded by the reference itself; float32 routes round a few times (``8·u``, ``u = 2**-24``,
or TF32's ``2**-11`` where CUDA uses it) and their sums of ``n`` products add ``n·u``, so
``|y - ref| <= (8 + n)·u·|ref|``. Gradients go through about twice as many roundings: ``2×``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import lora_func

R, ALPHA, K = 4, 8.0, 3
S = ALPHA / R
IN, OUT, TOKENS = 12, 10, 5


def _u(device: str) -> float:
    cuda = device.startswith("cuda")
    return 2.0**-11 if cuda and torch.backends.cuda.matmul.allow_tf32 else 2.0**-24


def _setup() -> dict[str, torch.Tensor]:
    """float64 CPU values: positive weight, bias, input, K factors and a cotangent."""
    g = torch.Generator().manual_seed(0)

    def pos(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5

    return {
        "W": pos(OUT, IN) / IN,
        "b": pos(OUT),
        "x": pos(TOKENS, IN),
        "A": pos(K, R, IN) / IN,
        "B": pos(K, OUT, R) * 0.5,
        "g": pos(TOKENS, OUT),
    }


def _ref(v: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 effective weight, output, and dA, dB of <g, y>, written out."""
    A, B = v["A"][i], v["B"][i]
    W_eff = v["W"] + S * B @ A
    y = v["x"] @ W_eff.T + v["b"]
    dW = v["g"].T @ v["x"]  # d<g, x W^T>/dW
    return W_eff, y, S * B.T @ dW, S * dW @ A.T


def _close(got: torch.Tensor, ref: torch.Tensor, device: str, factor: float = 1.0) -> None:
    assert got.device.type == torch.device(device).type
    tol = factor * (8 + max(IN, OUT, TOKENS)) * _u(device)
    rel = float(((got.detach().double().cpu() - ref).abs() / ref.abs()).max())
    assert rel <= tol, f"relative error {rel:.3g} > {tol:.3g}"


def _on(device: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], nn.Linear, lora_func.LoRA]:
    v = _setup()
    d = {k: t.to(device=device, dtype=torch.float32) for k, t in v.items()}
    layer = nn.Linear(IN, OUT, device=device).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(d["W"])
        layer.bias.copy_(d["b"])
    lora = lora_func.LoRA(d["A"][0].clone(), d["B"][0].clone(), S, (OUT, IN))
    return v, d, layer, lora


def test_merge(device: str) -> None:
    v, d, _, lora = _on(device)
    _close(lora_func.merge(d["W"], lora), _ref(v, 0)[0], device)


def test_effective_params_and_lora_params(device: str) -> None:
    v, d, layer, lora = _on(device)
    params = dict(layer.named_parameters())
    _, y_ref, dA_ref, dB_ref = _ref(v, 0)
    for make in (
        lora_func.effective_params,
        lambda p, a: lora_func.lora_params(p, a, mode="factored"),
        lambda p, a: lora_func.lora_params(p, a, mode="auto"),
    ):

        def loss(a: dict[str, lora_func.LoRA], make: Any = make) -> torch.Tensor:
            return (functional_call(layer, make(params, a), (d["x"],)) * d["g"]).sum()

        y = functional_call(layer, make(params, {"weight": lora}), (d["x"],))
        _close(y, y_ref, device)
        g = grad(loss)({"weight": lora})["weight"]
        _close(g.A, dA_ref, device, factor=2)
        _close(g.B, dB_ref, device, factor=2)


def test_apply_lora_forward_backward(device: str) -> None:
    v, d, layer, lora = _on(device)
    param = lora_func.apply_lora(layer, r=R, alpha=ALPHA, init="zeros")
    assert param.A.device.type == torch.device(device).type
    with torch.no_grad():
        param.A.copy_(lora.A)
        param.B.copy_(lora.B)
    y = layer(d["x"])
    (y * d["g"]).sum().backward()
    _, y_ref, dA_ref, dB_ref = _ref(v, 0)
    _close(y, y_ref, device)
    _close(param.A.grad, dA_ref, device, factor=2)
    _close(param.B.grad, dB_ref, device, factor=2)


def test_stack_vmap(device: str) -> None:
    v, d, layer, lora = _on(device)
    params = dict(layer.named_parameters())
    stacked = lora_func.stack([{"weight": lora.replace(A=d["A"][i], B=d["B"][i])} for i in range(K)])

    def loss(a: dict[str, lora_func.LoRA]) -> torch.Tensor:
        return (functional_call(layer, lora_func.lora_params(params, a), (d["x"],)) * d["g"]).sum()

    ys = vmap(lambda a: functional_call(layer, lora_func.lora_params(params, a), (d["x"],)))(stacked)
    gs = vmap(grad(loss))(stacked)["weight"]
    for i in range(K):
        _, y_ref, dA_ref, dB_ref = _ref(v, i)
        _close(ys[i], y_ref, device)
        _close(gs.A[i], dA_ref, device, factor=2)
        _close(gs.B[i], dB_ref, device, factor=2)


def test_routes_put_nothing_on_another_device(device: str) -> None:
    _, d, layer, lora = _on(device)
    params = dict(layer.named_parameters())
    for w in (lora_func.effective_params(params, {"weight": lora})["weight"], lora_func.merge(d["W"], lora)):
        assert w.device == layer.weight.device
    assert F.linear(d["x"], lora_func.lora_params(params, {"weight": lora})["weight"]).device == d["x"].device


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.device_independent("the script's CPU smoke mode; the script itself picks CUDA where it exists")
def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--rounds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert {"device", "device_type", "smoke", "torch", "checks", "all_passed", "timings", "wall_s"} <= set(report)
    assert report["smoke"] is True and report["device_type"] == "cpu" and report["all_passed"] is True
    checks = report["checks"]
    seen = {(c["layer"], c["route"], c["base_dtype"], c["adapter_dtype"]) for c in checks}
    assert len(seen) == len(checks) == 2 * 5 * 5  # layers x routes x dtype pairs
    assert {c["route"] for c in checks} == {"stateful", "materialized", "factored", "auto", "vmap"}
    assert {c["base_dtype"] for c in checks} == {"float32", "bfloat16", "float16"}
    assert all(c["passed"] and c["dtype_ok"] and 0 <= c["max_rel_err"] <= c["tolerance"] for c in checks)
    # A route that computed nothing would have no error at all: the reduced types must show rounding.
    assert any(c["max_rel_err"] > 0 for c in checks if c["base_dtype"] != "float32")
    timings = report["timings"]
    assert len(timings) == 3
    for section in timings.values():
        medians = section["median_s"]
        assert {"materialized", "lora_params"} <= set(medians) or {"vmap-materialized", "vmap-lora_params"} <= set(
            medians
        )
        assert all(m > 0 for m in medians.values())
        assert next(iter(section["x_floor"].values())) == 1.0
