"""The host loop's timer: a callback due at a monotonic time.

Apart from :mod:`asyncapp.host.loop` because it subclasses ``list`` (so the
heap compares timers in C), which the optional compiled build (mypyc, see
``setup.py``) cannot do for a native class: this module stays interpreted.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Timer"]


class Timer(list):  # type: ignore[type-arg]
    """A callback due at a monotonic time; cancelled lazily in the heap.

    A list ``[when, seq, callback]`` so that the heap compares timers in C:
    a broadcast that cancels 10,000 waits' timers pops them all, and a
    Python ``__lt__`` made that 120,000 calls. ``seq`` breaks ties (equal
    deadlines run in scheduling order), so callbacks are never compared.
    """

    __slots__ = ()

    # Made as ``Timer((when, seq, callback))`` with list's own constructor:
    # a Python __init__ would cost a frame on every wait with a timeout.

    @property
    def when(self) -> float:
        """The :func:`time.monotonic` time the timer is due."""
        return self[0]  # type: ignore[no-any-return]

    @property
    def callback(self) -> Callable[[], None]:
        """What runs when it is due (a no-op once cancelled)."""
        return self[2] or noop

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self[2] is None

    def cancel(self) -> None:
        """Withdraw the timer; its callback is dropped at once."""
        # It stays in the heap until it comes up: keep nothing alive meanwhile.
        self[2] = None

    def __repr__(self) -> str:
        state = " cancelled" if self[2] is None else ""
        return f"<Timer at {self[0]:.3f}{state}>"


def noop() -> None:
    """A callback that does nothing: a cancelled timer's, and the loop's wake-up call."""
