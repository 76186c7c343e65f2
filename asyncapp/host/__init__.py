"""The host side: one implementation of both extensions, reused by every host.

* :mod:`~asyncapp.host.task`: :class:`AppTask`, which runs one app iterable
  and serves ``x-wsgiorg.async`` and ``x-wsgiorg.fdevent`` for it.
* :mod:`~asyncapp.host.loop`: the ``selectors`` loop it runs on, and
  :class:`HostLoop`, what another loop (asyncio) must offer instead.
* :mod:`~asyncapp.host.threadpool`: the bounded pool that runs plain apps
  beside the loop; :mod:`~asyncapp.host.body`: the PEP 3333 ``wsgi.input``
  over the non-blocking reader; :mod:`~asyncapp.host.filewrapper`:
  ``wsgi.file_wrapper``.

The bundled server (:mod:`asyncapp.server`), :mod:`asyncapp.testing` and
the ASGI bridge (:mod:`asyncapp.engines.asgi`) are its users.
"""

from asyncapp.host.loop import FD_SWEEP_INTERVAL, HostLoop, Loop, Timer, Watch
from asyncapp.host.task import AppTask, close_app

__all__ = ["FD_SWEEP_INTERVAL", "AppTask", "HostLoop", "Loop", "Timer", "Watch", "close_app"]
