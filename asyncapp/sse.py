"""Server-sent events: framing helpers and an SSE response in each app style.

An SSE response is an ordinary streaming body of ``text/event-stream``: the
app yields one :func:`event` per message and waits between them, which is
exactly what asyncapp apps do well.

.. code-block:: python

    from asyncapp import sse

    @asyncapp.coroutine
    async def app(environ, start_response):
        sse.start(start_response)
        for n in range(10):
            yield sse.event(f"tick {n}", event="tick", id=n)
            await asyncapp.sleep(environ, 1)

The browser side is ``new EventSource(url)``. Framing follows the HTML
standard's "Server-sent events" section: fields are ``name: value`` lines,
an event ends with a blank line, and the data is split into one ``data:``
line per line of text, which the browser joins back with ``\\n``.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Final, cast

from asyncapp.app.driver import Driver
from asyncapp.errors import UsageError

__all__ = ["SSE_HEADERS", "comment", "event", "start", "stream"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: The response headers of an event stream. ``no-cache`` keeps caches and
#: proxies from storing (and replaying) a live stream. A tuple: pass
#: ``list(SSE_HEADERS)`` to ``start_response``, which wants a list.
SSE_HEADERS: Final[tuple[tuple[str, str], ...]] = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
)

#: Line ends as the event-stream parser knows them: CRLF, LF or CR alone
#: (and nothing else: not str.splitlines()'s VT, FF, NEL, U+2028...).
_LINE_END: Final = re.compile(r"\r\n|\r|\n")


def _field(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"an SSE {name} cannot contain CR or LF: {value!r}")
    return f"{name}: {value}\n"


def event(
    data: str,
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
) -> bytes:
    """One complete event, UTF-8 encoded, ending with its blank line.

    ``data`` may hold several lines (split on CRLF, LF or CR, each sent as
    its own ``data:`` line); the browser's ``MessageEvent.data`` is then the
    lines joined with ``\\n``. ``event`` names the event type (the browser
    dispatches it to ``addEventListener(event, ...)``, else to
    ``onmessage``); ``id`` becomes the ``Last-Event-ID`` a reconnecting
    browser sends; ``retry`` is the reconnection delay in milliseconds.

    Raises :class:`ValueError` for CR or LF in ``event`` or ``id`` (they
    would end the field early and let the rest pose as other fields), for
    NUL in ``id`` (browsers ignore such an id) and for a negative
    ``retry``.

    .. code-block:: python

        >>> sse.event("one\\ntwo", event="note", id=7)
        b'event: note\\nid: 7\\ndata: one\\ndata: two\\n\\n'
    """
    if not isinstance(data, str):
        raise TypeError(f"SSE data must be str, not {type(data).__name__}")
    parts = []
    if event is not None:
        parts.append(_field("event", event))
    if id is not None:
        text = str(id)
        if "\0" in text:
            raise ValueError(f"an SSE id cannot contain NUL: {text!r}")
        parts.append(_field("id", text))
    if retry is not None:
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise ValueError(f"SSE retry must be an int >= 0 (milliseconds), not {retry!r}")
        parts.append(f"retry: {retry}\n")
    parts.extend(f"data: {line}\n" for line in _LINE_END.split(data))
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def comment(text: str = "") -> bytes:
    """A comment block: browsers ignore it, so it keeps an idle stream alive.

    Send one every 15-30 seconds when there is nothing else to send, so that
    proxies and load balancers do not close the connection as idle. Several
    lines become several comment lines.

    .. code-block:: python

        >>> sse.comment("keep-alive")
        b': keep-alive\\n\\n'
    """
    lines = "".join(f": {line}\n" if line else ":\n" for line in _LINE_END.split(text))
    return (lines + "\n").encode("utf-8")


def start(
    start_response: StartResponse,
    status: str = "200 OK",
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """Call ``start_response`` with :data:`SSE_HEADERS` plus ``headers``.

    For apps that check their input first and answer errors normally, then
    stream. Works the same in every style.

    .. code-block:: python

        @asyncapp.coroutine
        def app(environ, start_response):
            sse.start(start_response)
            while True:
                yield sse.event("ping")
                yield from asyncapp.sleep(environ, 5)
    """
    start_response(status, [*SSE_HEADERS, *headers])


#: What :func:`stream` decorates: a generator function or an async generator
#: function (annotated as returning an iterator or a generator alike).
EventSource = Callable[[Environ], Iterator[Any] | AsyncIterator[Any]]


def stream(func: EventSource) -> WSGIApp:
    """Decorator: a generator of events, given the environ, becomes an SSE app.

    ``func(environ)`` is a generator that uses ``yield from`` for waits or an
    ``async def`` generator that uses ``await``; it yields :func:`event` and
    :func:`comment` bytes. The app answers ``200 OK`` with
    :data:`SSE_HEADERS`, then streams what the generator yields, until it
    ends or the client goes away (the generator is then closed).

    .. code-block:: python

        @sse.stream
        async def ticks(environ):
            for n in range(5):
                yield sse.event(str(n))
                await asyncapp.sleep(environ, 1)

    Greenlet style: write a plain generator that calls ``green.sleep`` and
    friends, and wrap the result once more: ``app = green.app(sse.stream(gen))``.
    To check the request and answer errors before streaming, use
    :func:`start` in an ordinary app instead.
    """
    if not (inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func)):
        raise UsageError(
            f"@sse.stream needs a generator function or an async generator function "
            f"taking the environ; {getattr(func, '__qualname__', func)!r} is neither"
        )

    @functools.wraps(func)
    def app(environ: Environ, start_response: StartResponse) -> Driver:
        # Headers first, then the generator's own driver: no generator
        # wrapped in another, so closing reaches the app's frame directly.
        start(start_response)
        return Driver(cast(Any, func(environ)))

    return app
