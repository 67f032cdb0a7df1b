"""Training-step time of LoRA routes, side by side in one process, and their working memory.

Every section builds its routes over one frozen model and times them interleaved
(every route once per round, in a new random order each round), so that drift on a
shared machine hits every route alike; it prints
each route's median and its ratio to the *floor* (the frozen model's forward plus the
backward pass to its input: the least any LoRA training step must do) and to PEFT where
PEFT is installed.

Sections:
  mlp-1024   one adapter, 3-layer MLP, dim 1024, 32 tokens, rank 8
  mlp-2048   one adapter, dim 2048, 128 tokens
  vmap-8     8 adapters at once, dim 1024, 16 tokens each
  vmap-64    64 adapters at once
  conv       a small conv net (3 conv layers, 32x32 images, batch 16), one adapter
  routing    inference, dim 1024, 64 examples x 16 tokens: one adapter for all (the
             reference, first row) vs 16 adapters routed per example (uniform random
             index, -1 included) vs PEFT's mixed-batch adapter_names route

Routes:
  floor          frozen model, input requires grad
  peft           PEFT's LoRA (factored, eager), when peft is installed
  rebuild        torch.nn.utils.parametrize with W + s*(B@A) rebuilt every forward
                 (the design of the documented original LoRAParam)
  hand           torch.func.grad over x@W^T + s*(x@A^T)@B^T written by hand (MLP only)
  stateful       lora_func.apply_lora
  materialized   torch.func.grad over functional_call(lora_func.effective_params)
  lora_params    torch.func.grad over functional_call(lora_func.lora_params)
  *-bw           the same forward, with loss.backward() (plain autograd) instead of torch.func.grad
  loop / vmap-*  K adapters: a Python loop of materialized steps, or one vmap(grad);
                 "+adam" adds per-adapter clipping and an Adam step over the stack

Usage:
  python benchmarks/bench.py                 # every section, plus memory of vmap-64
  python benchmarks/bench.py mlp-1024 conv   # some sections
  python benchmarks/bench.py --no-memory --rounds 15
  python benchmarks/bench.py mlp-1024 --only peft,hand,lora_params   # a few routes alone
Quote ratios, not absolute times: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as P
from torch.func import functional_call, grad, vmap

import lora_func

RANK = 8
Route = Callable[[], object]


def mlp(dim: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 10))


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )  # fmt: skip


def frozen(model: nn.Module) -> nn.Module:
    return model.requires_grad_(False)


def nonzero(adapters: dict) -> dict:
    """B is zero at init; give it values so no route can skip work."""
    g = torch.Generator().manual_seed(1)
    return {k: a.replace(B=(torch.randn(a.B.shape, generator=g) * 0.01).to(a.B)) for k, a in adapters.items()}


class Rebuild(nn.Module):
    """W + s*(B@A) recomputed on every access: the documented original's parametrization."""

    def __init__(self, lora: lora_func.LoRA) -> None:
        super().__init__()
        self.A, self.B, self.s = nn.Parameter(lora.A.clone()), nn.Parameter(lora.B.clone()), float(lora.scaling)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.s * (self.B @ self.A).view(w.shape)


def one_adapter_routes(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, linear_only: bool) -> dict:
    routes: dict[str, Route] = {}
    base = frozen(make())
    targets = [n for n, p in base.named_parameters() if p.dim() > 1]
    adapters = nonzero(lora_func.init_adapters(base, targets, r=RANK, alpha=float(RANK)))
    loss = F.cross_entropy

    xg = x.clone().requires_grad_()
    routes["floor"] = lambda: loss(base(xg), y).backward()

    try:
        from peft import LoraConfig, get_peft_model

        modules = [n.rsplit(".", 1)[0] for n in targets]
        pm = get_peft_model(make(), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=modules))
        routes["peft"] = lambda: loss(pm(x), y).backward()
    except ImportError:
        pass

    rb = frozen(make())
    for n in targets:
        P.register_parametrization(rb.get_submodule(n.rsplit(".", 1)[0]), "weight", Rebuild(adapters[n]))
    routes["rebuild"] = lambda: loss(rb(x), y).backward()

    if linear_only:
        layers = [base.get_submodule(n.rsplit(".", 1)[0]) for n in targets]

        def hand(ad: dict) -> torch.Tensor:
            h = x
            for i, (n, layer) in enumerate(zip(targets, layers, strict=True)):
                a = ad[n]
                h = F.linear(h, layer.weight, layer.bias) + a.scaling * F.linear(F.linear(h, a.A), a.B)
                if i < len(layers) - 1:
                    h = F.gelu(h)
            return loss(h, y)

        g_hand = grad(hand)
        routes["hand"] = lambda: g_hand(adapters)

    st = frozen(make())
    lora_func.set_adapters(st, adapters)
    routes["stateful"] = lambda: loss(st(x), y).backward()

    params = dict(base.named_parameters())
    g_mat = grad(lambda a: loss(functional_call(base, lora_func.effective_params(params, a), (x,)), y))
    g_fast = grad(lambda a: loss(functional_call(base, lora_func.lora_params(params, a), (x,)), y))
    routes["materialized"] = lambda: g_mat(adapters)
    routes["lora_params"] = lambda: g_fast(adapters)

    # The same functional route with plain autograd instead of torch.func.grad.
    live = {k: a.replace(A=a.A.clone().requires_grad_(), B=a.B.clone().requires_grad_()) for k, a in adapters.items()}
    routes["lora_params-bw"] = lambda: loss(
        functional_call(base, lora_func.lora_params(params, live), (x,)), y
    ).backward()
    return routes


def many_adapter_routes(dim: int, tokens: int, k: int) -> dict:
    routes: dict[str, Route] = {}
    base = frozen(mlp(dim))
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(k, tokens, dim, generator=g), torch.randint(0, 10, (k, tokens), generator=g)
    xg, yf = xs.reshape(k * tokens, dim).clone().requires_grad_(), ys.reshape(-1)
    routes[f"floor-{k}"] = lambda: F.cross_entropy(base(xg), yf).backward()

    params = dict(base.named_parameters())
    one = nonzero(lora_func.init_adapters(base, "*.weight", r=RANK, alpha=float(RANK)))
    stacked = lora_func.stack([one] * k)

    def mat(a, x, y):
        return F.cross_entropy(functional_call(base, lora_func.effective_params(params, a), (x,)), y)

    def fast(a, x, y):
        return F.cross_entropy(functional_call(base, lora_func.lora_params(params, a), (x,)), y)

    g_mat, g_fast = grad(mat), grad(fast)

    def loop() -> None:
        for i, a in enumerate(lora_func.unstack(stacked)):
            g_mat(a, xs[i], ys[i])

    routes["loop"] = loop
    routes["vmap-materialized"] = lambda: vmap(g_mat)(stacked, xs, ys)
    routes["vmap-lora_params"] = lambda: vmap(g_fast)(stacked, xs, ys)
    # vmap of the forward only, then one backward of the summed losses (adapter k's
    # gradient is that of its own loss: the losses share no adapter).
    live = lora_func.stack([one] * k)
    for leaf in lora_func.trainable(live):
        leaf.requires_grad_()
    routes["vmap-lora_params-bw"] = lambda: vmap(fast)(live, xs, ys).sum().backward()

    # A whole training step of K adapters: gradients, per-adapter clipping, Adam.
    trained = lora_func.stack([one] * k)
    opt = torch.optim.Adam(lora_func.trainable(trained), lr=1e-3)
    step = vmap(g_fast)

    def train_step() -> None:
        grads, _ = lora_func.clip_per_adapter(step(trained, xs, ys), 1.0)
        lora_func.assign_grads(trained, grads)
        opt.step()

    routes["vmap-lora_params+adam"] = train_step
    return routes


def routing_routes(dim: int = 1024, examples: int = 64, tokens: int = 16, k: int = 16) -> dict:
    """Inference with per-example routing; the first route (one adapter) is the reference."""
    routes: dict[str, Route] = {}
    base = frozen(mlp(dim))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(examples, tokens, dim, generator=g)
    index = torch.randint(-1, k, (examples,), generator=g)
    params = dict(base.named_parameters())
    adapters = [nonzero(lora_func.init_adapters(base, "*.weight", r=RANK, alpha=float(RANK))) for _ in range(k)]
    stacked = lora_func.stack(adapters)

    def one() -> None:
        with torch.no_grad():
            functional_call(base, lora_func.lora_params(params, adapters[0]), (x,))

    def routed() -> None:
        with torch.no_grad():
            functional_call(base, lora_func.lora_params(params, stacked, index=index), (x,))

    routes["one-adapter"] = one
    routes[f"routing-{k}"] = routed
    try:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0", "2", "4"])
        pm = get_peft_model(mlp(dim), config, adapter_name="a0").eval()
        for i in range(1, k):
            pm.add_adapter(f"a{i}", config)
        names = ["__base__" if i < 0 else f"a{i}" for i in index.tolist()]

        def peft_mixed() -> None:
            with torch.no_grad():
                pm(x, adapter_names=names)

        routes[f"peft-mixed-{k}"] = peft_mixed
    except ImportError:
        pass
    return routes


def sections() -> dict[str, Callable[[], dict]]:
    def mlp_section(dim: int, tokens: int) -> Callable[[], dict]:
        def build() -> dict:
            g = torch.Generator().manual_seed(3)
            x, y = torch.randn(tokens, dim, generator=g), torch.randint(0, 10, (tokens,), generator=g)
            return one_adapter_routes(lambda: mlp(dim), x, y, linear_only=True)

        return build

    def conv_section() -> dict:
        g = torch.Generator().manual_seed(4)
        x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        return one_adapter_routes(convnet, x, y, linear_only=False)

    return {
        "mlp-1024": mlp_section(1024, 32),
        "mlp-2048": mlp_section(2048, 128),
        "vmap-8": lambda: many_adapter_routes(1024, 16, 8),
        "vmap-64": lambda: many_adapter_routes(1024, 16, 64),
        "conv": conv_section,
        "routing": routing_routes,
    }


def time_routes(routes: dict[str, Route], rounds: int) -> dict[str, float]:
    """Median time of each route over ``rounds`` rounds; each round runs every route once,
    in a new random order, so that no route always follows the same neighbour (a route
    that frees a large buffer leaves page faults and cold caches to the next one)."""
    for fn in routes.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in routes}
    order = list(routes)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = routes[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_of(section: str, route: str, repeats: int = 3) -> tuple[float, float]:
    """Working memory (MiB) of one route: (first step, later steps), medians over ``repeats``
    fresh processes.

    Each is the peak RSS while the step runs minus the RSS just before it. The first step
    also pays for one-time allocations (allocator pools, autograd and functorch caches),
    which even the floor route shows; the later figure is the peak over two more steps.
    """
    code = (
        f"import sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); import bench; "
        f"print(*bench._measure({section!r}, {route!r}))"
    )
    firsts, laters = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        first, later = out.stdout.strip().splitlines()[-1].split()
        firsts.append(float(first))
        laters.append(float(later))
    return statistics.median(firsts), statistics.median(laters)


def _peak_of(fn: Route, calls: int) -> float:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to now
        f.write("5")
    before = _status_kib("VmRSS")
    for _ in range(calls):
        fn()
    return (_status_kib("VmHWM") - before) / 1024


def _measure(section: str, route: str) -> tuple[float, float]:
    routes = sections()[section]()
    fn = routes[route]
    routes.clear()  # free the other routes' models
    return _peak_of(fn, 1), _peak_of(fn, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", help=f"sections to run (default: all of {list(sections())})")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-route memory measurement")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--only", help="comma-separated routes to time (the floor is always kept)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = args.sections or list(sections())
    unknown = set(chosen) - set(sections())
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {RANK}; medians of {args.rounds} rounds")
    results: dict[str, dict] = {}
    for name in chosen:
        routes = sections()[name]()
        if args.only:
            keep = set(args.only.split(","))
            routes = {r: fn for i, (r, fn) in enumerate(routes.items()) if i == 0 or r in keep}
        medians = time_routes(routes, args.rounds)
        floor = next(iter(medians.values()))
        peft = medians.get("peft")
        print(f"\n{name}")
        print(f"  {'route':18s} {'median ms':>10s} {'x floor':>8s} {'x peft':>8s}")
        for route, med in medians.items():
            vs_peft = f"{med / peft:8.2f}" if peft else f"{'-':>8s}"
            print(f"  {route:18s} {med * 1e3:10.2f} {med / floor:8.2f} {vs_peft}")
        results[name] = {"median_s": medians}
    if not args.no_memory and "vmap-64" in chosen:
        print("\nvmap-64 working memory, MiB (peak RSS minus RSS before the step; median of 3 fresh processes)")
        print(f"  {'route':22s} {'first step':>10s} {'x floor':>8s} {'later':>8s} {'x floor':>8s}")
        floor_mem: tuple[float, float] | None = None
        for route in ("floor-64", "vmap-materialized", "vmap-lora_params", "vmap-lora_params+adam"):
            first, later = memory_of("vmap-64", route)
            floor_mem = floor_mem or (first, later)
            ratio_first, ratio_later = first / floor_mem[0], later / max(floor_mem[1], 1e-9)
            print(f"  {route:22s} {first:10.1f} {ratio_first:8.2f} {later:8.1f} {ratio_later:8.2f}")
            results["vmap-64"].setdefault("memory_mib", {})[route] = {"first": first, "later": later}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
