"""msgpack framing: a streaming decoder with hard limits, and ``encode``.

msgpack-RPC has no length prefix; messages simply follow each other. The
decoder therefore hands bytes to a ``msgpack.Unpacker`` and must bound how much
it buffers for one message. Facts this module relies on (msgpack 1.x, both the
C extension and the pure-Python fallback):

* ``Unpacker.feed`` raises ``BufferFull`` if the unconsumed bytes would exceed
  ``max_buffer_size``. A recv of many small messages can easily be larger than
  one message may be, so we never feed more than the room left for the current
  message; the rest waits in ``_pending``. The C unpacker drops bytes of a
  half-parsed message from its buffer as it goes, so ``max_buffer_size`` alone
  would not bound a message; counting what we fed since the last message
  boundary (``Unpacker.tell()``) does.
* The ``max_*_len`` options reject a too-long array, map, str or bin with
  ``ValueError("N exceeds max_array_len(M)")`` *before* allocating it.
* msgpack has no depth option. Both implementations give up at depth 1024 with
  ``StackError``; we check our own, much smaller ``max_depth`` after decoding.
  The fallback recurses per level, so a ``RecursionError`` is caught as well.
* Invalid UTF-8 in a str raises ``UnicodeDecodeError``, an array or map used
  as a map key raises ``TypeError`` (unhashable), reserved byte 0xc1 raises
  ``FormatError``.
* After any of these the unpacker's state is undefined, so a decoder that
  raised stays broken and re-raises on every later call.

Map keys may be ints (``strict_map_key=False``): results are free-form maps and
a client in another language may send them. Ext types (including timestamps)
are not part of the protocol and are rejected with ``max_ext_len=0``.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .limits import Limits
from .messages import NEED_DATA, NeedData

__all__ = ["Decoder", "encode"]

#: The unpacker's first buffer, in bytes (see ``Decoder.__init__``).
READ_SIZE = 4096


def encode(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack with str as str and bytes as bin.

    Raises :class:`LocalProtocolError` for objects msgpack cannot encode.
    """
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(
            ErrorCode.EINVAL, f"cannot encode {type(obj).__name__}: {exc}"
        ) from exc


class Decoder:
    """Turns a byte stream into decoded msgpack objects, one per message.

    ``feed`` bytes, then call ``next`` until it returns :data:`NEED_DATA`.
    Every problem with the bytes raises :class:`RemoteProtocolError`, with code
    ``E2BIG`` for a limit and ``EPROTO`` otherwise, and breaks the decoder.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        unpacker_class: type[msgpack.Unpacker] = msgpack.Unpacker,
        release_when_idle: bool = False,
    ) -> None:
        """Create a decoder; ``unpacker_class`` exists to test msgpack's fallback.

        ``release_when_idle``: drop the unpacker whenever every byte fed to it
        has been decoded, and make a new one when bytes arrive. An unpacker
        holds about 45 KiB (msgpack's parse stack and its buffer) whether or
        not anything arrives, which a server with hundreds of mostly idle
        connections feels; a new one costs about 2 µs, once per read.
        """
        self.limits = limits or Limits()
        self._unpacker_class = unpacker_class
        self._release_when_idle = release_when_idle
        self._unpacker: msgpack.Unpacker | None = None
        self._pending = bytearray()  # received, not yet given to the unpacker
        self._fed = 0  # bytes given to the current unpacker, in total
        self._boundary = 0  # unpacker offset where the current message starts
        self._error: RemoteProtocolError | None = None

    def _new_unpacker(self) -> msgpack.Unpacker:
        limits = self.limits
        self._fed = self._boundary = 0
        return self._unpacker_class(
            raw=False,
            use_list=True,
            strict_map_key=False,
            max_buffer_size=limits.max_message_size,
            # The buffer starts at read_size and grows as messages need; the
            # default (max_buffer_size, up to 1 MiB) would cost every idle
            # connection the largest message it may ever send.
            read_size=min(READ_SIZE, limits.max_message_size),
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_ext_len=0,
        )

    @property
    def in_message(self) -> bool:
        """True if bytes of an incomplete message are buffered."""
        return bool(self._pending) or self._fed > self._boundary

    @property
    def broken(self) -> RemoteProtocolError | None:
        """The error that broke the decoder, or None."""
        return self._error

    def feed(self, data: bytes) -> None:
        """Buffer ``data``; nothing is decoded until :meth:`next`."""
        self._pending += data

    def next(self) -> Any | NeedData:
        """The next decoded message, or :data:`NEED_DATA`."""
        if self._error is not None:
            raise RemoteProtocolError(
                self._error.code, f"decoder is broken: {self._error.message}"
            ) from self._error
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> Any | NeedData:
        limit = self.limits.max_message_size
        while True:
            unpacker = self._unpacker
            if unpacker is None:
                if not self._pending:
                    return NEED_DATA
                unpacker = self._unpacker = self._new_unpacker()
            try:
                obj = unpacker.unpack()
            except msgpack.OutOfData:
                room = limit - (self._fed - self._boundary)
                if not self._pending:
                    return NEED_DATA
                if room <= 0:
                    raise RemoteProtocolError(
                        ErrorCode.E2BIG, f"message exceeds max_message_size ({limit} bytes)"
                    ) from None
                chunk = bytes(self._pending[:room])
                del self._pending[:room]
                self._fed += len(chunk)
                self._feed_unpacker(unpacker, chunk)
                continue
            except Exception as exc:  # anything msgpack raises means bad bytes
                raise _classify(exc) from exc
            self._boundary = unpacker.tell()
            if self._release_when_idle and self._boundary == self._fed:
                self._unpacker = None  # every byte it was given is decoded
            check_depth(obj, self.limits.max_depth)
            return obj

    @staticmethod
    def _feed_unpacker(unpacker: msgpack.Unpacker, chunk: bytes) -> None:
        try:
            unpacker.feed(chunk)
        except msgpack.BufferFull as exc:  # cannot happen: we feed within the room
            raise RemoteProtocolError(
                ErrorCode.E2BIG, "message exceeds the unpacker buffer"
            ) from exc


def _classify(exc: Exception) -> RemoteProtocolError:
    if isinstance(exc, msgpack.StackError | RecursionError):
        return RemoteProtocolError(ErrorCode.E2BIG, "message nests too deeply")
    text = str(exc)
    if isinstance(exc, ValueError) and not isinstance(exc, UnicodeDecodeError):
        if "max_ext_len" in text:
            return RemoteProtocolError(
                ErrorCode.EPROTO, "msgpack ext types are not used by this protocol"
            )
        if "exceeds max_" in text:
            return RemoteProtocolError(ErrorCode.E2BIG, f"limit exceeded: {text}")
    return RemoteProtocolError(ErrorCode.EPROTO, f"not valid msgpack: {type(exc).__name__}: {text}")


def check_depth(obj: Any, max_depth: int) -> None:
    """Raise ``E2BIG`` if arrays and maps in ``obj`` nest deeper than ``max_depth``.

    Iterative, so a deep object cannot exhaust the Python stack.
    """
    if not isinstance(obj, list | dict):
        return
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise RemoteProtocolError(
                ErrorCode.E2BIG, f"message nests deeper than max_depth ({max_depth})"
            )
        # Map keys cannot be containers: msgpack rejects unhashable keys.
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))
