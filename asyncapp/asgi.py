"""Any WSGI app as an ASGI 3 app: ``asyncapp.asgi.to_asgi(app)``.

The public name of :mod:`asyncapp.engines.asgi`, where the bridge lives::

    from asyncapp.asgi import to_asgi
    application = to_asgi(app)   # uvicorn module:application
"""

from asyncapp.engines.asgi import AsyncioLoop, to_asgi

__all__ = ["AsyncioLoop", "to_asgi"]
