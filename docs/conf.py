"""Sphinx configuration of asyncapp's documentation site.

Build it (``bash .ci/docs`` does this and more)::

    .venv/bin/python -m pip install -e '.[docs]'
    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

Nothing is fetched while building: the intersphinx inventories are local
files (Debian's ``python3.11-doc`` and ``python-werkzeug-doc``; gunicorn's is
written here from the installed gunicorn, see ``_ext/asyncapp_docs.py``),
the diagrams are drawn by Debian's ``graphviz``, and the benchmark charts
by ``python -m bench.charts`` from the committed ``bench/results/*.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"
# The project root (asyncapp, bench, examples) and the local extension.
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]

from asyncapp_docs import gunicorn_inventory, require_file  # noqa: E402

import asyncapp  # noqa: E402
import bench.charts  # noqa: E402

project = "asyncapp"
author = "The asyncapp developers"
copyright = "asyncapp developers, MIT licence"
release = version = asyncapp.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.graphviz",
    "sphinx_design",
    "asyncapp_docs",
]

root_doc = "index"
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated/*.inv", "**/README.md"]
templates_path: list[str] = []
# Pages that are in no toctree on purpose (none yet) would be listed here;
# every other orphan is a warning, and so a failed build.

# -- MyST ------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "attrs_inline"]
# docs/*.md link to each other's sections as [text](page.md#a-heading), and
# to their own as (#a-heading): GitHub's slugs, made for headings down to ###.
myst_heading_anchors = 4

# -- cross-references --------------------------------------------------------------
# A reference that resolves nowhere is a warning (so, with -W, a failed build).
nitpicky = True
nitpick_ignore = [
    # The type variables and aliases of annotations: not objects to link to.
    ("py:class", "T"),
    ("py:class", "Environ"),
    ("py:class", "StartResponse"),
    ("py:class", "WSGIApp"),
    # gunicorn's docs have no API pages: asyncapp's Worker derives from it.
    ("py:class", "gunicorn.workers.base.Worker"),
    # redis-py's docs are not installed offline: RedisChannel accepts its client.
    ("py:class", "redis.client.Redis"),
    # Python's docs list these under asyncio's top-level names, which
    # annotations resolve to the defining submodule.
    ("py:class", "asyncio.events.AbstractEventLoop"),
    ("py:class", "asyncio.events.TimerHandle"),
    ("py:class", "asyncio.locks.Event"),
    # typeshed's alias for bytes-like buffers: no documented object.
    ("py:class", "WriteableBuffer"),
    # Short references in docstrings of asyncapp/server/*, whose owners are
    # asked to qualify them (the fix after each); delete an entry once fixed.
    ("py:func", "serve"),  # run.py: :func:`asyncapp.server.serve`
    ("py:class", "AppTask"),  # exchange.py: :class:`~asyncapp.host.AppTask`
    ("py:attr", "asyncapp.server.config.Config.fd"),  # reload.py: asyncapp.server.Config.fd
    ("py:attr", "events"),  # http11.py RequestParser: ``events`` (no docs of its own)
    ("py:attr", "stopped"),  # http11.py RequestParser: ``stopped``
    ("py:meth", "feed"),  # http11.py RequestParser: a docstring for feed()
    ("py:data", "IGNORED_DIRS"),  # reload.py: a #: comment on IGNORED_DIRS
]
nitpick_ignore_regex = [
    # Private helpers and type variables in signatures.
    ("py:class", r"asyncapp\..*\._\w+"),
    ("py:(class|obj)", r"asyncapp\..*\.T"),
]

intersphinx_mapping = {
    "python": (
        "https://docs.python.org/3.11/",
        require_file("/usr/share/doc/python3.11/html/objects.inv", "python3.11-doc"),
    ),
    "werkzeug": (
        "https://werkzeug.palletsprojects.com/en/stable/",
        require_file("/usr/share/doc/python-werkzeug-doc/html/objects.inv", "python-werkzeug-doc"),
    ),
    "gunicorn": (
        "https://docs.gunicorn.org/en/stable/",
        str(gunicorn_inventory(GENERATED / "gunicorn-objects.inv")),
    ),
}
# Never fall back to fetching an inventory: the files above are all there is.
intersphinx_timeout = 1
intersphinx_cache_limit = -1

# -- autodoc -----------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
python_use_unqualified_type_names = True

# -- diagrams and charts ------------------------------------------------------------
graphviz_output_format = "svg"
graphviz_dot_args = ["-Gfontname=DejaVu Sans", "-Nfontname=DejaVu Sans", "-Efontname=DejaVu Sans"]
# The benchmark charts, drawn from the committed runs (no benchmark runs here).
bench.charts.main(["--out", str(GENERATED / "charts")], echo=lambda _line: None)

# -- HTML --------------------------------------------------------------------------
html_theme = "furo"
html_title = f"asyncapp {release}"
html_static_path = ["_static"]
html_css_files = ["asyncapp.css"]
html_theme_options = {
    "source_repository": "",
    "navigation_with_keys": True,
}
html_show_sourcelink = False
html_copy_source = False
