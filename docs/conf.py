"""Sphinx configuration of the dask_sweep docs (PyData theme, MyST-NB).

Build (warnings are errors, as in CI)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs build/docs

The notebooks under ``docs/notebooks/`` (links to ``notebooks/``) are executed
on every build; a cell that fails fails the build.
"""

from __future__ import annotations

import dask_sweep

project = "dask_sweep"
author = "the dask_sweep developers"
copyright = "the dask_sweep developers"
release = dask_sweep.__version__
version = release

extensions = [
    "myst_nb",  # MyST markdown pages and executed notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # the numpydoc-style docstrings
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# ---- MyST / notebooks
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"  # run the notebooks on every build (they take seconds)
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = True  # the notebook's files go to a temporary folder

# ---- API reference
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# ---- HTML
html_theme = "pydata_sphinx_theme"
html_title = f"dask_sweep {release}"
# every page is top level: the navbar lists them, no empty section sidebar
html_sidebars = {"**": []}
html_theme_options = {
    "navigation_with_keys": False,
    "header_links_before_dropdown": 6,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_show_sourcelink = False
html_static_path: list[str] = []
