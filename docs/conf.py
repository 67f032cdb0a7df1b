"""Sphinx configuration for the lora_func documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The API reference is generated from the docstrings (autodoc + napoleon, Google style);
the guides' ``>>>`` examples run as doctests in the test suite (``--doctest-glob='*.rst'``).
"""

from __future__ import annotations

import lora_func

project = "lora_func"
author = "lora_func contributors"
copyright = "lora_func contributors"
release = lora_func.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",  # docs/benchmarks.md: the benchmark record is Markdown, like the README
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Types only for the arguments a docstring documents (no second, bare "Parameters" list).
autodoc_typehints_description_target = "documented_params"

# No network at build time: no intersphinx. References to torch and the standard library
# stay plain text; do not let a missing target fail the -W build.
nitpicky = False

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
