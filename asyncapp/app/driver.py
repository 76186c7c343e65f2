"""The driver of ``@asyncapp.coroutine`` apps: generators and ``async def``.

Theory of operation: the decorated function (:mod:`asyncapp.app.coroutine`)
becomes an ordinary WSGI app whose iterable is a :class:`Driver`. Each
``next()`` from the server advances the app until it yields a body chunk
(passed on) or an operation from :mod:`asyncapp.app.ops`. An operation is
carried out by its ``perform()`` generator; every ``b""`` that generator
yields goes to the server as an empty body string, which is how an app
suspends under PEP 3333. When ``perform()`` returns, its value is sent
into the app (or its exception thrown in).

On a blocking host ``perform()`` returns without yielding, so the app runs
straight through and the server only ever sees body chunks.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from typing import Any, TypeAlias

from asyncapp.app.ops import Op
from asyncapp.compiled import mypyc_attr
from asyncapp.engines.gevent import ClientLeft
from asyncapp.errors import HandshakeError, UsageError
from asyncapp.websocket import Accept
from asyncapp.websocket.takeover import SocketWebSocket

__all__ = ["Driver", "StepDriver", "pin_thread", "thread_pinned", "unpin_thread"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
AppGenerator: TypeAlias = Generator[Any, Any, None]
AppAsyncGenerator: TypeAlias = AsyncGenerator[Any, Any]
WSGIApp = Callable[[Environ, StartResponse], Iterator[bytes]]


log = logging.getLogger("asyncapp.websocket")

#: Per thread: has the request running on it started something that cannot
#: move to another thread (a greenlet)? See :func:`pin_thread`.
_pins = threading.local()


def pin_thread() -> None:
    """Say that the current request's stack now belongs to this thread.

    A host that runs a plain app on a worker thread moves its iteration to
    the event loop's thread once the app turns out to use the extensions;
    a greenlet cannot move, so :mod:`asyncapp.green` calls this when it
    starts one and the host then keeps the request where it is.
    """
    _pins.pinned = True


def unpin_thread() -> None:
    """Forget :func:`pin_thread` (a host calls this before each request)."""
    _pins.pinned = False


def thread_pinned() -> bool:
    """Whether :func:`pin_thread` was called since :func:`unpin_thread`."""
    return getattr(_pins, "pinned", False)


def _bad_yield(name: str, value: object) -> UsageError:
    return UsageError(
        f"{name} yielded {type(value).__name__} {value!r:.60}; an asyncapp app "
        "yields bytes for the body, and waits with 'yield from asyncapp.read(...)' "
        "(generator) or 'await asyncapp.read(...)' (async def); other event "
        "loops' awaitables (asyncio, trio) cannot run on a WSGI host"
    )


class _Over(BaseException):
    """The end of a taken-over WebSocket is done: what the iterable raises now.

    A BaseException, so that the step that raises it is not mistaken for an
    operation that failed (whose error would be thrown into the app).
    """

    def __init__(self, result: BaseException) -> None:
        super().__init__(result)
        self.result = result


def _over() -> Generator[bytes, None, Any]:
    """The step of an iterable whose app has ended: the next ``next()`` ends it.

    Resuming the app instead would raise: a finished coroutine cannot be
    sent to again.
    """
    raise _Over(StopIteration())
    yield b""  # unreachable: it makes this a generator


def _finishing(handle: SocketWebSocket, error: BaseException | None) -> Generator[bytes, None, Any]:
    """The steps after an app that took its connection over ended, then :class:`_Over`."""
    try:
        yield from handle.finish(error)
    except Exception:
        log.exception("closing a WebSocket after its app ended failed")
    raise _Over(handle.end_error() or StopIteration())


# Subclassed by GreenDriver (asyncapp.green), which stays interpreted, and Driver.
@mypyc_attr(allow_interpreted_subclasses=True)
class StepDriver:
    """What both drivers share: carrying out operations between app steps.

    Subclasses define ``_advance(send, exc)``, which resumes the app with a
    value (or an exception) and returns what it produced next: ``bytes`` or
    an :class:`~asyncapp.app.ops.Op`; ``StopIteration`` ends the body.

    An app that took its connection over as a WebSocket
    (:mod:`asyncapp.websocket.takeover`) is ended here too: when it returns
    or raises, the driver closes the WebSocket (1000, or 1011 and a logged
    error), waits out the closing handshake, and then ends the iterable as
    that host needs (on a blocking server, with a ``ConnectionResetError``,
    so that it writes no response).
    """

    __slots__ = ("_start_response", "_step", "_takeover")

    def __init__(self, start_response: StartResponse | None = None) -> None:
        self._step: Generator[bytes, None, Any] | None = None
        #: For a refused WebSocket handshake the app did not catch.
        self._start_response = start_response
        #: The WebSocket the app took its connection over for, until it ends.
        self._takeover: SocketWebSocket | None = None

    @property
    def _name(self) -> str:
        """The app's name, for error messages (computed only when one is raised)."""
        raise NotImplementedError

    def __iter__(self) -> StepDriver:
        return self

    def __next__(self) -> bytes:
        send: Any = None
        exc: BaseException | None = None
        step = self._step
        if step is not None:
            try:
                return step.send(None)
            except StopIteration as stop:
                send = stop.value
            except Exception as error:
                exc = error
            except _Over as over:
                self._step = None
                raise over.result from None
            self._step = None
        try:
            out = self._advance(send, exc)
            if out.__class__ is bytes:
                return out
            return self._carry_out(out)
        except HandshakeError as refusal:
            if self._takeover is not None:
                return self._end_takeover(refusal)
            return self._refuse(refusal)
        except BaseException as end:
            if self._takeover is None:
                raise
            return self._end_takeover(end)

    def _end_takeover(self, end: BaseException) -> bytes:
        """The app that took its connection over ended (``StopIteration``) or raised."""
        handle, self._takeover = self._takeover, None
        assert handle is not None
        self._step = None
        if not isinstance(end, Exception):  # KeyboardInterrupt, a greenlet's exit...
            handle.release()
            raise end
        error = None if isinstance(end, StopIteration) else end
        if error is not None:
            # The server never sees it (it must write no response): logged here.
            log.error(
                "%s raised after it accepted a WebSocket (closed with 1011)",
                self._name,
                exc_info=error,
            )
        self._step = _finishing(handle, error)
        return StepDriver.__next__(self)

    def _refuse(self, refusal: HandshakeError) -> bytes:
        """The app let a refused WebSocket handshake through: send its answer.

        The app has ended (the error came out of it), so this one body
        string is all that follows.
        """
        start_response, self._start_response = self._start_response, None
        if start_response is None:
            raise refusal
        self._step = _over()
        # With exc_info: allowed before the head is sent, whatever the app
        # started; after it, the server raises the error again.
        headers = list(refusal.headers)
        try:
            start_response(refusal.status, headers, (type(refusal), refusal, refusal.__traceback__))
        except SystemError:
            # uWSGI 2.0's start_response sets exc_info as the pending error
            # and returns all the same (Python makes that a SystemError);
            # its headers may be set again without exc_info until sent.
            start_response(refusal.status, headers)
        return refusal.body

    def _carry_out(self, out: Any) -> bytes:
        """Return body bytes, or start operations until one suspends (its ``b""``)."""
        while True:
            if out.__class__ is bytes:
                return out
            if not isinstance(out, Op):
                if isinstance(out, bytes):  # a bytes subclass is still body
                    return bytes(out)
                self.close()
                raise _bad_yield(self._name, out)
            try:
                # perform() may raise at once (a bad timeout): into the app too.
                step = out.perform()
                token = step.send(None)
            except StopIteration as stop:
                send, exc = stop.value, None
                if out.__class__ is Accept and isinstance(send._handle, SocketWebSocket):
                    self._takeover = send._handle
            except ClientLeft:
                # A wait on gevent's hub saw the client leave (it never yields,
                # so it ends here): close the app at its wait, as a host's
                # close() would, and tell the server, not the app.
                self.close()
                raise
            except Exception as error:
                send, exc = None, error
            else:
                self._step = step
                return token
            # Resumed outside the except blocks: the app's own exceptions
            # must not be chained to the StopIteration that carried a result.
            out = self._advance(send, exc)

    def _advance(self, send: Any, exc: BaseException | None) -> Any:
        raise NotImplementedError

    def _cancel_step(self) -> None:
        step, self._step = self._step, None
        if step is not None:
            step.close()

    def _release_takeover(self) -> None:
        """Closed before the app ended: let go of a connection it took over."""
        handle, self._takeover = self._takeover, None
        if handle is not None:
            handle.release()

    def close(self) -> None:
        raise NotImplementedError


class Driver(StepDriver):
    """The WSGI iterable that runs one call of a ``@coroutine`` app."""

    __slots__ = ("_agen", "_aw", "_gen")

    def __init__(
        self,
        app: AppGenerator | AppAsyncGenerator,
        is_async: bool | None = None,
        start_response: StartResponse | None = None,
    ) -> None:
        self._step = None
        self._start_response = start_response
        self._takeover = None
        self._aw: Any = None  # the in-flight asend() of an async generator
        if inspect.isasyncgen(app) if is_async is None else is_async:
            self._agen: AppAsyncGenerator | None = app  # type: ignore[assignment]
            self._gen: AppGenerator | None = None
        else:
            self._gen = app  # type: ignore[assignment]
            self._agen = None

    @property
    def _name(self) -> str:
        return getattr(self._gen or self._agen, "__qualname__", "app")

    def __next__(self) -> bytes:
        if self._step is not None:
            return StepDriver.__next__(self)
        # The commonest step: no operation in flight, so the app is resumed
        # straight away (for a generator, one Python frame rather than three).
        gen = self._gen
        try:
            out = gen.send(None) if gen is not None else self._advance(None, None)
            if out.__class__ is bytes:
                return out
            return self._carry_out(out)
        except HandshakeError as refusal:
            if self._takeover is not None:
                return self._end_takeover(refusal)
            return self._refuse(refusal)
        except BaseException as end:
            if self._takeover is None:
                raise
            return self._end_takeover(end)

    def _advance(self, send: Any, exc: BaseException | None) -> Any:
        gen = self._gen
        if gen is not None:
            return gen.send(send) if exc is None else gen.throw(exc)
        assert self._agen is not None
        aw = self._aw
        if aw is None:
            aw = self._aw = self._agen.asend(None)
        try:
            out = aw.send(send) if exc is None else aw.throw(exc)
        except StopIteration as stop:
            self._aw = None
            if not isinstance(stop.value, bytes):
                self.close()
                raise _bad_yield(self._name, stop.value) from None
            return stop.value
        except StopAsyncIteration:
            self._aw = None
            raise StopIteration from None
        except BaseException as error:
            self._aw = None  # finished: close() must not throw into it again
            if isinstance(error, RuntimeError) and str(error) == "no running event loop":
                # asyncio.sleep() and friends ask for their loop before yielding.
                raise UsageError(
                    f"{self._name} awaited asyncio code, which found no running event "
                    "loop; an asyncapp app waits with 'await asyncapp.sleep(...)' or "
                    "'await asyncapp.read(...)': other event loops' awaitables (asyncio, "
                    "trio) cannot run on a WSGI host"
                ) from error
            raise
        if not isinstance(out, Op):
            self.close()
            raise _bad_yield(self._name, out)
        return out

    def close(self) -> None:
        """Cancel the wait in progress, then close the app (PEP 3333 ``close``)."""
        try:
            self._cancel_step()
        finally:
            try:
                if self._gen is not None:
                    self._gen.close()
                elif self._agen is not None:
                    self._close_async()
            finally:
                self._release_takeover()

    def _close_async(self) -> None:
        assert self._agen is not None
        aw, self._aw = self._aw, None
        if aw is not None:
            try:
                aw.throw(GeneratorExit)
            except (GeneratorExit, StopIteration, StopAsyncIteration):
                pass
            else:
                aw.close()
                raise RuntimeError(f"{self._name} awaited while being closed")
        closer = self._agen.aclose()
        try:
            closer.send(None)
        except StopIteration:
            return
        closer.close()
        raise RuntimeError(f"{self._name} awaited while being closed")
