"""Sphinx configuration: `make docs` builds docs/_build/html."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pyro_seqlatent"
author = "pyro_seqlatent developers"
copyright = "2026, pyro_seqlatent developers"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
exclude_patterns = ["_build"]
html_theme = "alabaster"
suppress_warnings = ["myst.header", "myst.xref_missing"]
