"""asyncapp's bench apps as ASGI apps through :func:`asyncapp.asgi.to_asgi` (issue 10).

``uvicorn bench.engine_apps:asgi_hello_gen`` and the like. The WSGI apps are
the ones the bundled server runs (``bench/asyncapp_apps.py``), unmodified:
``hello_plain`` is a plain PEP 3333 app, so the bridge calls it on its pool
of 40 threads (as a2wsgi calls every app on its pool); the ``@asyncapp.coroutine``
apps run on uvicorn's own loop, and a held long poll is a readiness callback
of that loop, not a thread. Runs in the project's virtualenv.
"""

from __future__ import annotations

from asyncapp.asgi import to_asgi
from bench import asyncapp_apps as apps

asgi_hello_plain = to_asgi(apps.hello_plain)
asgi_hello_gen = to_asgi(apps.hello_gen)
asgi_hello_async = to_asgi(apps.hello_async)
asgi_longpoll_gen = to_asgi(apps.longpoll_gen)
asgi_longpoll_async = to_asgi(apps.longpoll_async)
# The websocket scenario (issue 12): the bundled server's WebSocket apps on uvicorn.
asgi_ws_gen = to_asgi(apps.ws_gen)
asgi_ws_async = to_asgi(apps.ws_async)
