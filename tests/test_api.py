"""The public API is what docs/api.md documents, and every name is documented."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import asyncapp

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented_names() -> set[str]:
    text = API_DOC.read_text()
    return set(re.findall(r"`asyncapp\.([A-Za-z_]\w*)", text))


def test_all_matches_documented_api() -> None:
    # Subpackages and engines are imported on demand; __all__ is named in the prose.
    documented = documented_names() - {
        "host",
        "testing",
        "server",
        "asgi",
        "gunicorn",
        "redis",
        "compiled",
        "__all__",
    }
    assert set(asyncapp.__all__) == documented


def test_every_public_name_exists_and_has_a_docstring() -> None:
    for name in asyncapp.__all__:
        value = getattr(asyncapp, name)
        if name == "__version__":
            assert isinstance(value, str)
            continue
        assert inspect.getdoc(value), f"asyncapp.{name} has no docstring"


def test_operation_docstrings_show_usage() -> None:
    for op in (asyncapp.read, asyncapp.readable, asyncapp.writable, asyncapp.sleep):
        assert ".. code-block:: python" in (op.__doc__ or ""), op.__name__
    assert "yield from" in (asyncapp.coroutine.__doc__ or "")
    assert "await" in (asyncapp.coroutine.__doc__ or "")


def test_green_module_api() -> None:
    from asyncapp import green

    expected = {
        "GreenInput",
        "GreenWebSocket",
        "app",
        "read",
        "readable",
        "run",
        "sleep",
        "websocket",
        "writable",
    }
    assert set(green.__all__) == expected


def test_websocket_module_api() -> None:
    from asyncapp import websocket

    expected = {"accept", "is_upgrade", "WebSocket", "WebSocketUnavailable", "HandshakeError"}
    assert expected <= set(websocket.__all__)
    assert ".. code-block:: python" in (websocket.accept.__doc__ or "")
    assert issubclass(websocket.WebSocketUnavailable, asyncapp.AsyncappError)
    assert issubclass(websocket.HandshakeError, asyncapp.AsyncappError)


def test_the_compiled_build_compiles_what_asyncapp_compiled_names() -> None:
    # setup.py reads HOT_MODULES without importing asyncapp: the two agree,
    # and every name is a module whose source is where mypyc will look.
    import runpy

    from asyncapp import compiled

    root = Path(__file__).resolve().parent.parent
    setup = runpy.run_path(str(root / "setup.py"), run_name="asyncapp_setup")
    assert setup["hot_modules"]() == list(compiled.HOT_MODULES)
    for path in setup["hot_paths"]():
        assert (root / path).is_file(), path
