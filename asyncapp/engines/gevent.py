"""gevent: the blocking fallback's waits go to gevent's hub.

gevent.pywsgi and ``gunicorn -k gevent`` offer neither extension, so
asyncapp apps take the portable blocking fallback there
(:mod:`asyncapp.app.hosts`). Every request is a gevent greenlet on one OS
thread: a blocking ``poll`` or ``time.sleep`` would freeze every other
request unless the process was monkey-patched. :func:`running_in_hub_greenlet`
asks gevent itself (only when it is imported at all), so the fallback
cooperates with or without patching, with no setting and no import order.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["running_in_hub_greenlet", "sleep", "wait_fd"]


def _gevent() -> Any:
    """gevent, if the caller runs in one of its greenlets; else None."""
    gevent = sys.modules.get("gevent")
    if gevent is None:
        return None
    try:
        kinds = (gevent.Greenlet, gevent.hub.Hub)
        current = gevent.getcurrent()
    except Exception:  # a gevent too old or half-imported: behave as without it
        return None
    # A @green.app greenlet is a plain greenlet whose parent is gevent's
    # request greenlet: gevent can suspend it all the same.
    while current is not None:
        if isinstance(current, kinds):
            return None if isinstance(current, gevent.hub.Hub) else gevent
        current = current.parent
    return None


def running_in_hub_greenlet() -> bool:
    """Whether the caller can wait on gevent's hub (a gevent greenlet, or a
    greenlet started from one), so blocking would freeze other requests."""
    return _gevent() is not None


class _Timeout(Exception):
    pass


def wait_fd(fd: int, write: bool, timeout: float | None) -> bool:
    """Wait on the hub until ``fd`` is ready (True) or ``timeout`` passes."""
    from gevent.socket import wait_read, wait_write

    waiter = wait_write if write else wait_read
    try:
        waiter(fd, timeout=timeout, timeout_exc=_Timeout)
    except _Timeout:
        return False
    return True


def sleep(seconds: float) -> None:
    """Sleep on the hub: other greenlets run meanwhile."""
    import gevent

    gevent.sleep(seconds)
