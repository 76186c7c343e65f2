"""The bundled server: HTTP/1.1 on one ``selectors`` loop, plain apps on a pool.

Start it with :func:`serve` (or ``python -m asyncapp``)::

    import asyncapp.server
    asyncapp.server.serve(app, host="127.0.0.1", port=8000)

* :mod:`~asyncapp.server.run`: :class:`Server` (listening sockets, signals,
  graceful stop) and :func:`serve`.
* :mod:`~asyncapp.server.connection`: one client connection (keep-alive,
  pipelining, deadlines, output backpressure).
* :mod:`~asyncapp.server.exchange`: one request and its response.
* :mod:`~asyncapp.server.http11`: sans-IO HTTP/1.1 parsing and framing.
* :mod:`~asyncapp.server.config`: :class:`Config`, every limit with its
  reason; :mod:`~asyncapp.server.proxy`: trusted proxy headers;
  :mod:`~asyncapp.server.reload`: ``--reload``.
"""

from asyncapp.server.config import Config
from asyncapp.server.connection import Connection
from asyncapp.server.exchange import Exchange
from asyncapp.server.run import Server, serve

__all__ = ["Config", "Connection", "Exchange", "Server", "serve"]
