"""gevent: the blocking fallback's waits go to gevent's hub.

gevent.pywsgi and ``gunicorn -k gevent`` offer neither extension, so
asyncapp apps take the portable blocking fallback there
(:mod:`asyncapp.app.hosts`). Every request is a gevent greenlet on one OS
thread: a blocking ``poll`` or ``time.sleep`` would freeze every other
request unless the process was monkey-patched. :func:`running_in_hub_greenlet`
asks gevent itself (only when it is imported at all), so the fallback
cooperates with or without patching, with no setting and no import order.

Neither server notices a client that leaves while its app waits: the
request's greenlet sleeps on. So these waits also watch the request's
connection, where the server lets it be found (:func:`client_fd`), and a
client that closed it ends the wait with :class:`ClientLeft`. The drivers do
not throw that into the app: they close the app (``GeneratorExit`` at its
wait, as on asyncapp's own hosts) and pass it on to the server, which ends a
reset connection quietly.
"""

from __future__ import annotations

import _socket
import errno
import sys
import time
from typing import Any

from asyncapp.errors import ClientGone

__all__ = ["ClientLeft", "client_fd", "running_in_hub_greenlet", "sleep", "wait_fd"]

Environ = dict[str, Any]


class ClientLeft(ClientGone):
    """A wait on the hub saw the request's client close its connection.

    A connection reset (``ECONNRESET``) to the server, which gevent.pywsgi
    and gunicorn's workers end without logging an error.
    """

    def __init__(self) -> None:
        super().__init__(errno.ECONNRESET, "the client closed the connection during a wait")


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


def client_fd(environ: Environ | None) -> int | None:
    """The request's connection, where the gevent server lets it be found.

    ``gunicorn -k gevent`` puts the socket in the environ; gevent.pywsgi's
    ``wsgi.input`` reads it through ``rfile``. Behind middleware that
    replaced the input there is none to find, and waits watch only their fd.
    """
    if environ is None:
        return None
    sock = environ.get("gunicorn.socket")
    if sock is None:
        sock = getattr(environ.get("wsgi.input"), "rfile", None)
    fileno = getattr(sock, "fileno", None)
    try:
        fd = fileno() if fileno is not None else None
    except Exception:  # a closed file: nothing to watch
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _client_left(client: int) -> bool | None:
    """What the readable connection says: True, the client closed it (EOF
    or reset); False, it sent bytes (a pipelined request, body the app has
    not read), so there is no telling until they are read; None, nothing
    after all. It peeks, so the server still reads every byte itself."""
    try:
        # The C socket type, not gevent's (which would wait on the hub
        # instead of raising BlockingIOError), detached so the fd stays open.
        sock = _socket.socket(fileno=client)
    except OSError:
        return False  # not a socket: nothing to learn from it
    try:
        data = sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return True
    finally:
        sock.detach()
    return not data


def _wait(fd: int | None, write: bool, timeout: float | None, client: int) -> bool:
    """Wait for ``fd`` (or, without one, for ``timeout``) while watching the
    client's connection; True if ``fd`` is ready, False on timeout."""
    from gevent.select import POLLIN, POLLOUT, poll

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        poller = poll()
        if fd is not None:
            poller.register(fd, POLLOUT if write else POLLIN)
        poller.register(client, POLLIN)
        # gevent's poll takes milliseconds, and 0 as "do not wait at all".
        events = poller.poll(None if left is None else max(left * 1000, 0.001))
        if any(ready == fd for ready, _ in events):
            return True  # an error or hang-up counts, as in hosts.poll
        if not events:
            continue  # the deadline, checked above
        left_now = _client_left(client)
        if left_now:
            raise ClientLeft()
        if left_now is False:
            # Bytes from the client: watching it would spin. The rest of the
            # wait watches the fd (or the clock) alone.
            rest = None if deadline is None else max(0.0, deadline - time.monotonic())
            if fd is None:
                _sleep(rest or 0.0)
                return False
            return _wait_alone(fd, write, rest)


def _wait_alone(fd: int, write: bool, timeout: float | None) -> bool:
    from gevent.socket import wait_read, wait_write

    waiter = wait_write if write else wait_read
    try:
        waiter(fd, timeout=timeout, timeout_exc=_Timeout)
    except _Timeout:
        return False
    return True


def _sleep(seconds: float) -> None:
    import gevent

    gevent.sleep(seconds)


def wait_fd(fd: int, write: bool, timeout: float | None, environ: Environ | None = None) -> bool:
    """Wait on the hub until ``fd`` is ready (True) or ``timeout`` passes.

    With the request's ``environ``, raise :class:`ClientLeft` if its client
    closes the connection meanwhile.
    """
    client = client_fd(environ)
    if client is None or client == fd or timeout == 0:
        return _wait_alone(fd, write, timeout)
    return _wait(fd, write, timeout, client)


def sleep(seconds: float, environ: Environ | None = None) -> None:
    """Sleep on the hub: other greenlets run meanwhile.

    With the request's ``environ``, raise :class:`ClientLeft` if its client
    closes the connection meanwhile.
    """
    client = client_fd(environ)
    if client is None:
        _sleep(seconds)
    else:
        _wait(None, False, seconds, client)
