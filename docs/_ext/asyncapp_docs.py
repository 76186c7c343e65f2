"""asyncapp's own Sphinx extension: the checks that keep the reference whole.

* **Every public name is documented.** For each module in
  :data:`API_MODULES`, every name in its ``__all__`` must have a docstring
  (a ``#:`` comment for data), every public method and property of its
  classes too, and every one must be in the built reference (the Python
  domain knows it). Anything missing is a warning, and the build runs with
  ``-W``: a public name without a docstring fails CI.
* **Every server setting with its default and reason**: the
  ``{asyncapp-settings}`` directive renders :class:`asyncapp.server.Config`
  as a table from its fields and their ``#:`` comments.
* **Offline inventories**: :func:`require_file` says which Debian package
  brings a missing inventory; :func:`gunicorn_inventory` writes gunicorn's.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import types
import zlib
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import ConfigError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

#: The public modules: each one's ``__all__`` is its public API.
API_MODULES = [
    "asyncapp",
    "asyncapp.green",
    "asyncapp.sse",
    "asyncapp.web",
    "asyncapp.testing",
    "asyncapp.asgi",
    "asyncapp.gunicorn",
    "asyncapp.redis",
    "asyncapp.websocket",
    "asyncapp.server",
    "asyncapp.host",
    "asyncapp.protocol",
]

#: Names in a public ``__all__`` that the reference leaves out on purpose.
NOT_IN_REFERENCE = {
    # The server's per-connection and per-request machinery: exported for
    # the gunicorn worker and the tests, described in design.md; an app or a
    # deployment never touches them.
    "asyncapp.server.Connection": "server internals (design.md)",
    "asyncapp.server.Exchange": "server internals (design.md)",
}

#: Public methods that still lack a docstring, each in a file owned by other
#: work in progress (asyncapp/server/*). The list only shrinks: an entry that
#: has gained its docstring is reported too, so that it is deleted here.
KNOWN_UNDOCUMENTED = {
    "asyncapp.server.Server.address",
    "asyncapp.server.Server.url",
    "asyncapp.server.Server.wait_ready",
    "asyncapp.server.Server.connection_closed",
}


def require_file(path: str, debian_package: str) -> str:
    """``path``, or a configuration error naming the package that brings it."""
    if not Path(path).is_file():
        raise ConfigError(
            f"{path} is missing: install Debian's {debian_package} package "
            f"(apt-get install -y {debian_package}; bash .ci/docs does). The docs build "
            "reads its intersphinx inventories from local files and fetches nothing."
        )
    return path


def gunicorn_inventory(out: Path) -> Path:
    """Write an intersphinx inventory of gunicorn's settings to ``out``.

    Neither Debian nor gunicorn's wheel ships gunicorn's documentation, and
    the build fetches nothing, so the inventory is made from the installed
    gunicorn's own settings registry (``gunicorn.config.KNOWN_SETTINGS``,
    the source that gunicorn's settings page is generated from): one label
    per setting, named and anchored as on that page (``worker_connections``
    is ``settings.html#worker-connections``). Written at every build, so it
    always matches the gunicorn that is installed.
    """
    try:
        import gunicorn
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError as error:
        raise ConfigError(
            f"gunicorn is not importable ({error}): .venv/bin/python -m pip install -e '.[docs]'"
        ) from None
    lines = []
    for setting in KNOWN_SETTINGS:
        label = setting.name.replace("_", "-")
        lines.append(f"{label} std:label -1 settings.html#{label} {setting.name}")
    lines.append("settings std:label -1 settings.html Settings")
    header = (
        "# Sphinx inventory version 2\n"
        "# Project: gunicorn\n"
        f"# Version: {gunicorn.__version__}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    data = header.encode() + zlib.compress(("\n".join(lines) + "\n").encode())
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_bytes() != data:
        out.write_bytes(data)
    return out


# -- every public name documented ----------------------------------------------------


def _attr_docs(module_name: str) -> dict[tuple[str, str], list[str]]:
    try:
        return ModuleAnalyzer.for_module(module_name).find_attr_docs()
    except Exception:  # a C module, or no source: nothing to find
        return {}


def public_names() -> dict[str, Any]:
    """Full public name -> object, for every name the reference must hold."""
    found = {}
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            full = f"{module_name}.{name}"
            if full in NOT_IN_REFERENCE:
                continue
            value = getattr(module, name)
            if isinstance(value, types.ModuleType):
                continue  # a submodule: it is in API_MODULES itself
            found[full] = value
    return found


def _member_problems(full: str, cls: type) -> list[str]:
    problems = []
    for attr, raw in vars(cls).items():
        if attr.startswith("_"):
            continue
        if isinstance(raw, property):
            func: Any = raw.fget
        elif isinstance(raw, classmethod | staticmethod):
            func = raw.__func__
        elif inspect.isfunction(raw):
            func = raw
        else:
            continue
        name = f"{full}.{attr}"
        documented = bool(inspect.getdoc(getattr(cls, attr, func)) or func.__doc__)
        if not documented and name not in KNOWN_UNDOCUMENTED:
            problems.append(f"{name} has no docstring")
        elif documented and name in KNOWN_UNDOCUMENTED:
            problems.append(
                f"{name} has a docstring now: delete it from KNOWN_UNDOCUMENTED "
                "in docs/_ext/asyncapp_docs.py"
            )
    return problems


def docstring_problems() -> list[str]:
    """What a public name lacks, in words; empty when everything is documented."""
    problems = []
    for module_name in API_MODULES:
        if not inspect.getdoc(importlib.import_module(module_name)):
            problems.append(f"module {module_name} has no docstring")
    for full, value in public_names().items():
        module_name, _, name = full.rpartition(".")
        if inspect.isclass(value):
            if not inspect.getdoc(value):
                problems.append(f"{full} has no docstring")
            problems += _member_problems(full, value)
        elif inspect.isroutine(value):
            if not inspect.getdoc(value):
                problems.append(f"{full} has no docstring")
        else:
            # Data: a ``#:`` comment where it is exported or where it is defined
            # (the module, or one of its submodules holding the same object).
            homes = [
                other
                for other, module in list(sys.modules.items())
                if (other == module_name or other.startswith(module_name + "."))
                and getattr(module, name, None) is value
            ]
            if not any(("", name) in _attr_docs(home) for home in homes):
                problems.append(f"{full} has no #: comment saying what it is")
    for name in KNOWN_UNDOCUMENTED:
        owner, _, attr = name.rpartition(".")
        module_name, _, cls_name = owner.rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name, None)
        if cls is None or not hasattr(cls, attr):
            problems.append(f"{name} (KNOWN_UNDOCUMENTED) no longer exists: delete it there")
    return problems


def check_api(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn (so fail the ``-W`` build) for every public name not fully documented."""
    for problem in docstring_problems():
        logger.warning("public API: %s", problem, type="asyncapp", subtype="api")
    objects = env.get_domain("py").objects  # type: ignore[attr-defined]
    for full, value in public_names().items():
        # Under its public name, or where it is defined (data documented
        # with its #: comment, from the module that holds the comment).
        module_name, _, name = full.rpartition(".")
        names = {full} | {
            f"{other}.{name}"
            for other, module in list(sys.modules.items())
            if other.startswith(module_name + ".") and getattr(module, name, None) is value
        }
        if not names & set(objects):
            logger.warning(
                "public API: %s is not in the API reference (docs/reference/)",
                full,
                type="asyncapp",
                subtype="api",
            )


# -- every server setting --------------------------------------------------------------

#: Reasons for the settings whose ``#:`` comment config.py does not have yet
#: (it is owned by other work in progress). Each entry is reported once the
#: comment exists, so that it is deleted here and config.py stays the source.
SETTING_REASONS = {
    "host": "Loopback: nothing outside the machine reaches a server that was "
    "not told to listen there (``--host 0.0.0.0`` or ``::`` for every interface).",
    "port": "8000, the customary port of development servers (Django, uvicorn, "
    "gunicorn); ``0`` picks a free one.",
    "access_log": "One Common Log Format line per response on the ``asyncapp.access`` "
    "logger; ``--no-access-log`` for benchmarks or when a proxy logs already.",
}


def _inline(text: str) -> list[nodes.Node]:
    """Text with ``literals`` and :role:`targets` as docutils nodes (no links)."""
    out: list[nodes.Node] = []
    for part in re.split(r"(``[^`]+``|:\w+:`[^`]+`)", text):
        if part.startswith("``"):
            out.append(nodes.literal(part[2:-2], part[2:-2]))
        elif part.startswith(":") and "`" in part:
            target = part.split("`")[1].lstrip("~")
            out.append(nodes.literal(target, target))
        elif part:
            out.append(nodes.Text(part))
    return out


class SettingsTable(SphinxDirective):
    """``{asyncapp-settings}``: every field of ``Config``, its default and reason."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from asyncapp.server.config import Config

        self.env.note_dependency(inspect.getfile(Config))
        docs = _attr_docs("asyncapp.server.config")
        table = nodes.table(classes=["asyncapp-settings"])
        group = nodes.tgroup(cols=3)
        table += group
        for width in (22, 14, 64):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row([nodes.Text("setting")], [nodes.Text("default")], [nodes.Text("why")])
        body = nodes.tbody()
        group += body
        for field in dataclasses.fields(Config):
            comment = " ".join(line.strip() for line in docs.get(("Config", field.name), []))
            fallback = SETTING_REASONS.get(field.name)
            if comment and fallback:
                logger.warning(
                    "Config.%s has a #: comment now: delete its entry from SETTING_REASONS "
                    "in docs/_ext/asyncapp_docs.py",
                    field.name,
                    location=self.get_location(),
                )
            reason = comment or fallback
            if not reason:
                logger.warning(
                    "Config.%s has no #: comment giving the reason for its default",
                    field.name,
                    location=self.get_location(),
                )
                reason = ""
            body += self._row(
                [nodes.literal(field.name, field.name)],
                [nodes.literal(repr(field.default), repr(field.default))],
                _inline(reason),
            )
        return [table]

    @staticmethod
    def _row(*cells: list[nodes.Node]) -> nodes.row:
        row = nodes.row()
        for content in cells:
            entry = nodes.entry()
            paragraph = nodes.paragraph()
            paragraph.extend(content)
            entry += paragraph
            row += entry
        return row


# -- internals: each object documented once ----------------------------------------

_documenting: list[str] = [""]


def _note_module(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if what == "module":
        _documenting[0] = name


def _skip_public_in_internals(
    app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """On the internals page, leave out what the public pages document.

    ``asyncapp.host.loop.Loop`` is ``asyncapp.host.Loop``: documented (and
    linked to) under its public name only, so that no object has two entries.
    """
    module = _documenting[0]
    if what != "module" or module in API_MODULES or not module.startswith("asyncapp."):
        return None
    public = {id(value) for value in public_names().values()}
    return True if id(obj) in public else None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _note_module)
    app.connect("autodoc-skip-member", _skip_public_in_internals)
    app.add_directive("asyncapp-settings", SettingsTable)
    app.connect("env-check-consistency", check_api)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
