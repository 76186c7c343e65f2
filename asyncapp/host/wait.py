"""One pending wait of an app: the handle it holds, and the watch's callback.

Apart from :mod:`asyncapp.host.task` so that it stays interpreted in the
optional compiled build (:mod:`asyncapp.compiled`): it extends the
protocol's :class:`~asyncapp.protocol.WaitHandle`, and mypyc can neither
compile a class that extends an interpreted one with ``__slots__`` nor lay
out a compiled ``__call__`` subclass of a compiled base that has none (the
base's methods would read the wrong fields).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncapp.protocol import WaitHandle, WaitStatus

if TYPE_CHECKING:
    from asyncapp.host.loop import Cancellable, Watch
    from asyncapp.host.task import AppTask

__all__ = ["ArmedWait"]


class ArmedWait(WaitHandle):
    """One pending wait of the app: the handle it holds, with the watch and
    timer deciding it.

    The handle is also the watch's callback (``armed(error)``) and cancels
    through its task: one object per wait where a handle, a record, a
    partial and two bound methods were five, which a broadcast that re-arms
    10,000 waits paid in young collections of the garbage collector.
    """

    __slots__ = ("task", "timer", "watch")

    def __init__(self, task: AppTask) -> None:
        # WaitHandle's fields set here: no second __init__ call per wait.
        self.status: WaitStatus = "pending"
        self.error: OSError | None = None
        self._canceller = None
        #: Until decided: a pending handle the app holds keeps its task, and
        #: a decided one must not (settle drops it).
        self.task: AppTask | None = task
        #: The fd watch, or the reader's or WebSocket's own wait (see _arm).
        self.watch: Watch | Cancellable | None = None
        self.timer: Cancellable | None = None

    def settle(self, status: WaitStatus, error: OSError | None = None) -> None:
        self.status = status
        self.error = error
        self.task = None

    def cancel(self) -> None:
        """Withdraw the wait; a no-op once the host decided."""
        if self.status == "pending":
            self.status = "cancelled"
            task, self.task = self.task, None
            if task is not None:
                task._cancel(self)

    def __call__(self, error: OSError | None) -> None:
        """The watch fired: the fd is ready (or failed)."""
        self.watch = None
        task = self.task
        if task is not None:
            task._decide(self, "error" if error else "ready", error)

    def on_timeout(self) -> None:
        self.timer = None
        task = self.task
        if task is not None:
            task._decide(self, "timeout", None)
