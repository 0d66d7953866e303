"""Sphinx configuration of the API reference: ``python -m sphinx -W -b html docs/api docs/_build/api``."""

import bdia_fx

project = "bdia_fx"
release = bdia_fx.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]  # napoleon: the docstrings' "Args:" sections
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
html_theme = "alabaster"
exclude_patterns = ["_build"]
