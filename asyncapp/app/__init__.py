"""The app side: what an app calls, and how each call reaches its host.

* :mod:`~asyncapp.app.ops`: the operations (``read``, ``readable``,
  ``writable``, ``sleep``), each an awaitable, ``yield from``-able object.
* :mod:`~asyncapp.app.coroutine`: the drivers that run ``yield from`` and
  ``async def`` apps (``@asyncapp.coroutine``); the greenlet driver is the
  public :mod:`asyncapp.green`.
* :mod:`~asyncapp.app.hosts`: per operation, which host the request runs on
  (``x-wsgiorg.async``, ``x-wsgiorg.fdevent``, or neither) and how to wait
  there, including the portable blocking fallback.
* :mod:`~asyncapp.app.channel`: the long-polling toolkit (``Channel``,
  ``Event``), built on the operations only.

Nothing here opens a socket or runs a loop: the host side does.
"""
