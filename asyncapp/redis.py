"""Long polling across processes and machines: :class:`RedisChannel`.

:class:`asyncapp.Channel` lives in one process. :class:`RedisChannel` has
its interface (``publish``, ``wait``, ``since``, ``get``, ``cursor``,
``close``, :class:`asyncapp.CursorExpired`) over a Redis stream, so an app
served by several gunicorn workers, or by several machines, switches by
changing the constructor. Needs redis-py: ``pip install 'asyncapp[redis]'``.

.. code-block:: python

    from asyncapp.redis import RedisChannel

    chat = RedisChannel("redis://127.0.0.1:6379/0", "myapp:chat", history=1000)

    @asyncapp.coroutine
    async def poll(environ, start_response):
        cursor = int(environ["QUERY_STRING"] or 0)
        messages = await chat.wait(environ, cursor, timeout=30)
        ...

    chat.publish({"text": "hi"})   # any process, any thread

Theory of operation.

* **Where messages live.** Each publish is one ``XADD`` with an explicit id
  ``0-N``: ``N`` is the message's id and the client's cursor, a plain
  integer as with :class:`asyncapp.Channel`, assigned by Redis (a Lua script
  takes the stream's newest id plus one), so it is the same in every process
  and survives a restart of any of them. The stream is capped at ``history``
  entries (``MAXLEN ~``). Streams rather than pub/sub: pub/sub delivers
  at most once, to whoever is connected at that instant, so a process that
  was reconnecting misses messages for good; a stream is read from a cursor,
  so a reader that comes back carries on where it stopped.
* **One reader per process.** A daemon thread, started on first use in each
  process (again in a forked child: gunicorn forks its workers, perhaps
  after ``--preload`` built the channel), does ``XREAD BLOCK`` on its own
  connection and appends what it reads to a local :class:`asyncapp.Channel`,
  whose one pipe write wakes every waiter of the process: waiting is
  :class:`~asyncapp.Channel`'s own machinery, O(1) system calls per publish
  per process, and a held request costs no Redis connection. Besides the
  reader, a process has one connection for publishing (lock-guarded).
* **Contiguous ids.** Ids go up by one, so a reader that sees a jump knows
  messages are missing (trimmed while it was away, or lost with Redis): its
  history starts again after the jump and older cursors raise
  :class:`~asyncapp.CursorExpired`, never a silent loss.
* **Cursors ahead of this process.** A client may bring a cursor from
  another worker whose reader was a moment quicker: a cursor past this
  process's newest id costs one round trip to fetch what it has not read
  yet, and only a cursor past the stream's end raises ``CursorExpired``.
* **Redis restarts.** Waiters keep waiting; the reader reconnects with
  capped exponential backoff. Without persistence Redis comes back empty, so
  on reconnecting each process puts back, with their original ids, the
  messages of its history that the stream lacks (a Lua script, atomic; the
  same id from two processes is the same message). Publishes wait (at most
  :data:`RESTORE_GRACE` seconds) while processes may still be restoring, so
  no new message takes an id that an old one is about to get back. A
  publish while Redis is down raises :class:`RedisUnavailable`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import Any, Final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from asyncapp.app.channel import _NO_HOST, Channel, Message, _ChannelWait
from asyncapp.app.ops import Op
from asyncapp.errors import AsyncappError, UsageError

__all__ = ["RESTORE_GRACE", "RedisChannel", "RedisUnavailable"]

Environ = dict[str, Any]

log = logging.getLogger("asyncapp.redis")

#: Seconds after a process put back messages that Redis had lost during
#: which publishes wait: every other process's reader reconnects within
#: ``_BACKOFF_MAX`` and restores what it holds before a new message can take
#: one of their ids.
RESTORE_GRACE: Final = 2.0
#: The reader's reconnection delays: doubled after each failure, capped.
_BACKOFF_MIN: Final = 0.05
_BACKOFF_MAX: Final = 1.0
#: How long one XREAD blocks; the reader's socket timeout must be longer.
_BLOCK_MS: Final = 1000

# The publish, atomic in Redis. Refuses while a restore window is open, and
# while the stream's newest id is below the newest the caller holds (Redis
# lost messages: the caller restores them first). On a retry after a lost
# reply, an entry with the same token is the message already added.
_ADD: Final = """
local pttl = redis.call('PTTL', KEYS[2])
if pttl > 0 then
  return redis.error_reply('ASYNCAPP_RESTORING ' .. pttl)
end
local last = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then
  local seq = string.match(top[1][1], '^0%-(%d+)$')
  if not seq then
    return redis.error_reply('ASYNCAPP_FOREIGN ' .. top[1][1])
  end
  last = tonumber(seq)
end
if last < tonumber(ARGV[1]) then
  return redis.error_reply('ASYNCAPP_BEHIND ' .. last)
end
if ARGV[5] == '1' then
  local recent = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[2])
  for _, entry in ipairs(recent) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 't' and fields[i + 1] == ARGV[4] then
        return tonumber(string.match(entry[1], '^0%-(%d+)$'))
      end
    end
  end
end
last = last + 1
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], string.format('0-%d', last),
           'd', ARGV[3], 't', ARGV[4])
return last
"""

# Put back the caller's messages that the stream lacks (ARGV: MAXLEN, the
# window in ms, then id, data, token of each, oldest first). Appends when
# they all come after the stream's newest entry; otherwise rebuilds the
# stream in id order (a stream only grows at its end). Opens the restore
# window when it added anything. Returns how many it added.
_RESTORE: Final = """
local function seq_of(id)
  local seq = string.match(id, '^0%-(%d+)$')
  if not seq then
    error('ASYNCAPP_FOREIGN ' .. id)
  end
  return tonumber(seq)
end
local existing = redis.call('XRANGE', KEYS[1], '-', '+')
local have, top = {}, 0
for _, entry in ipairs(existing) do
  local seq = seq_of(entry[1])
  have[seq] = true
  if seq > top then top = seq end
end
local missing, below = {}, false
for i = 3, #ARGV, 3 do
  local seq = tonumber(ARGV[i])
  if not have[seq] then
    missing[#missing + 1] = i
    if seq < top then below = true end
  end
end
if #missing == 0 then
  return 0
end
if below then
  local merged = {}
  for _, entry in ipairs(existing) do
    merged[#merged + 1] = {seq_of(entry[1]), entry[1], entry[2]}
  end
  for _, i in ipairs(missing) do
    merged[#merged + 1] = {tonumber(ARGV[i]), '0-' .. ARGV[i],
                           {'d', ARGV[i + 1], 't', ARGV[i + 2]}}
  end
  table.sort(merged, function(a, b) return a[1] < b[1] end)
  redis.call('DEL', KEYS[1])
  for _, item in ipairs(merged) do
    redis.call('XADD', KEYS[1], item[2], unpack(item[3]))
  end
  redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[1])
else
  for _, i in ipairs(missing) do
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[i],
               'd', ARGV[i + 1], 't', ARGV[i + 2])
  end
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2], 'NX')
return #missing
"""


class RedisUnavailable(AsyncappError, ConnectionError):
    """Redis could not be reached or refused the channel (its URL is in the message).

    Raised by the :class:`RedisChannel` constructor (Redis down, wrong
    address or password), by :meth:`RedisChannel.publish` while Redis is down,
    and by :meth:`RedisChannel.since` when it must ask Redis and cannot.
    Waits never raise it: they keep waiting, and time out as usual.

    .. code-block:: python

        try:
            chat.publish(message)
        except RedisUnavailable:
            ...  # answer 503; the client sends again later
    """

    def __init__(self, url: str, doing: str, error: object) -> None:
        super().__init__(f"Redis at {url} is unavailable ({doing}): {error}")
        self.url = url


class _Entry(Message):
    """A message as read from the stream, with what restoring it needs."""

    __slots__ = ("raw", "token")

    def __init__(self, id: int, data: Any, raw: bytes | str, token: bytes | str) -> None:
        super().__init__(id, data)
        self.raw = raw
        self.token = token


class _Foreign(UsageError):
    """The stream holds an entry RedisChannel did not add."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _seq(stream_id: bytes | str | None, key: str) -> int:
    """The message id of a stream id ``0-N``."""
    text = _text(stream_id or "")
    ms, _, seq = text.partition("-")
    if ms != "0" or not seq.isdigit():
        raise _Foreign(
            f"the Redis stream {key!r} holds an entry that RedisChannel did not add "
            f"(id {text}); give the channel a key of its own"
        )
    return int(seq)


def _field(fields: dict[Any, Any], name: str) -> Any:
    """A field of an entry, whether the client decodes responses or not."""
    value = fields.get(name.encode())
    return fields.get(name, b"") if value is None else value


def _describe(pool: redis.ConnectionPool) -> str:
    """The pool's address as a URL, without the password."""
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
    host = kwargs.get("host", "localhost")
    return f"{scheme}://{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def _json_encode(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _decode_json(raw: bytes | str) -> Any:
    return json.loads(raw)


class _RedisWait(_ChannelWait):
    """:class:`Channel`'s wait over the process's local history.

    Only a cursor ahead of that history needs Redis: one round trip fetches
    what the reader has not delivered yet. If Redis cannot be asked, the
    cursor is given the benefit of the doubt and the wait carries on.
    """

    __slots__ = ("ahead", "owner")

    def __init__(
        self, owner: RedisChannel, environ: Environ, cursor: int, timeout: float | None
    ) -> None:
        super().__init__(owner._local, environ, cursor, timeout)
        self.owner = owner
        self.ahead = False

    def perform(self) -> Generator[bytes, None, list[Message]]:
        owner = self.owner
        owner._ensure_running()
        self.channel = owner._local  # a forked child has a new one
        if isinstance(self.cursor, int) and self.cursor > self.channel.cursor:
            try:
                owner._catch_up()
            except redis.RedisError:
                self.ahead = True
        return (yield from super().perform())

    def _check(self) -> tuple[bool, list[Message]]:
        if self.ahead and self.cursor > self.channel._last:
            return False, []
        return super()._check()


class RedisChannel:
    """:class:`asyncapp.Channel`, shared by every process through a Redis stream.

    ``url_or_client`` is a Redis URL (``redis://host:6379/0``,
    ``rediss://...``, ``unix:///path``) or a ``redis.Redis`` client, whose
    connection pool (and its settings) the channel then uses: it keeps two
    of its connections per process, the reader's and one to publish on.
    ``key`` names the stream; every process that serves the same clients
    must use the same key. ``history`` is the window of messages kept, in the
    stream and in each process. ``timeout`` bounds connecting and each command, for a
    channel made from a URL. Messages are stored as JSON (``encode`` and
    ``decode`` change that), so ``Message.data`` is what ``json.loads``
    returns, in every process including the one that published.

    The constructor connects and checks the key at once, and raises
    :class:`RedisUnavailable` rather than starting an app that cannot work.

    .. code-block:: python

        chat = RedisChannel(os.environ["REDIS_URL"], "myapp:chat", history=1000)
        chat.publish({"name": "ann", "message": "hi"})        # -> its id
        messages = await chat.wait(environ, cursor, timeout=25)   # async def
        messages = yield from chat.wait(environ, cursor, 25)      # generator
        messages = green.run(chat.wait(environ, cursor, 25))      # @green.app
        messages = chat.get(cursor, timeout=25)                   # a plain thread

    ``publish`` is a blocking round trip to Redis (plus, right after Redis
    restarted and lost messages, up to :data:`RESTORE_GRACE` seconds); so is
    the first use in each process, and a ``wait`` or ``since`` with a cursor
    ahead of what the process has read. Everything else is answered from the
    process's own copy of the history.
    """

    # Per process: set by _forked, in the constructor and again in a child.
    _pid: int
    _start_lock: threading.Lock
    _command_lock: threading.Lock
    _command_client: redis.Redis | None
    _stopping: threading.Event
    _ready: threading.Event
    _reader: threading.Thread | None
    _reader_id: int | None
    _loaded: bool
    _local: Channel

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        key: str = "asyncapp:channel",
        history: int = 1000,
        *,
        timeout: float = 2.0,
        encode: Callable[[Any], bytes | str] = _json_encode,
        decode: Callable[[bytes | str], Any] = _decode_json,
    ) -> None:
        if history < 1:
            raise UsageError("a channel needs a history of at least one message")
        if not key:
            raise UsageError("RedisChannel needs the key of a Redis stream")
        if not timeout > 0:
            raise UsageError(f"timeout must be > 0 seconds, not {timeout!r}")
        if isinstance(url_or_client, str):
            try:
                client = redis.Redis.from_url(
                    url_or_client,
                    protocol=2,
                    socket_connect_timeout=timeout,
                    socket_timeout=timeout,
                    # One retry at most, and that one ours: publish decides
                    # whether a command that failed may already have run.
                    retry=Retry(NoBackoff(), 0),
                )
            except ValueError as error:
                raise UsageError(f"not a Redis URL: {error}") from None
            self._own_pool = True
        elif isinstance(url_or_client, redis.Redis):
            client = url_or_client
            self._own_pool = False
        else:
            raise UsageError(
                f"RedisChannel needs a Redis URL or a redis.Redis client, "
                f"not {type(url_or_client).__name__}"
            )
        self._pool: redis.ConnectionPool = client.connection_pool
        self.url = _describe(self._pool)
        self.key = key
        self._history = history
        self._timeout = timeout
        self._encode = encode
        self._decode = decode
        self._restoring_key = f"{key}:restoring"
        socket_timeout = self._pool.connection_kwargs.get("socket_timeout")
        self._block_ms = (
            _BLOCK_MS
            if socket_timeout is None
            else max(10, min(_BLOCK_MS, int(socket_timeout * 500)))
        )
        self._add_script = client.register_script(_ADD)
        self._restore_script = client.register_script(_RESTORE)
        self._closed = False
        self._forked(force=True)
        self._connect_check()
        _CHANNELS.add(self)

    def _forked(self, force: bool = False) -> None:
        """Fresh per-process state: in the constructor, and in a forked child.

        A child must not touch its parent's connections (the sockets are
        shared) nor trust locks some parent thread may have held at the fork;
        its history is loaded again from Redis by its own reader.
        """
        if not force and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._start_lock = threading.Lock()
        self._command_lock = threading.Lock()
        self._command_client = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self._reader_id: int | None = None
        self._loaded = False
        self._local = Channel(self._history)

    def __repr__(self) -> str:
        return f"<RedisChannel {self.key!r} at {self.url}>"

    # -- the channel's interface ----------------------------------------------------

    @property
    def cursor(self) -> int:
        """The id of the newest message this process has read (``0`` before any)."""
        self._ensure_running()
        return self._local.cursor

    def publish(self, data: Any) -> int:
        """Add a message to the stream; returns its id. Raises :class:`RedisUnavailable`.

        Every waiter before it, in every process, receives it; this process's
        own :meth:`since` and :meth:`wait` see it as soon as this returns.
        """
        self._ensure_running()
        encoded = self._encode(data)
        raw = encoded.encode() if isinstance(encoded, str) else encoded
        token = os.urandom(8).hex()
        seq = self._add(raw, token)
        last = self._local.cursor
        if last == seq - 1:
            self._local._extend([_Entry(seq, self._decode(raw), raw, token)])
        elif last < seq:
            with contextlib.suppress(redis.RedisError):  # if not, the reader brings it
                self._catch_up()
        return seq

    def since(self, cursor: int) -> list[Message]:
        """The messages after ``cursor`` (maybe none); never waits.

        Raises :class:`~asyncapp.CursorExpired` for a cursor outside the
        history, and :class:`RedisUnavailable` when the cursor is ahead of
        this process and Redis cannot be asked.
        """
        self._ensure_running()
        if isinstance(cursor, int) and cursor > self._local.cursor:
            try:
                self._catch_up()
            except redis.RedisError as error:
                raise RedisUnavailable(self.url, f"read {self.key!r}", error) from error
        return self._local.since(cursor)

    def wait(
        self, environ: Environ, cursor: int, timeout: float | None = None
    ) -> Op[list[Message]]:
        """Wait for messages after ``cursor``; ``[]`` when ``timeout`` passes.

        An operation, as :meth:`asyncapp.Channel.wait`: ``yield from`` it,
        ``await`` it, or ``green.run`` it. Raises
        :class:`~asyncapp.CursorExpired` for a cursor outside the history.
        While Redis is down, waits go on (and time out) as usual.
        """
        return _RedisWait(self, environ, cursor, timeout)

    def get(self, cursor: int, timeout: float | None = None) -> list[Message]:
        """:meth:`wait`, blocking, for plain threads."""
        return _RedisWait(self, _NO_HOST, cursor, timeout).run()

    def close(self) -> None:
        """Stop this process's reader, close its connections, wake its waiters."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
            reader, self._reader = self._reader, None
        self._stopping.set()
        if reader is not None:
            reader_id = self._reader_id
            if reader_id is not None:
                try:
                    with self._command_lock:
                        self._commands().client_unblock(reader_id)
                except redis.RedisError:
                    pass  # the XREAD ends by itself within _BLOCK_MS
            reader.join(timeout=self._block_ms / 1000 + self._timeout + 1)
        with self._command_lock:
            if self._command_client is not None:
                self._command_client.close()
                self._command_client = None
        if self._own_pool:
            self._pool.disconnect()
        self._local.close()
        _CHANNELS.discard(self)

    # -- Redis -------------------------------------------------------------------------

    def _commands(self) -> redis.Redis:
        """This process's command connection (call with ``_command_lock`` held)."""
        client = self._command_client
        if client is None:
            client = redis.Redis(connection_pool=self._pool, single_connection_client=True)
            self._command_client = client
        return client

    def _connect_check(self) -> None:
        """Connect now, and make sure the key is ours to use."""
        try:
            with self._command_lock:
                commands = self._commands()
                try:
                    kind = _text(commands.type(self.key))
                    top = (
                        commands.xrevrange(self.key, "+", "-", count=1) if kind == "stream" else []
                    )
                finally:
                    commands.close()
                    self._command_client = None
                    if self._own_pool:
                        # Nothing open until first use: gunicorn --preload
                        # forks workers from here, and a socket is no thing
                        # to share with them.
                        self._pool.disconnect()
        except redis.RedisError as error:
            raise RedisUnavailable(self.url, f"connect for {self.key!r}", error) from error
        if kind not in ("none", "stream"):
            raise UsageError(
                f"the Redis key {self.key!r} holds a {kind}, not a stream; "
                "give the channel a key of its own"
            )
        if top:
            _seq(top[0][0], self.key)

    def _ensure_running(self) -> None:
        """Start this process's reader on first use; wait for its first read.

        Bounded: the reader reports ready after its first attempt, whether
        it reached Redis or not.
        """
        if self._reader is not None and self._pid == os.getpid():
            return
        self._forked()
        with self._start_lock:
            if self._closed:
                raise UsageError("this channel was closed")
            if self._reader is None:
                self._reader = threading.Thread(
                    target=self._read, name=f"asyncapp-redis-reader {self.key}", daemon=True
                )
                self._reader.start()
        self._ready.wait(2 * self._timeout + 1)

    def _read(self) -> None:
        """The reader thread: XREAD forever, reconnecting with backoff."""
        delay = _BACKOFF_MIN
        down_since: float | None = None
        while not self._stopping.is_set():
            reader: redis.Redis | None = None
            try:
                reader = redis.Redis(connection_pool=self._pool, single_connection_client=True)
                reader.client_setname(f"asyncapp-reader-{os.getpid()}")
                self._reader_id = int(reader.client_id())
                self._resync(reader)
                if down_since is not None:
                    log.warning(
                        "reader of %r reconnected to %s after %.1f s",
                        self.key,
                        self.url,
                        time.monotonic() - down_since,
                    )
                down_since, delay = None, _BACKOFF_MIN
                self._ready.set()
                while not self._stopping.is_set():
                    after = f"0-{self._local.cursor}"
                    reply = reader.xread(
                        {self.key: after}, count=self._history, block=self._block_ms
                    )
                    if reply:
                        self._deliver(_entries(reply))
            except Exception as error:
                if self._stopping.is_set():
                    break
                if not isinstance(error, redis.RedisError):
                    log.exception("reader of %r failed; starting again", self.key)
                elif down_since is None:
                    log.warning(
                        "reader of %r lost %s (%s); waiters keep waiting, reconnecting",
                        self.key,
                        self.url,
                        error,
                    )
                if down_since is None:
                    down_since = time.monotonic()
                self._ready.set()  # first use does not wait for a Redis that is down
                self._stopping.wait(delay * random.uniform(0.5, 1.0))
                delay = min(2 * delay, _BACKOFF_MAX)
            finally:
                self._reader_id = None
                if reader is not None:
                    # Disconnected, not just released: the pool must not hand
                    # the reader's connection (maybe dead) to anyone else.
                    if reader.connection is not None:
                        reader.connection.disconnect()  # type: ignore[no-untyped-call]
                    reader.close()

    def _resync(self, reader: redis.Redis) -> None:
        """After (re)connecting: load the history, or put back what Redis lost."""
        if not self._loaded:
            newest = reader.xrevrange(self.key, "+", "-", count=self._history) or []
            self._deliver(reversed(newest))
            self._loaded = True
        else:
            self._restore(reader)

    def _restore(self, client: redis.Redis) -> None:
        """Put back the messages of this process's history the stream lacks."""
        held = [m for m in self._local._held() if isinstance(m, _Entry)]
        if not held:
            return
        first, last = held[0].id, held[-1].id
        pipe = client.pipeline(transaction=False)
        pipe.xlen(self.key)
        pipe.xrange(self.key, "-", "+", count=1)
        pipe.xrevrange(self.key, "+", "-", count=1)
        length, head, tail = pipe.execute()
        if head and tail:
            low, high = _seq(head[0][0], self.key), _seq(tail[0][0], self.key)
            if low <= first and high >= last and high - low + 1 == length:
                return  # the stream has all of it: nothing was lost
        args: list[Any] = [self._history, int(RESTORE_GRACE * 1000)]
        for message in held:
            args += [message.id, message.raw, message.token]
        added = self._restore_script(keys=[self.key, self._restoring_key], args=args, client=client)
        if added:
            log.warning(
                "Redis at %s had lost %d messages of %r: put back from pid %d's history",
                self.url,
                added,
                self.key,
                os.getpid(),
            )

    def _add(self, raw: bytes, token: str) -> int:
        """Run the publish script until it answers; returns the message's id."""
        doing = f"publish to {self.key!r}"
        deadline = time.monotonic() + RESTORE_GRACE + 4 * self._timeout
        maybe_added = False
        failures = 0
        while True:
            behind, pause = False, 0.0
            try:
                with self._command_lock:
                    result = self._add_script(
                        keys=[self.key, self._restoring_key],
                        args=[self._local.cursor, self._history, raw, token, int(maybe_added)],
                        client=self._commands(),
                    )
                return int(result)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                # The first failure may be a connection that died with a
                # Redis restart: try once more, on a new one, looking for
                # the token in case the first attempt did add the message.
                maybe_added = True
                failures += 1
                if failures > 1:
                    raise RedisUnavailable(self.url, doing, error) from error
            except redis.ResponseError as error:
                reason, _, detail = str(error).partition(" ")
                if reason == "ASYNCAPP_BEHIND":
                    behind = True
                elif reason == "ASYNCAPP_RESTORING":
                    pause = min(int(detail), RESTORE_GRACE * 1000) / 1000
                elif reason == "ASYNCAPP_FOREIGN":
                    raise _Foreign(
                        f"the Redis stream {self.key!r} holds an entry that RedisChannel "
                        f"did not add (id {detail}); give the channel a key of its own"
                    ) from None
                else:
                    raise RedisUnavailable(self.url, doing, error) from error
            except redis.RedisError as error:
                raise RedisUnavailable(self.url, doing, error) from error
            if time.monotonic() + pause > deadline:
                raise RedisUnavailable(self.url, doing, "other processes are still restoring")
            if behind:
                # Redis lost messages this process holds: they go back
                # first, with their ids, and the next message comes after.
                try:
                    with self._command_lock:
                        self._restore(self._commands())
                except redis.RedisError as error:
                    raise RedisUnavailable(self.url, doing, error) from error
            elif pause:
                time.sleep(pause)

    def _catch_up(self) -> None:
        """Fetch what the reader has not delivered yet (a round trip)."""
        after = self._local.cursor
        with self._command_lock:
            newest = self._commands().xrevrange(self.key, "+", f"0-{after + 1}", self._history)
        self._deliver(reversed(newest or []))

    def _deliver(self, entries: Iterable[tuple[Any, Any]]) -> None:
        """Append entries read from the stream to this process's history."""
        messages = []
        for stream_id, fields in entries:
            raw = _field(fields, "d")
            try:
                data = self._decode(raw)
            except ValueError:
                log.error("message %s of %r is not decodable: %.80r", stream_id, self.key, raw)
                data = raw
            messages.append(_Entry(_seq(stream_id, self.key), data, raw, _field(fields, "t")))
        before = self._local.cursor
        jumped = self._local._extend(messages)
        if jumped and before:
            log.warning(
                "%d messages of %r were gone from Redis before this process read them; "
                "older cursors get CursorExpired",
                jumped,
                self.key,
            )


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """The entries of an XREAD reply on one stream.

    RESP2 gives ``[[key, entries]]``; redis-py's RESP3 parsing gives
    ``{key: [entries]}``.
    """
    if isinstance(reply, dict):
        found: list[tuple[Any, Any]] = []
        for value in reply.values():
            found.extend(value[0] if value and isinstance(value[0], list) else value)
        return found
    return [entry for _, entries in reply for entry in entries]


#: The channels of this process, renewed in a forked child.
_CHANNELS: weakref.WeakSet[RedisChannel] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for channel in list(_CHANNELS):
        channel._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
