"""The main job: an alpha sweep of LoRA adapters, trained together in one ``vmap``.

Run it with ``python -m lora_func.demo`` (or the ``lora-func-demo`` script; needs the
``demo`` extra: scikit-learn, matplotlib, tqdm). It

1. pretrains a small conv net (two ``Conv2d``, two ``Linear``) on the digits 0-4 of
   scikit-learn's bundled 8x8 handwritten digits (no download), caching the weights under
   ``<out>/cache`` so that a second run skips this;
2. adapts it to the digits 5-9 with K LoRA adapters on all four weights, one per ``alpha``
   of the sweep 1, 2, 4, ..., each with its own seed and its own batches, trained in one
   ``torch.func.vmap(torch.func.grad_and_value(loss))`` call per step with one stock
   ``torch.optim.Adam`` over the stacked factors;
3. prints a table (adapter, alpha, train loss, held-out accuracy) and the time per step of
   that one vmapped call against a Python loop over the same adapters;
4. writes a plot of the K loss curves, the best adapter, and (``--json``) a summary;
5. puts the best adapter into a classic ``nn.Module`` (:func:`lora_func.set_adapters`),
   checks that its outputs equal the functional ones, merges it into the weights with
   :func:`lora_func.remove_lora` and checks again.

scikit-learn, matplotlib and tqdm are imported inside the functions that use them, so the
module imports without them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

import lora_func

__all__ = [
    "Split",
    "check_merge",
    "evaluate",
    "load_digits_split",
    "main",
    "make_model",
    "pretrain",
    "run",
    "time_routes",
    "train_sweep",
]

#: Adapt all four weights (the two convolutions and the two linear layers).
TARGETS = "*.weight"
#: ``check_merge`` tolerances: both routes compute the same float32 weights with the same
#: formula, so outputs agree up to the order of float32 reductions (a few ulps of logits ~10).
RTOL, ATOL = 1e-5, 1e-5


@dataclass
class Split:
    """The digits, split into the pretraining task (0-4) and the adaptation task (5-9).

    Images are ``(n, 1, 8, 8)`` float32 scaled to ``[0, 1]``; labels are ``digit % 5``
    (so both tasks are 5-way). ``*_idx`` are the rows of ``load_digits()`` each set holds.
    """

    pre_x: torch.Tensor
    pre_y: torch.Tensor
    pre_test_x: torch.Tensor
    pre_test_y: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    pre_idx: torch.Tensor
    pre_test_idx: torch.Tensor
    train_idx: torch.Tensor
    test_idx: torch.Tensor

    def to(self, device: torch.device | str) -> Split:
        """A copy with every tensor on ``device``."""
        return Split(**{k: v.to(device) for k, v in vars(self).items()})


def load_digits_split(seed: int = 0, heldout: float = 0.3) -> Split:
    """Loads scikit-learn's digits and splits them by task, then into train and held-out.

    Each task's rows are split at random (stratified by digit) with ``seed``; the held-out
    rows are used only for accuracies.

    Args:
        seed: the seed of the train/held-out split.
        heldout: the fraction of each task held out.

    Returns:
        A :class:`Split`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    parts = []
    for task in (y < 5, y >= 5):
        rows = torch.nonzero(task).squeeze(1).numpy()
        fit, held = train_test_split(rows, test_size=heldout, random_state=seed, stratify=y[rows].numpy())
        parts += [torch.as_tensor(fit).sort().values, torch.as_tensor(held).sort().values]
    pre, pre_test, train, test = parts
    return Split(
        x[pre], y[pre] % 5, x[pre_test], y[pre_test] % 5, x[train], y[train] % 5, x[test], y[test] % 5,
        pre, pre_test, train, test,
    )  # fmt: skip


def make_model() -> nn.Sequential:
    """The small conv net: two ``Conv2d`` and two ``Linear`` layers, 5 outputs.

    Example:
        >>> import torch
        >>> from lora_func.demo import make_model
        >>> model = make_model()
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 5])
        >>> [k for k, _ in model.named_parameters() if k.endswith("weight")]
        ['0.weight', '2.weight', '6.weight', '8.weight']
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 5),
    )


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of rows whose arg-max is the label."""
    return float((logits.argmax(-1) == y).float().mean())


def pretrain(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 600,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    cache: Path | None = None,
) -> bool:
    """Trains ``model`` in place on ``(x, y)``, or loads the weights from ``cache``.

    Args:
        model: the model (its weights are overwritten).
        x: images; y: labels.
        steps: Adam steps; batch: batch size; lr: learning rate.
        seed: seeds the batches.
        cache: a ``.pt`` file: loaded if it exists and reads back, written after training
            otherwise (whole or not at all: a temporary file renamed into place).

    Returns:
        Whether the weights came from the cache.
    """
    if cache is not None and cache.exists():
        try:
            model.load_state_dict(torch.load(cache, map_location=x.device, weights_only=True))
            return True
        except (RuntimeError, EOFError, OSError, KeyError):  # unreadable or from another model: retrain
            pass
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen).to(x.device)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".partial")
        torch.save(model.state_dict(), partial)
        partial.replace(cache)
    return False


def _loss_fn(model: nn.Module, params: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss(adapters, x, y)``: cross-entropy of the model with ``adapters`` merged into ``params``.

    The weights are merged with :func:`lora_func.effective_params`. :func:`lora_func.lora_params`
    gives the same results; at this size (8x8 images, rank 4, weights of at most 512x64)
    merging is the cheaper route, and the vmapped step measured slower through ``lora_params``.
    """

    def loss(adapters: dict[str, lora_func.LoRA], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, lora_func.effective_params(params, adapters), (x,))
        return F.cross_entropy(logits, y)

    return loss


def init_sweep(
    params: dict[str, torch.Tensor], alphas: Sequence[float], seeds: Sequence[int], r: int = 4
) -> dict[str, lora_func.LoRA]:
    """K adapters on all four weights, adapter k with ``alphas[k]`` drawn from ``seeds[k]``, stacked.

    Each adapter draws from a generator on the parameters' device (:func:`lora_func.init_stack`).
    """
    return lora_func.init_stack(params, TARGETS, r=r, alphas=[float(a) for a in alphas], seeds=list(seeds))


def _sampler(seeds: Sequence[int], n: int, batch: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """Draws ``(K, batch)`` row indices per call, row k from adapter k's own generator."""
    gens = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
    return lambda: torch.stack([torch.randint(0, n, (batch,), generator=g) for g in gens]).to(device)


def _adam_step(opt: torch.optim.Optimizer, leaves: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(leaves, grads, strict=True):
        p.grad = g
    opt.step()


def train_sweep(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    alphas: Sequence[float],
    seeds: Sequence[int],
    *,
    steps: int = 300,
    r: int = 4,
    lr: float = 1e-3,
    batch: int = 64,
    progress: bool = False,
) -> tuple[dict[str, lora_func.LoRA], torch.Tensor]:
    """Trains K adapters (one per alpha) on a frozen model, all in one ``vmap`` per step.

    Each step draws a batch per adapter (from the adapter's own seed), computes every
    adapter's gradient with ``vmap(grad_and_value(loss))`` over the stacked adapters, and
    takes one step of a single ``torch.optim.Adam`` over :func:`lora_func.trainable`:
    Adam is elementwise, so the K adapters stay independent, and training adapter k alone
    gives the same result.

    Args:
        model: the frozen model (called through ``functional_call``).
        params: its base parameters (:func:`lora_func.base_params`, detached).
        x, y: the training images and labels.
        alphas, seeds: one alpha and one seed per adapter.
        steps, r, lr, batch: Adam steps, LoRA rank, learning rate, batch size.
        progress: show a tqdm bar with the running losses.

    Returns:
        The trained stacked adapters and the ``(steps, K)`` batch losses.
    """
    stacked = init_sweep(params, alphas, seeds, r)
    leaves = lora_func.trainable(stacked)
    opt = torch.optim.Adam(leaves, lr=lr)
    step_fn = vmap(grad_and_value(_loss_fn(model, params)))
    draw = _sampler(seeds, len(x), batch, x.device)
    losses = torch.empty(steps, len(alphas), dtype=x.dtype)
    bar = _progress(steps, progress)
    running = None
    for t in bar:
        idx = draw()
        grads, loss = step_fn(stacked, x[idx], y[idx])
        _adam_step(opt, leaves, lora_func.trainable(grads))
        losses[t] = loss.detach().cpu()
        running = losses[t] if running is None else 0.9 * running + 0.1 * losses[t]
        if progress and (t % 10 == 0 or t == steps - 1):
            bar.set_postfix_str("loss " + " ".join(f"{v:.2f}" for v in running.tolist()))  # type: ignore[attr-defined]
    return stacked, losses


def _progress(steps: int, show: bool) -> Any:
    if not show:
        return range(steps)
    from tqdm import tqdm

    return tqdm(range(steps), desc="training", unit="step", file=sys.stderr, leave=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    stacked: dict[str, lora_func.LoRA],
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every adapter's mean loss and accuracy on ``(x, y)``, in one ``vmap``.

    Returns:
        Two ``(K,)`` tensors: cross-entropy losses and accuracies.
    """

    def one(adapters: dict[str, lora_func.LoRA]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(model, lora_func.effective_params(params, adapters), (x,))
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

    loss, acc = vmap(one)(stacked)
    return loss.cpu(), acc.cpu()


def time_routes(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    alphas: Sequence[float],
    seeds: Sequence[int],
    *,
    steps: int = 8,
    r: int = 4,
    batch: int = 64,
) -> dict[str, float]:
    """Seconds per training step of the one-vmap route and of a Python loop over the adapters.

    Both routes do the same work on fresh copies of the same adapters and batches (K
    gradients and one Adam step); they alternate step by step after one warm-up step
    each (the machine may be shared), and the medians are compared.

    Returns:
        ``{"vmap": s, "loop": s, "speedup": loop / vmap}``.
    """
    loss = _loss_fn(model, params)
    draw = _sampler(seeds, len(x), batch, x.device)
    batches = [draw() for _ in range(steps + 1)]
    stacked = init_sweep(params, alphas, seeds, r)
    singles = [copy.deepcopy(a) for a in lora_func.unstack(stacked)]
    v_leaves, l_leaves = lora_func.trainable(stacked), lora_func.trainable(singles)
    v_opt, l_opt = torch.optim.Adam(v_leaves, lr=1e-3), torch.optim.Adam(l_leaves, lr=1e-3)
    v_fn, l_fn = vmap(grad_and_value(loss)), grad_and_value(loss)

    def v_step(idx: torch.Tensor) -> None:
        grads, _ = v_fn(stacked, x[idx], y[idx])
        _adam_step(v_opt, v_leaves, lora_func.trainable(grads))

    def l_step(idx: torch.Tensor) -> None:
        grads = [l_fn(a, x[i], y[i])[0] for a, i in zip(singles, idx, strict=True)]
        _adam_step(l_opt, l_leaves, lora_func.trainable(grads))

    times: dict[str, list[float]] = {"vmap": [], "loop": []}
    for t, idx in enumerate(batches):
        for name, fn in (("vmap", v_step), ("loop", l_step)):
            _sync(x.device)
            start = time.perf_counter()
            fn(idx)
            _sync(x.device)
            if t > 0:  # the first step of each route warms up
                times[name].append(time.perf_counter() - start)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["speedup"] = out["loop"] / out["vmap"]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_merge(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    adapter: dict[str, lora_func.LoRA],
    x: torch.Tensor,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> dict[str, Any]:
    """Checks the classic ``nn.Module`` route against the functional one for one adapter.

    A copy of ``module`` gets the adapter with :func:`lora_func.set_adapters` (which
    applies LoRA to each weight); its outputs on ``x`` must equal
    ``functional_call(module, effective_params(params, adapter), (x,))``. Then every
    weight's LoRA is folded in with ``remove_lora(..., merge=True)`` and the plain module
    must still give the same outputs. ``module`` itself is not changed.

    Args:
        module: the model whose weights are ``params``.
        params: the base parameters the functional reference uses.
        adapter: one (unstacked) adapter tree.
        x: inputs.
        rtol, atol: the ``torch.allclose`` tolerances.

    Returns:
        ``{"passed", "with_lora_max_abs_diff", "merged_max_abs_diff", "rtol", "atol"}``.
    """
    with torch.no_grad():
        reference = functional_call(module, lora_func.effective_params(params, adapter), (x,))
        classic = copy.deepcopy(module)
        lora_func.set_adapters(classic, adapter)
        with_lora = classic(x)
        for name in adapter:
            path, _, pname = name.rpartition(".")
            lora_func.remove_lora(classic.get_submodule(path), pname, merge=True)
        merged = classic(x)
    diffs = [float((out - reference).abs().max()) for out in (with_lora, merged)]
    passed = all(torch.allclose(out, reference, rtol=rtol, atol=atol) for out in (with_lora, merged))
    return {
        "passed": passed,
        "with_lora_max_abs_diff": diffs[0],
        "merged_max_abs_diff": diffs[1],
        "rtol": rtol,
        "atol": atol,
    }


def save_adapter(adapter: dict[str, lora_func.LoRA], out: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Writes one adapter tree to ``<out>/best_adapter.safetensors`` with :func:`lora_func.save`.

    Read it back with ``lora_func.load(path)`` (and ``lora_func.load_metadata(path)``).
    """
    path = out / "best_adapter.safetensors"
    lora_func.save(adapter, path, metadata=metadata)
    return path


def plot_losses(losses: torch.Tensor, alphas: Sequence[float], accs: torch.Tensor, path: Path) -> None:
    """Saves a PNG of the K loss curves (a 10-step moving average of the batch losses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = min(10, len(losses))
    smooth = losses.T.unsqueeze(1)
    smooth = F.avg_pool1d(smooth, window, stride=1).squeeze(1)
    steps = torch.arange(window, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    colors = plt.get_cmap("viridis")(torch.linspace(0, 0.9, len(alphas)).tolist())
    for k, alpha in enumerate(alphas):
        ax.plot(steps, smooth[k], color=colors[k], label=f"α={alpha:g} (held-out acc {float(accs[k]):.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title(f"{len(alphas)} LoRA adapters on digits 5-9, trained in one vmap")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(summary: dict[str, Any]) -> str:
    """The human-readable report of :func:`run`'s summary."""
    lines = [
        f"pretrained on digits 0-4: held-out accuracy {summary['pretrain_accuracy']:.3f}"
        + (" (from cache)" if summary["pretrained_from_cache"] else ""),
        f"digits 5-9 before adapting: held-out accuracy {summary['zero_shot_accuracy']:.3f}",
        "",
        "adapter  alpha  train loss  held-out acc",
    ]
    for k, row in enumerate(summary["adapters"]):
        mark = "  <- best" if k == summary["best"]["adapter"] else ""
        lines.append(f"{k:>7}  {row['alpha']:>5g}  {row['train_loss']:>10.4f}  {row['heldout_accuracy']:>12.3f}{mark}")
    sp = summary["speed"]
    check = summary["check"]
    lines += [
        "",
        f"time per step, {len(summary['adapters'])} adapters: one vmap {sp['vmap_ms']:.1f} ms, "
        f"Python loop {sp['loop_ms']:.1f} ms: {sp['speedup']:.2f}x faster",
        f"classic nn.Module == functional (rtol {check['rtol']:g}, atol {check['atol']:g}): "
        f"with LoRA {check['with_lora_max_abs_diff']:.1e}, merged {check['merged_max_abs_diff']:.1e} max abs diff: "
        + ("passed" if check["passed"] else "FAILED"),
        f"best adapter: {summary['best']['file']}; plot: {summary['plot']}",
        f"{summary['seconds']:.1f} s in all ({summary['device']}, {summary['threads']} thread(s)): "
        f"data and pretraining {summary['pretrain_seconds']:.1f} s, "
        f"{summary['steps']} steps of the sweep {summary['train_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def run(
    *,
    adapters: int = 8,
    steps: int = 300,
    out: str | Path = "lora_func_demo",
    device: str | None = None,
    seed: int = 0,
    pretrain_steps: int = 600,
    timing_steps: int = 20,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole job; returns the summary that ``--json`` prints.

    Args:
        adapters: K, the number of adapters; adapter k has ``alpha = 2**k`` and seed ``seed + k``.
        steps: Adam steps of the sweep.
        out: the output folder (the pretraining cache goes to ``<out>/cache``).
        device: ``"cpu"``, ``"cuda"``, ...; ``None`` means CUDA when available.
        seed: seeds the data split, the model, pretraining and the adapters.
        pretrain_steps: Adam steps of pretraining (when not cached).
        timing_steps: steps per route when timing vmap against the loop.
        progress: show the progress bar.
    """
    start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(seed).to(dev)
    torch.manual_seed(seed)
    model = make_model().to(dev)
    cache = out / "cache" / f"digits04_convnet_seed{seed}_steps{pretrain_steps}.pt"
    cached = pretrain(model, data.pre_x, data.pre_y, steps=pretrain_steps, seed=seed, cache=cache)
    pretrain_s = time.perf_counter() - start
    model.eval().requires_grad_(False)
    params = {k: v.detach() for k, v in lora_func.base_params(model).items()}
    with torch.no_grad():
        pre_acc = accuracy(model(data.pre_test_x), data.pre_test_y)
        zero_shot = accuracy(model(data.test_x), data.test_y)

    alphas = [float(2**k) for k in range(adapters)]
    seeds = [seed + k for k in range(adapters)]
    train_start = time.perf_counter()
    stacked, losses = train_sweep(
        model, params, data.train_x, data.train_y, alphas, seeds, steps=steps, progress=progress
    )
    train_s = time.perf_counter() - train_start
    train_loss, _ = evaluate(model, params, stacked, data.train_x, data.train_y)
    _, test_acc = evaluate(model, params, stacked, data.test_x, data.test_y)
    best = int(test_acc.argmax())
    speed = time_routes(model, params, data.train_x, data.train_y, alphas, seeds, steps=timing_steps)
    best_adapter = {
        k: v.replace(A=v.A.clone(), B=v.B.clone(), scaling=v.scaling.clone())
        for k, v in lora_func.unstack(stacked)[best].items()
    }
    check = check_merge(model, params, best_adapter, data.test_x)
    file = save_adapter(best_adapter, out, {"alpha": alphas[best], "heldout_accuracy": float(test_acc[best])})
    plot = out / "loss_curves.png"
    plot_losses(losses, alphas, test_acc, plot)
    return {
        "adapters": [
            {"alpha": a, "seed": s, "train_loss": float(tl), "heldout_accuracy": float(acc)}
            for a, s, tl, acc in zip(alphas, seeds, train_loss, test_acc, strict=True)
        ],
        "best": {"adapter": best, "alpha": alphas[best], "heldout_accuracy": float(test_acc[best]), "file": str(file)},
        "pretrain_accuracy": pre_acc,
        "zero_shot_accuracy": zero_shot,
        "pretrained_from_cache": cached,
        "speed": {"vmap_ms": 1e3 * speed["vmap"], "loop_ms": 1e3 * speed["loop"], "speedup": speed["speedup"]},
        "check": check,
        "route": "effective_params",
        "steps": steps,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "plot": str(plot),
        "seconds": time.perf_counter() - start,
        "pretrain_seconds": pretrain_s,
        "train_seconds": train_s,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m lora_func.demo [--adapters K] [--steps N] [--out DIR] ...``.

    Returns 0 when the merge check passed, 1 otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m lora_func.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8, help="number of adapters K; alphas 1, 2, ..., 2**(K-1)")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of the sweep (default 300)")
    parser.add_argument("--out", default="lora_func_demo", help="output folder (default ./lora_func_demo)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, model and adapters (default 0)")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="Adam steps of pretraining (default 600)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: the tensors are small and on a busy machine more threads "
        "wait on each other; on an idle one, --threads 2 or more is faster)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout (report to stderr)")
    args = parser.parse_args(argv)
    if args.adapters < 1:
        parser.error("--adapters must be at least 1")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        summary = run(
            adapters=args.adapters,
            steps=args.steps,
            out=args.out,
            device=args.device,
            seed=args.seed,
            pretrain_steps=args.pretrain_steps,
        )
    finally:
        torch.set_num_threads(threads)
    print(format_table(summary), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0 if summary["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
