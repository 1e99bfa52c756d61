"""Sphinx configuration of the ignite-swav reference: ``make docs`` builds it into docs/_build/html."""

import ignite_swav

project = "ignite-swav"
author = "the ignite-swav developers"
release = ignite_swav.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
html_theme = "alabaster"
html_static_path: list[str] = []
