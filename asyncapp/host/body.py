"""The request body as the file-like ``wsgi.input`` of PEP 3333.

:class:`InputStream` turns a ``recv``-like blocking reader (``raw_read(n)``
returns 1..n bytes, ``b""`` only at the end of the body) into a file whose
answers do not depend on how the body was split on the wire: ``read(n)``
returns exactly ``n`` bytes unless the body ends first, ``read()``,
``read(None)`` and ``read(-1)`` the whole rest, ``readline``, ``readlines``
and iteration the lines, all exactly as :class:`io.BytesIO` over the whole
body would.

It never reads past what it is asked for, with one exception: a line read
(``readline``, ``readlines``, iteration) may take one raw chunk past the end
of the line, which stays buffered for the next call. :meth:`InputStream.has_buffered`
tells whether such bytes exist: while they do, the host's non-blocking reader
would skip them, so code that switches between the two must check it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from asyncapp.protocol import RAW_CHUNK

if TYPE_CHECKING:
    from types import TracebackType

    from _typeshed import WriteableBuffer

__all__ = ["InputStream"]


_EMPTY: Final = b""


def _at_end(size: int) -> bytes:
    """The raw reader once the body has ended: ``b""`` for ever."""
    return _EMPTY


def _as_size(size: int | None) -> int:
    """``size`` as ``io.BytesIO`` takes it: None or negative for "all"."""
    if size is None:
        return -1
    return operator.index(size)


class InputStream:
    """A request body as a blocking binary file, over a ``recv``-like reader.

    :param raw_read: ``raw_read(n)`` blocks until it can return 1..n bytes,
        and returns ``b""`` only at the end of the body. Whatever it raises
        (``TimeoutError``, ``ConnectionError``, ...) propagates unchanged;
        bytes already collected by the interrupted call stay in the stream,
        so the next call returns them first.

    Cheap to make (three slots, no buffer until a line read leaves bytes
    over): hosts make one for every request, long polls included.
    """

    # _raw_read is None once closed, _at_end once the body ended (the host's
    # reader is let go then). _buffer[_pos:] holds bytes read ahead.
    __slots__ = ("_buffer", "_pos", "_raw_read")

    def __init__(self, raw_read: Callable[[int], bytes]) -> None:
        self._raw_read: Callable[[int], bytes] | None = raw_read
        self._buffer: bytes = _EMPTY
        self._pos = 0

    # -- state ---------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._raw_read is None

    def close(self) -> None:
        """Drop the buffer and the reader; later reads raise ``ValueError``."""
        self._raw_read = None
        self._buffer = _EMPTY
        self._pos = 0

    def _reader(self) -> Callable[[int], bytes]:
        raw_read = self._raw_read
        if raw_read is None:
            raise ValueError("I/O operation on closed file.")
        return raw_read

    def readable(self) -> bool:
        self._reader()
        return True

    def writable(self) -> bool:
        self._reader()
        return False

    def seekable(self) -> bool:
        self._reader()
        return False

    def has_buffered(self) -> bool:
        """Whether bytes were read ahead (by a line read) but not yet returned."""
        return len(self._buffer) > self._pos

    def _take_buffered(self, limit: int) -> bytes:
        """Up to ``limit`` (all if negative) buffered bytes, consumed."""
        buffer, pos = self._buffer, self._pos
        end = len(buffer) if limit < 0 else min(len(buffer), pos + limit)
        if end >= len(buffer):
            self._buffer, self._pos = _EMPTY, 0
            return buffer[pos:] if pos else buffer
        self._pos = end
        return buffer[pos:end]

    def _keep(self, data: bytes, start: int) -> None:
        """Buffer ``data[start:]`` (the buffer is empty)."""
        if start < len(data):
            self._buffer, self._pos = data, start

    def _ended(self) -> None:
        if self._raw_read is not None:
            self._raw_read = _at_end

    # -- reading ---------------------------------------------------------------
    def read(self, size: int | None = -1) -> bytes:
        """``size`` bytes, fewer only at the end; None or negative: all the rest."""
        size = _as_size(size)
        raw_read = self._reader()
        if size == 0:
            return _EMPTY
        if size > 0 and len(self._buffer) - self._pos >= size:
            return self._take_buffered(size)
        first = self._take_buffered(-1)
        chunks = [first] if first else []
        have = len(first)
        try:
            # Never more than asked for; in chunks, so a huge size allocates
            # only as the bytes arrive.
            while size < 0 or have < size:
                data = raw_read(RAW_CHUNK if size < 0 else min(size - have, RAW_CHUNK))
                if not data:
                    self._ended()
                    break
                if size >= 0 and have + len(data) > size:  # a reader that gave too much
                    self._keep(data, size - have)
                    data = data[: size - have]
                chunks.append(data)
                have += len(data)
        except BaseException:
            self._restore(chunks)
            raise
        return _EMPTY.join(chunks)

    def read1(self, size: int | None = -1) -> bytes:
        """At most one raw read: buffered bytes if any, else one ``raw_read``.

        ``b""`` only at the end of the body (or for ``size == 0``); None or
        negative: up to :data:`~asyncapp.protocol.RAW_CHUNK` bytes. While :meth:`has_buffered`,
        it never calls ``raw_read``, so a non-blocking caller can take the
        read-ahead with it before turning to the host's reader.
        """
        size = _as_size(size)
        raw_read = self._reader()
        if size == 0:
            return _EMPTY
        if self.has_buffered():
            return self._take_buffered(size)
        data = raw_read(RAW_CHUNK if size < 0 else min(size, RAW_CHUNK))
        if not data:
            self._ended()
        elif 0 < size < len(data):
            self._keep(data, size)
            data = data[:size]
        return data

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Fill ``buffer`` (fewer bytes only at the end); the count."""
        raw_read = self._reader()
        with memoryview(buffer) as view, view.cast("B") as out:
            size = len(out)
            first = self._take_buffered(size)
            filled = len(first)
            out[:filled] = first
            try:
                while filled < size:
                    data = raw_read(min(size - filled, RAW_CHUNK))
                    if not data:
                        self._ended()
                        break
                    if len(data) > size - filled:  # a reader that gave too much
                        self._keep(data, size - filled)
                        data = data[: size - filled]
                    out[filled : filled + len(data)] = data
                    filled += len(data)
            except BaseException:
                self._restore([bytes(out[:filled])])
                raise
            return filled

    def readline(self, size: int | None = -1) -> bytes:
        """One line, with its ``b"\\n"``; at most ``size`` bytes if that is >= 0."""
        size = _as_size(size)
        raw_read = self._reader()
        if size == 0:
            return _EMPTY
        buffer, pos = self._buffer, self._pos
        stop = len(buffer) if size < 0 else min(len(buffer), pos + size)
        newline = buffer.find(b"\n", pos, stop)
        if newline >= 0:
            return self._take_buffered(newline + 1 - pos)
        if stop - pos == size:  # size bytes buffered, no newline among them
            return self._take_buffered(size)
        first = self._take_buffered(-1)
        chunks = [first] if first else []
        have = len(first)
        try:
            while size < 0 or have < size:
                # Up to one chunk of read-ahead past the newline, none past size.
                data = raw_read(RAW_CHUNK if size < 0 else min(size - have, RAW_CHUNK))
                if not data:
                    self._ended()
                    break
                end = len(data) if size < 0 else min(len(data), size - have)
                newline = data.find(b"\n", 0, end)
                if newline >= 0:
                    end = newline + 1
                if end < len(data):
                    self._keep(data, end)
                    data = data[:end]
                chunks.append(data)
                have += end
                if newline >= 0:
                    break
        except BaseException:
            self._restore(chunks)
            raise
        return _EMPTY.join(chunks)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        """The lines; with ``hint > 0``, stop once they add up to ``hint`` bytes."""
        hint = _as_size(hint)
        self._reader()
        lines: list[bytes] = []
        total = 0
        try:
            while line := self.readline():
                lines.append(line)
                total += len(line)
                if 0 < hint <= total:
                    break
        except BaseException:
            self._restore(lines)
            raise
        return lines

    def _restore(self, chunks: list[bytes]) -> None:
        """Put back, in front of what is buffered, what an interrupted call collected."""
        if self._raw_read is None:  # closed meanwhile (by another greenlet)
            return
        if self.has_buffered():  # what a failed readline put back, for readlines
            chunks.append(self._take_buffered(-1))
        data = _EMPTY.join(chunks)
        self._buffer, self._pos = data, 0

    # -- iteration and context -------------------------------------------------
    def __iter__(self) -> Iterator[bytes]:
        return self  # like io.BytesIO: a closed stream raises at next()

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def __enter__(self) -> InputStream:
        self._reader()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._raw_read is None:
            state = "closed"
        elif self._raw_read is _at_end:
            state = "ended"
        else:
            state = "open"
        return f"<asyncapp.InputStream {state}, {len(self._buffer) - self._pos} bytes buffered>"
