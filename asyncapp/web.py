"""werkzeug integration: request objects and streaming responses.

Thin on purpose: werkzeug does the parsing and the response machinery; this
module only says how its objects behave on asyncapp's hosts.

* :func:`request` builds a :class:`werkzeug.wrappers.Request`. Under
  ``@green.app`` on an ``x-wsgiorg.async`` host (asyncapp's server), the
  body reads werkzeug makes (``get_data()``, ``form``, ``files``,
  ``stream``) suspend the app's greenlet instead of blocking the server. In
  a ``@coroutine`` app, read the body with :func:`asyncapp.read` first and
  pass it as ``body=``.
* :func:`streaming_response` builds a :class:`werkzeug.wrappers.Response`
  whose body is a generator that waits (greenlet style), for Flask views and
  werkzeug apps wrapped with ``@green.app``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

from werkzeug.datastructures import Headers
from werkzeug.wrappers import Request, Response

__all__ = ["request", "streaming_response"]

Environ = dict[str, Any]


def request(
    environ: Environ,
    *,
    body: bytes | None = None,
    max_content_length: int | None = None,
    max_form_memory_size: int | None = None,
) -> Request:
    """A werkzeug ``Request`` for ``environ``.

    werkzeug parses lazily: the query string (``args``), headers and cookies
    cost nothing until used, and the body is read on the first access to
    ``get_data()``, ``form``, ``files``, ``json`` or ``stream``, through
    ``wsgi.input`` bounded by the Content-Length. ``max_content_length``
    makes a larger body a 413 (werkzeug raises ``RequestEntityTooLarge``),
    and ``max_form_memory_size`` does the same for a multipart field held in
    memory.

    Which reads wait without blocking:

    * greenlet style (``@green.app``): on asyncapp's hosts ``wsgi.input`` is
      a :class:`~asyncapp.green.GreenInput`, so all of the above suspend the
      greenlet until the body arrives. Elsewhere they block, as in any WSGI
      app.
    * generator and ``async def`` styles: a body read through werkzeug would
      block the server's loop. Read the body with :func:`asyncapp.read`
      first and pass it as ``body``; werkzeug then parses those bytes (the
      request gets a shallow copy of ``environ`` whose ``wsgi.input`` holds
      them).

    .. code-block:: python

        @green.app
        def app(environ, start_response):
            req = web.request(environ, max_content_length=1 << 20)
            name = req.form.get("name", "")          # waits for the body
            ...

        @asyncapp.coroutine
        async def app(environ, start_response):
            body = b""
            while chunk := await asyncapp.read(environ, 65536, timeout=10):
                body += chunk
            form = web.request(environ, body=body).form
            ...
    """
    if body is not None:
        environ = dict(environ)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = True
    req = Request(environ)
    if max_content_length is not None:
        req.max_content_length = max_content_length
    if max_form_memory_size is not None:
        req.max_form_memory_size = max_form_memory_size
    return req


def streaming_response(
    body: Iterable[bytes] | Iterable[str],
    *,
    mimetype: str = "text/plain",
    status: int | str = 200,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
) -> Response:
    """A werkzeug ``Response`` that streams ``body`` as it is produced.

    werkzeug iterates a generator body lazily, passing each chunk on to the
    server as it is yielded (``str`` is encoded as UTF-8), and closes the
    generator when the server closes the response (for instance when the
    client went away). Under ``@green.app`` that iteration runs in the app's
    greenlet, so the generator may wait with ``green.sleep``, ``green.run``
    and friends between chunks without blocking the server.

    For ``mimetype="text/event-stream"`` the response also gets
    ``Cache-Control: no-cache``, as :data:`asyncapp.sse.SSE_HEADERS`.

    The generator runs after the view has returned, so in Flask it cannot
    use ``flask.request``: take what it needs (``request.environ``) before.

    .. code-block:: python

        @flask_app.get("/ticks")
        def ticks():
            environ = request.environ

            def generate():
                for n in range(5):
                    yield sse.event(str(n))
                    green.sleep(environ, 1)

            return web.streaming_response(generate(), mimetype="text/event-stream")
    """
    response_headers = Headers(headers)
    if mimetype == "text/event-stream":
        response_headers.setdefault("Cache-Control", "no-cache")
    return Response(body, status=status, headers=response_headers, mimetype=mimetype)
