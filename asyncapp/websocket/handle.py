"""What every host's WebSocket handle shares (``docs/protocol.md`` 3.8).

A host's handle (the bundled server's
:class:`~asyncapp.server.websocket.ServerWebSocket`, the ASGI bridge's
:class:`~asyncapp.engines.asgi.AsgiWebSocket`) differs in where messages
come from and go to; what the app sees of waiting does not: one pending
wait on the handle at a time, decided by the handle itself (there is no fd
to watch), and an end of the WebSocket told to the app exactly once,
through that wait if it is there, else by closing an app that waits on
something else. :class:`HandleBase` is that part, written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from asyncapp.websocket.session import Inbox

if TYPE_CHECKING:
    from asyncapp.host.task import AppTask

__all__ = ["HandleBase", "HandleWait"]


class HandleWait:
    """The app's one pending wait on a handle (``readable``/``writable``)."""

    __slots__ = ("callback", "handle", "write")

    def __init__(
        self, handle: HandleBase, callback: Callable[[OSError | None], None], write: bool
    ) -> None:
        self.handle = handle
        self.callback = callback
        self.write = write

    def cancel(self) -> None:
        if self.handle._waiter is self:
            self.handle._waiter = None


class HandleBase:
    """The app's waits on a WebSocket handle, and how its end reaches the app.

    Subclasses say when a wait is decided (:meth:`ready_now`) and which
    task runs the app (:meth:`running_task`), and call :meth:`wake` when
    that may have changed and :meth:`waiter_or_close` once the WebSocket
    is closed.
    """

    __slots__ = ("_app_knows", "_ended", "_waiter", "inbox", "subprotocol")

    def __init__(self, inbox: Inbox, subprotocol: str | None) -> None:
        #: The incoming messages and the close code (the server's is its
        #: whole :class:`~asyncapp.websocket.session.Session`).
        self.inbox = inbox
        self.subprotocol = subprotocol
        self._waiter: HandleWait | None = None
        #: The app saw the end (receive gave None, send raised) or began it
        #: (close): its iterable is not closed under it when the end comes.
        self._app_knows = False
        #: The end was told to the app (or the app had ended).
        self._ended = False

    @property
    def close_code(self) -> int | None:
        """The peer's close code; this side's if it failed the WebSocket; 1006 if none came."""
        return self.inbox.close_code

    @property
    def close_reason(self) -> str:
        """The reason that came with :attr:`close_code`."""
        return self.inbox.close_reason

    def ready_now(self, write: bool) -> bool:
        """Whether a wait on the handle is decided at once."""
        raise NotImplementedError

    def running_task(self) -> AppTask | None:
        """The task running the app, None once it has ended."""
        raise NotImplementedError

    def wait_ready(self, callback: Callable[[OSError | None], None], write: bool) -> HandleWait:
        """Call ``callback(None)`` once :meth:`ready_now` holds (the app waits on one thing)."""
        waiter = self._waiter = HandleWait(self, callback, write)
        return waiter

    def wake(self) -> None:
        """Decide the app's wait if it is ready now."""
        waiter = self._waiter
        if waiter is not None and self.ready_now(waiter.write):
            self._waiter = None
            waiter.callback(None)

    def waiter_or_close(self) -> None:
        """The WebSocket is closed: wake the app's wait, or end an app waiting elsewhere."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.callback(None)  # receive() gives None; send() raises
            self._ended = True
            return
        if self._ended:
            return
        self._ended = True
        task = self.running_task()
        if task is not None and not self._app_knows and task.pending_wait():
            # Suspended on something else (a channel, a sleep): it would not
            # hear of the end until that wait is over (3.8). Closed from the
            # loop, never from inside the call that found the end.
            task.loop.call_soon(task.close)
