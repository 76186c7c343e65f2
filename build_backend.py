"""asyncapp's build backend: setuptools', plus mypyc when ``ASYNCAPP_COMPILE=1``.

The default build is pure Python and needs nothing but setuptools. Asked
for the compiled build (``ASYNCAPP_COMPILE=1 pip install .``), the build
also needs mypy (whose mypyc does the compiling) at the one version the
hot modules are checked and tested with, and the runtime dependencies, so
that mypyc sees their types: this adds them to the isolated build
environment's requirements then, and only then.
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the rest of the PEP 517 hooks)

#: The mypy (and so mypyc) the compiled build is made and tested with.
MYPYC_REQUIREMENTS = [
    "mypy==2.4.1",
    "werkzeug>=3.0",
    "greenlet>=3.0",
    "httptools>=0.6",
    "wsproto>=1.2",
]


def compiling() -> bool:
    """Whether this build compiles the hot modules (``ASYNCAPP_COMPILE=1``)."""
    return os.environ.get("ASYNCAPP_COMPILE", "") == "1"


# setuptools' own hooks run setup.py to find more requirements, and setup.py
# imports mypyc when compiling: so, compiling, they are not asked (they add
# nothing to a pyproject.toml project but that run).


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    if compiling():
        return list(MYPYC_REQUIREMENTS)
    requires: list[str] = _setuptools.get_requires_for_build_wheel(config_settings)
    return requires


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    if compiling():
        return list(MYPYC_REQUIREMENTS)
    requires: list[str] = _setuptools.get_requires_for_build_editable(config_settings)
    return requires


# An sdist is source: nothing is compiled for it, so ASYNCAPP_COMPILE=1 (set
# for the wheel built from it) must not make setup.py reach for mypyc. Each
# hook runs in a process of its own: the variable is dropped for this one.


def get_requires_for_build_sdist(config_settings: dict[str, Any] | None = None) -> list[str]:
    os.environ.pop("ASYNCAPP_COMPILE", None)
    requires: list[str] = _setuptools.get_requires_for_build_sdist(config_settings)
    return requires


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    os.environ.pop("ASYNCAPP_COMPILE", None)
    name: str = _setuptools.build_sdist(sdist_directory, config_settings)
    return name
