"""The engines: asyncapp apps non-blocking on servers people already deploy.

* :mod:`~asyncapp.engines.gunicorn`: a gunicorn worker class running the
  bundled server's loop in each worker (public name
  ``asyncapp.gunicorn.Worker``).
* :mod:`~asyncapp.engines.asgi`: ``to_asgi``, any WSGI app as an ASGI 3 app,
  the extension host running on the ASGI server's asyncio loop (public name
  ``asyncapp.asgi.to_asgi``).
* :mod:`~asyncapp.engines.gevent`: on gevent's servers, where no extension
  is offered, the blocking fallback's waits go to gevent's hub instead of
  freezing the process, with or without monkey-patching.
"""
