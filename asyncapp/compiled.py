"""The optional compiled build: which hot modules this install runs compiled.

asyncapp is pure Python, and that is the default build and what CI tests
first. The modules that every request passes through (:data:`HOT_MODULES`)
can also be compiled to C extensions with mypyc, the compiler that ships
black and mypy themselves: they are ``mypy --strict`` already, so it needs
no other source. The build is asked for by an environment variable, and
made from source (the published wheel is the pure build)::

    ASYNCAPP_COMPILE=1 pip install --no-binary asyncapp asyncapp
    ASYNCAPP_COMPILE=1 pip install .    # in a checkout

``setup.py`` then compiles :data:`HOT_MODULES` with the one mypy version
``build_backend.py`` pins, which it adds to the isolated build's
requirements only then. The compiled modules behave like the pure ones
(CI runs the server's, the host's and the ASGI bridge's tests against
both), and serve about 1.4x the requests per second on one core
(``docs/benchmarks.md``). See ``docs/deploy.md``, "The compiled build".

.. code-block:: python

    >>> import asyncapp.compiled
    >>> asyncapp.compiled.compiled_modules()  # [] on the pure build
    []
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

__all__ = ["HOT_MODULES", "compiled_modules"]

#: What ``ASYNCAPP_COMPILE=1`` compiles (setup.py reads this tuple): the
#: parser, the server's connection and exchange, the host loop and task,
#: and the generator driver. The rest stays interpreted in either build.
HOT_MODULES: Final = (
    "asyncapp.server.http11",
    "asyncapp.server.exchange",
    "asyncapp.server.connection",
    "asyncapp.host.loop",
    "asyncapp.host.task",
    "asyncapp.app.driver",
)


def compiled_modules() -> list[str]:
    """The names among :data:`HOT_MODULES` that are C extensions in this install."""
    compiled = []
    for name in HOT_MODULES:
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        if not path.endswith(".py"):
            compiled.append(name)
    return compiled


if TYPE_CHECKING:
    # mypyc reads this decorator at compile time (it is never called then);
    # the pure build needs no mypy_extensions at run time, hence the stand-in.
    from mypy_extensions import mypyc_attr as mypyc_attr
else:

    def mypyc_attr(*_args, **_flags):
        """A no-op: what mypyc's ``mypyc_attr`` is when nothing is compiled."""
        return lambda cls: cls
