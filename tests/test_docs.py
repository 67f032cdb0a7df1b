"""The documentation runs and is complete.

* Every ```python block of README.md runs in a fresh namespace, and the examples of the
  sections named in ``CHECKS`` are checked against float64 references written out here.
* Every public name (``lora_func.__all__``) has an entry in ``docs/api.rst``, and every
  entry there names a public name: a new export without docs fails here.

(The guides in ``docs/*.rst`` run as doctests through ``--doctest-glob='*.rst'``.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.utils.parametrize as P
from torch import nn

import lora_func

# The README's examples are CPU code, run as written; the rest reads text files.
pytestmark = pytest.mark.device_independent("runs the documentation as written (CPU code) and reads text files")

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
API = ROOT / "docs" / "api.rst"

# float32 forward passes of a few small layers against float64 references: a few ulps of
# float32 accumulated over sums of <= 16 terms.
TOL = {"rtol": 1e-5, "atol": 1e-5}


def readme_blocks() -> list[tuple[str, str]]:
    """``(section heading, code)`` for every ```python block of the README, in order."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        headings = re.findall(r"^#+ +(.+?) *$", text[: match.start()], flags=re.MULTILINE)
        blocks.append((headings[-1] if headings else "", match.group(1)))
    return blocks


def mlp64(params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The README's Linear-ReLU-Linear model, written out in float64."""
    h = x.double() @ weights["0.weight"].T + params["0.bias"].double()
    return h.relu() @ weights["2.weight"].T + params["2.bias"].double()


def merged64(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    return W.double() + float(s) * (B.double() @ A.double())


def check_functional(ns: dict[str, Any]) -> None:
    model, params, adapters, x, y = (ns[k] for k in ("model", "params", "adapters", "x", "y"))
    # The base is frozen: params are the model's own values, and nothing gave them a gradient.
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p) and p.grad is None, name
    assert sorted(adapters) == ["0.weight", "2.weight"]
    for lora in adapters.values():
        assert lora.r == 4 and float(lora.scaling) == 2.0  # scaling is not trained
        assert lora.scaling.grad is None
        assert bool(lora.B.ne(0).any()), "training left B at its zero initialisation"

    def loss64(adapters: dict[str, lora_func.LoRA]) -> torch.Tensor:
        weights = {k: merged64(params[k], a.A, a.B, a.scaling) for k, a in adapters.items()}
        return nn.functional.cross_entropy(mlp64(params, weights, x), y)

    # The README's loss is the merged model's loss, and training lowered it below the base
    # model's (where every adapter started: B = 0).
    base = nn.functional.cross_entropy(mlp64(params, {k: params[k].double() for k in adapters}, x), y)
    trained = loss64(adapters)
    torch.testing.assert_close(ns["loss"](adapters, x, y).double(), trained, **TOL)
    assert trained < 0.5 * base, (float(trained), float(base))

    # The sweep: one loss per alpha, each the loss of that adapter on its own.
    sweep, losses = ns["sweep"], ns["losses"]
    assert losses.shape == (4,)
    torch.testing.assert_close(sweep["0.weight"].scaling, torch.tensor([1.0, 4.0, 16.0, 64.0]) / 4)
    expected = torch.stack([loss64(tree) for tree in lora_func.unstack(sweep)])
    torch.testing.assert_close(losses.double(), expected, **TOL)


def check_stateful(ns: dict[str, Any]) -> None:
    layer, lora, x, y = ns["layer"], ns["lora"], ns["x"], ns["y"]
    # The block's first random draw is the Linear's initialisation (it runs after
    # torch.manual_seed(0), see test_readme_block): redo it to get the base weight back.
    torch.manual_seed(0)
    W0 = nn.Linear(8, 16).weight.detach()
    assert not P.is_parametrized(layer)
    assert type(layer.weight) is nn.Parameter and layer.weight.requires_grad
    assert bool(lora.B.ne(0).any()), "the optimizer step left B at zero"
    # merge=True leaves W0 + (alpha / r) B @ A, alpha / r = 8 / 4.
    W = merged64(W0, lora.A, lora.B, 2.0)
    torch.testing.assert_close(layer.weight.double(), W, **TOL)
    torch.testing.assert_close(y.double(), x.double() @ W.T + layer.bias.double(), **TOL)


#: Checks for the README's examples, by section heading. A section not named here only
#: has to run.
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {"Functional": check_functional, "Stateful": check_stateful}


def test_readme_has_the_checked_examples() -> None:
    headings = [h for h, _ in readme_blocks()]
    for heading in CHECKS:
        assert headings.count(heading) == 1, f"README.md needs exactly one python block under '## {heading}'"


@pytest.mark.parametrize(("heading", "code"), readme_blocks(), ids=lambda v: v if "\n" not in v else "")
def test_readme_block(heading: str, code: str) -> None:
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(code, f"README.md ({heading})", "exec"), namespace)
    if heading in CHECKS:
        CHECKS[heading](namespace)


def api_entries() -> list[str]:
    """The names documented by a directive in docs/api.rst (``.. autofunction:: name`` ...)."""
    text = API.read_text(encoding="utf-8")
    pattern = r"^\.\. +(?:auto)?(?:function|class|data|exception|attribute)::\s+(?:lora_func\.)?([A-Za-z_]\w*)\s*$"
    return re.findall(pattern, text, flags=re.MULTILINE)


def test_every_public_name_is_in_the_api_reference() -> None:
    missing = sorted(set(lora_func.__all__) - set(api_entries()))
    assert not missing, f"docs/api.rst has no entry for {missing}; add an autodoc directive for each"


def test_the_api_reference_names_only_public_names() -> None:
    entries = api_entries()
    assert sorted(set(entries) - set(lora_func.__all__)) == []
    assert len(entries) == len(set(entries)), "a name is documented twice in docs/api.rst"
