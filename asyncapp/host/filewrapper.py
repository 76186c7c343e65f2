"""``wsgi.file_wrapper``: files sent with ``os.sendfile`` where the host can.

PEP 3333's optional extension. An app returns
``environ["wsgi.file_wrapper"](file, block_size)``; a host that recognises
the object sends a real file straight from the page cache to the socket
(zero copy, non-blocking, paced by the socket), and anything else (a
``BytesIO``, a pipe) is iterated in ``block_size`` reads like any other
iterable, so the wrapper is always a valid WSGI iterable.

.. code-block:: python

    def app(environ, start_response):
        f = open("report.pdf", "rb")
        start_response("200 OK", [("Content-Type", "application/pdf")])
        return environ["wsgi.file_wrapper"](f, 65536)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any, Final

__all__ = ["BLOCK_SIZE", "FileWrapper"]

#: Bytes per read when the wrapper is iterated: 64 KiB, the socket send size
#: the server uses, rather than wsgiref's 8 KiB, so a large file costs few
#: Python-level iterations.
BLOCK_SIZE: Final = 65536


class FileWrapper:
    """The object ``wsgi.file_wrapper`` returns; iterable, and closes the file."""

    __slots__ = ("block_size", "filelike")

    def __init__(self, filelike: Any, block_size: int = BLOCK_SIZE) -> None:
        self.filelike = filelike
        self.block_size = block_size if block_size > 0 else BLOCK_SIZE

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        while data := read(self.block_size):
            yield data

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()

    def sendfile_span(self) -> tuple[int, int, int] | None:
        """``(fd, offset, size)`` of what is left of a regular file, else None.

        Only a regular file can go through ``os.sendfile``; the offset is the
        file's current position, so an app that seeked (a Range answer) sends
        from there. A file object with its own read buffer is at a position
        the descriptor does not show, so it is flushed of that first: ``tell()``
        is where the app believes it is.
        """
        try:
            fd = self.filelike.fileno()
        except (AttributeError, OSError, ValueError):
            return None
        if not isinstance(fd, int):
            return None
        try:
            info = os.fstat(fd)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        try:
            offset = self.filelike.tell()
        except (AttributeError, OSError, ValueError):
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        return fd, offset, max(0, info.st_size - offset)
