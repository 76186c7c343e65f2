"""Only for the optional compiled build; pyproject.toml holds the metadata.

``ASYNCAPP_COMPILE=1 pip install .`` compiles :data:`asyncapp.compiled.HOT_MODULES`
with mypyc (``build_backend.py`` brings the pinned mypy into the build);
without it this is an ordinary pure-Python setuptools build.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from setuptools import setup


def hot_modules() -> list[str]:
    """HOT_MODULES from asyncapp/compiled.py, read without importing asyncapp."""
    source = (Path(__file__).parent / "asyncapp" / "compiled.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "HOT_MODULES":
            return list(ast.literal_eval(node.value))  # type: ignore[arg-type]
    raise RuntimeError("asyncapp/compiled.py has no HOT_MODULES")


def hot_paths() -> list[str]:
    """The source files of :func:`hot_modules`, as mypyc wants them."""
    return [name.replace(".", "/") + ".py" for name in hot_modules()]


if __name__ == "__main__":  # as setuptools runs it
    if os.environ.get("ASYNCAPP_COMPILE", "") == "1":
        from mypyc.build import mypycify

        # One shared library, asyncapp__mypyc, beside a small stub per module.
        setup(ext_modules=mypycify(hot_paths(), opt_level="3", group_name="asyncapp"))
    else:
        setup()
