"""Sphinx configuration for monai_twin's documentation (built in CI with warnings as errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from monai_twin import __version__

project = "monai_twin"
author = "monai_twin contributors"
copyright = "2026, monai_twin contributors"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# No network at build time: intersphinx inventories are not fetched, references stay plain text.
intersphinx_mapping = {}
nitpicky = False
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "furo"
html_title = f"monai_twin {__version__}"
