"""CUDA correctness of every LoRA route, then the training-step benchmark at GPU sizes.

A short run for a GPU machine (a few minutes): first every route (stateful ``apply_lora``,
materialized ``effective_params``, factored and auto ``lora_params``, ``vmap`` over stacked
adapters) on Linear and Conv2d layers with float32, bfloat16 and float16 bases (adapters in
the base dtype and in float32) is compared with a float64 reference; then the routes of
``bench.py`` are timed (``torch.cuda.synchronize()`` after every call) at GPU sizes: one
adapter on a dim-4096 MLP with 512 tokens, 64 adapters x 128 tokens under vmap, the conv net
at batch 256. The figures go to the JSON file given by ``--out``; the exit status is 1 when a
check fails.

Without CUDA, or with ``--cpu-smoke``, it runs the same code on the CPU at tiny sizes (a
few seconds), so that the script itself is tested.

Usage:
  python benchmarks/gpu_check.py --out gpu_check.json
  python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke.json

Tolerances: with positive inputs, weights and factors no sum cancels, so the float64
reference bounds every intermediate; each route rounds at most 8 times to the dtype it
computes in (unit roundoff ``u``; TF32's ``2**-11`` where CUDA uses it for float32) and sums
of ``n`` products accumulate with at most ``n`` roundings (float32's, or the half type's
where cuBLAS reduces in reduced precision), so ``|y - ref| <= (8u + n·u_acc)·|ref|``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

import lora_func

R, ALPHA = 4, 8.0
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]
ROUTES = ("stateful", "materialized", "factored", "auto", "vmap")


def _u(dtype: torch.dtype, device: str, conv: bool) -> tuple[float, float]:
    """(unit roundoff of the computation, unit roundoff of its sums) for ``dtype`` on ``device``."""
    u = torch.finfo(dtype).eps / 2
    u_acc = 2.0**-24
    if device == "cuda":
        if dtype == torch.float32:
            if torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32:
                u = u_acc = 2.0**-11
        else:
            u_acc = u
    return u, u_acc


def _positive(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5


def check_routes(device: str, size: int, k: int) -> list[dict[str, Any]]:
    """Every route x layer x dtype pair against float64; one record per check."""
    records = []
    for kind in ("linear", "conv2d"):
        g = torch.Generator().manual_seed(0)
        if kind == "linear":
            layer64: nn.Module = nn.Linear(size, size, dtype=torch.float64)
            x64 = _positive(g, 8, size)
            n = size
        else:
            layer64 = nn.Conv2d(4, 8, 3, padding=1, dtype=torch.float64)
            x64 = _positive(g, 2, 4, 8, 8)
            n = 2 * 8 * 8
        with torch.no_grad():
            layer64.weight.copy_(_positive(g, *layer64.weight.shape) / layer64.weight[0].numel())
            layer64.bias.copy_(_positive(g, *layer64.bias.shape))
        W64, b64 = layer64.weight.detach(), layer64.bias.detach()
        out_f, in_flat = W64.shape[0], W64[0].numel()
        As = _positive(g, k, R, in_flat) / in_flat
        Bs = _positive(g, k, out_f, R) * 0.5

        refs = []
        for i in range(k):  # the float64 reference, written out
            Weff = W64 + (ALPHA / R) * (Bs[i] @ As[i]).view(W64.shape)
            refs.append(x64 @ Weff.T + b64 if kind == "linear" else F.conv2d(x64, Weff, b64, padding=1))
        for base_dt, ad_dt in DTYPES:
            layer = copy.deepcopy(layer64).to(device=device, dtype=base_dt).requires_grad_(False)
            x = x64.to(device=device, dtype=base_dt)
            params = dict(layer.named_parameters())
            u, u_acc = _u(base_dt, device, kind == "conv2d")
            tol = 8 * u + n * u_acc
            A, B = As.to(device=device, dtype=ad_dt), Bs.to(device=device, dtype=ad_dt)
            adapter = lora_func.init_adapters(params, "weight", r=R, alpha=ALPHA, init="zeros", dtype=ad_dt)["weight"]
            for route in ROUTES:
                if route == "vmap":
                    stacked = {"weight": adapter.replace(A=A, B=B, scaling=adapter.scaling.expand(k).clone())}
                    ys = vmap(lambda a, x=x, params=params, layer=layer: functional_call(
                        layer, lora_func.lora_params(params, a), (x,)))(stacked)  # fmt: skip
                    pairs = [(ys[i], refs[i]) for i in range(k)]
                elif route == "stateful":
                    module = bench.frozen(copy.deepcopy(layer64).to(device=device, dtype=base_dt))
                    lora = lora_func.apply_lora(module, r=R, alpha=ALPHA, init="zeros", dtype=ad_dt)
                    with torch.no_grad():
                        lora.A.copy_(A[0])
                        lora.B.copy_(B[0])
                    y = module(x)
                    y.float().sum().backward()  # the backward runs on the device too
                    pairs = [(y, refs[0])] if lora.A.grad is not None else []
                else:
                    one = {"weight": adapter.replace(A=A[0], B=B[0])}
                    new = (
                        lora_func.effective_params(params, one)
                        if route == "materialized"
                        else lora_func.lora_params(params, one, mode=route)
                    )
                    pairs = [(functional_call(layer, new, (x,)), refs[0])]
                rel = max((float(((y.double().cpu() - ref).abs() / ref.abs()).max()) for y, ref in pairs), default=1.0)
                records.append(
                    {
                        "layer": kind,
                        "route": route,
                        "base_dtype": str(base_dt).removeprefix("torch."),
                        "adapter_dtype": str(ad_dt).removeprefix("torch."),
                        "max_rel_err": rel,
                        "tolerance": tol,
                        "dtype_ok": all(y.dtype == base_dt for y, _ in pairs),
                        "passed": bool(pairs) and rel <= tol and all(y.dtype == base_dt for y, _ in pairs),
                    }
                )
    return records


def many_adapter_routes(dim: int, tokens: int, k: int, device: str) -> dict[str, Callable[[], object]]:
    """``bench.many_adapter_routes`` on ``device``: floor, loop, vmap materialized, vmap lora_params."""
    base = bench.frozen(bench.mlp(dim).to(device))
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(k, tokens, dim, generator=g).to(device)
    ys = torch.randint(0, 10, (k, tokens), generator=g).to(device)
    xg, yf = xs.reshape(k * tokens, dim).clone().requires_grad_(), ys.reshape(-1)
    params = dict(base.named_parameters())
    stacked = lora_func.stack([bench.nonzero(lora_func.init_adapters(base, "*.weight", r=bench.RANK))] * k)

    def mat(a: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(base, lora_func.effective_params(params, a), (x,)), y)

    def fast(a: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(base, lora_func.lora_params(params, a), (x,)), y)

    g_mat, g_fast = grad(mat), grad(fast)

    def loop() -> None:
        for i, a in enumerate(lora_func.unstack(stacked)):
            g_mat(a, xs[i], ys[i])

    return {
        f"floor-{k}": lambda: F.cross_entropy(base(xg), yf).backward(),
        "loop": loop,
        "vmap-materialized": lambda: vmap(g_mat)(stacked, xs, ys),
        "vmap-lora_params": lambda: vmap(g_fast)(stacked, xs, ys),
    }


def sections(device: str, smoke: bool) -> dict[str, Callable[[], dict[str, Callable[[], object]]]]:
    dim, tokens, k_dim, k, k_tokens, batch = (32, 8, 32, 4, 4, 2) if smoke else (4096, 512, 4096, 64, 128, 256)

    def mlp_section() -> dict[str, Callable[[], object]]:
        g = torch.Generator().manual_seed(3)
        x, y = torch.randn(tokens, dim, generator=g).to(device), torch.randint(0, 10, (tokens,), generator=g).to(device)
        return bench.one_adapter_routes(lambda: bench.mlp(dim).to(device), x, y, linear_only=True)

    def conv_section() -> dict[str, Callable[[], object]]:
        g = torch.Generator().manual_seed(4)
        x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        return bench.one_adapter_routes(lambda: bench.convnet().to(device), x, y, linear_only=False)

    return {
        f"mlp-{dim}x{tokens}": mlp_section,
        f"vmap-{k}x{k_tokens}": lambda: many_adapter_routes(k_dim, k_tokens, k, device),
        f"conv-batch{batch}": conv_section,
    }


def synchronized(routes: dict[str, Callable[[], object]], device: str) -> dict[str, Callable[[], object]]:
    """Each route followed by ``torch.cuda.synchronize()``, so a timing covers the GPU work."""
    if device != "cuda":
        return routes

    def wrap(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> None:
            fn()
            torch.cuda.synchronize()

        return run

    return {name: wrap(fn) for name, fn in routes.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="write the figures (JSON) here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 11; 2 in smoke mode)")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = "cpu" if smoke else "cuda"
    rounds = args.rounds or (2 if smoke else 11)
    t_start = time.perf_counter()

    checks = check_routes(device, size=16 if smoke else 256, k=3 if smoke else 8)
    failed = [c for c in checks if not c["passed"]]
    print(f"{len(checks) - len(failed)}/{len(checks)} correctness checks passed on {device}")
    for c in failed:
        print(f"  FAILED {c}")

    timings: dict[str, Any] = {}
    for name, build in sections(device, smoke).items():
        medians = bench.time_routes(synchronized(build(), device), rounds)
        floor = next(iter(medians.values()))
        timings[name] = {"median_s": medians, "x_floor": {r: m / floor for r, m in medians.items()}}
        print(f"\n{name}")
        for route, med in medians.items():
            print(f"  {route:18s} {med * 1e3:10.3f} ms {med / floor:8.2f}x floor")
        if device == "cuda":
            torch.cuda.empty_cache()

    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "device_type": device,
        "smoke": smoke,
        "torch": torch.__version__,
        "rounds": rounds,
        "checks": checks,
        "all_passed": not failed,
        "timings": timings,
        "wall_s": time.perf_counter() - t_start,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} ({report['wall_s']:.1f} s)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
