"""The bounded pool of threads that runs plain WSGI apps beside the loop.

Why not :class:`concurrent.futures.ThreadPoolExecutor`: a request needs no
``Future`` (the task reports back to the loop itself), and submitting one
here is a queue ``put`` and, while threads are idle, nothing else. Threads
start on demand up to ``size`` and then stay, so an idle server holds none
and a busy one does not pay for thread creation on every burst.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["ThreadPool"]

log = logging.getLogger("asyncapp.server")


class ThreadPool:
    """At most ``size`` daemon threads running submitted jobs, in order.

    .. code-block:: python

        pool = ThreadPool(8)
        pool.submit(lambda: print("on a worker thread"))
        pool.shutdown()
    """

    def __init__(self, size: int, name: str = "asyncapp-app") -> None:
        if size < 1:
            raise ValueError(f"a thread pool needs at least one thread, not {size}")
        self.size = size
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: Threads waiting for a job, and jobs waiting for a thread.
        self._idle = 0
        self._queued = 0
        self._closed = False

    @property
    def threads(self) -> int:
        """Threads started so far."""
        return len(self._threads)

    @property
    def busy(self) -> int:
        """Threads running a job now (not waiting for one)."""
        with self._lock:
            return len(self._threads) - self._idle

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job()`` on a pool thread; it waits in line while all are busy."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread pool is shut down")
            self._queued += 1
            # Counted with the jobs not yet taken, so that two submits in a
            # row do not both count on the same idle thread.
            if self._queued > self._idle and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._jobs.put(job)

    def _work(self) -> None:
        jobs = self._jobs
        lock = self._lock
        while True:
            with lock:
                self._idle += 1
            job = jobs.get()
            with lock:
                self._idle -= 1
                if job is not None:
                    self._queued -= 1
            if job is None:
                return
            try:
                job()
            except BaseException:  # a job must report its own errors; never lose the thread
                log.exception("unexpected error in a pool thread")

    def shutdown(self, wait: float = 0.0) -> None:
        """Let each thread end after its job; wait up to ``wait`` seconds for them.

        The threads are daemons: one still stuck in an app (a view that never
        returns) does not keep the process alive.
        """
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        if wait > 0:
            for thread in threads:
                thread.join(wait)
