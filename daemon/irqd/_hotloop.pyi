"""Type stub for the native ``irqd._hotloop`` (daemon/irqd/_hotloop.c).

Every method raises ``ValueError`` once the loop is closed.
"""

from collections.abc import Sequence
from typing import Final, final

from typing_extensions import Buffer

#: include/net/scm.h: the most fds one SCM_RIGHTS message carries.
SCM_MAX_FD: Final[int]
#: How many IRQ indexes a token can name (``token >> 16``).
MAX_INDEXES: Final[int]
#: Buckets of ``HotLoop.latency()``, as ``irqd.stats.LATENCY_BOUNDS_US``.
LATENCY_BUCKETS: Final[int]

@final
class HotLoop:
    """Forwards interrupts from vector eventfds to client sockets on a pthread."""

    def __init__(self, index_names: Sequence[str | None]) -> None:
        """``index_names[i]``: wire name of IRQ index ``i`` (``token >> 16``); ``None``
        marks an unused index. At most 16 entries."""

    # -- the thread -----------------------------------------------------------
    def start(self) -> None:
        """Spawn the relay thread; ``RuntimeError`` if it is running."""

    def stop(self) -> None:
        """Stop the thread and join it; idempotent; state is kept for ``start()``."""

    def close(self) -> None:
        """Stop and free everything; idempotent. Vector fds and sockets stay open."""

    def poke(self) -> None:
        """Wake the thread for one round."""

    @property
    def running(self) -> bool:
        """True while the relay thread runs."""

    @property
    def rounds(self) -> int:
        """Rounds (``epoll_wait`` returns) the thread processed, pokes included."""

    # -- vectors ----------------------------------------------------------------
    def add_vector(self, fd: int, token: int, /) -> None:
        """Register an eventfd under ``token`` (``index << 16 | vector``).

        ``FileExistsError`` if ``fd`` is registered, ``ValueError`` if ``token`` is.
        """

    def remove_vector(self, fd: int, /) -> int:
        """Drain (crediting the subscribers), deregister, forget; the count drained.

        ``KeyError`` if unknown. Close ``fd`` afterwards, not before.
        """

    def drain_vector(self, fd: int, /) -> int:
        """Read the counter now and credit it to the subscribers; 0 if nothing."""

    def vector_total(self, fd: int, /) -> int:
        """Every count read for this vector since ``add_vector``."""

    def take_failed(self) -> list[int]:
        """Tokens of vectors the thread dropped as broken; each reported once."""

    # -- clients ----------------------------------------------------------------
    def add_client(self, sockfd: int, guard_slot: int = -1, atomic_max: int = 0) -> int:
        """Take a connected stream socket (never closed here); returns a client id.

        With ``guard_slot >= 0`` the thread keeps the client's byte in the stream
        guard (``set_guard``): 0 whenever the stream is at a message boundary;
        sends of at most ``atomic_max`` bytes count as all-or-nothing.
        ``ValueError`` if the slot is outside the guard.
        """

    def set_guard(self, buffer: Buffer | None, /) -> None:
        """Keep the marks of clients added with a ``guard_slot`` in ``buffer``
        (writable, held until replaced or ``close()``); ``None``: no guard.
        ``ValueError`` while a client with a slot is registered."""

    def remove_client(self, cid: int, /) -> None:
        """Forget the client and everything queued for it; before closing the socket."""

    def subscribe(self, cid: int, token: int, /) -> None:
        """Credit the vector's counts to the client from now on; idempotent."""

    def unsubscribe(self, cid: int, token: int, /) -> None:
        """Stop crediting; a pending count for ``token`` is queued as ``irq`` now."""

    def credit(self, cid: int, token: int, count: int, /) -> None:
        """Add to the client's pending counter for ``token``, subscribed or not."""

    def send(self, cid: int, data: bytes, fds: Sequence[int] = ()) -> int:
        """Queue what is pending, then ``data`` with ``fds`` (SCM_RIGHTS); write.

        Returns the bytes still queued; ``OSError`` if the socket has failed.
        """

    def hold_control(self, cid: int, data: bytes, count: int, replace: bool = False) -> bool:
        """Hold ``data`` (``count`` whole control notifications) in place of what was
        held, to be queued ahead of the next encoded counts; written at once if the
        queue is empty.

        With ``replace``, only if what was held before is still held: ``False``, and
        nothing held, once the thread has queued it. ``OSError`` if the socket has failed.
        """

    def held_control(self, cid: int, /) -> int:
        """Control notifications held (``hold_control``) and not queued yet."""

    def flush(self, cid: int, /) -> int:
        """Write what the socket takes; the bytes still queued. ``OSError`` if failed."""

    def queued(self, cid: int, /) -> int:
        """Bytes queued for the client."""

    def client_stats(self, cid: int, /) -> tuple[int, int, int, int, int, int]:
        """``(delivered, notifications, pending_counters, pending_total, queued_bytes,
        errno_or_0)``."""

    def take_pending(self, cid: int, /) -> list[tuple[int, int]]:
        """Remove and return the pending ``(token, count)`` pairs, tokens ascending."""

    def take_output(self, cid: int, /) -> bytes:
        """Remove and return the unsent bytes, held control notifications last;
        ``ValueError`` if fds are queued."""

    def latency(self) -> list[int]:
        """Observations per bucket (``irqd.stats.LATENCY_BOUNDS_US``) since creation."""
