"""Sphinx configuration: autodoc + napoleon for the Google-style docstrings, doctest for every example."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # experiments/ and benchmarks/ are run from a checkout

project = "normopt"
author = "normopt developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.doctest", "sphinx.ext.mathjax"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build", "README.md"]
html_static_path = ["_static"]
html_theme = "alabaster"
doctest_global_setup = "import torch\ntorch.manual_seed(0)"
nitpicky = False
# The docstring examples (>>> blocks pulled in by autodoc) run in their modules' namespaces under
# pytest --doctest-modules; this build runs the pages' own testcode blocks.
doctest_test_doctest_blocks = ""
