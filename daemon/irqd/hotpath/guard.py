"""Which clients' byte streams might be cut mid-message: marks that outlive the process.

After a crash the restarted daemon can adopt the client sockets it kept in
systemd's fd store, but only a client whose stream stopped at a message
boundary: had the dead process written part of a msgpack-RPC message, the
next process's first message would land in the middle of it and corrupt the
client's stream. Nothing the dead process held in its own memory tells the
next one which clients those are, so :class:`StreamGuard` keeps one byte per
client slot in a memfd mapped ``MAP_SHARED``: a byte stored there is in the
memfd's pages the moment the store retires, and the pages live as long as any
fd of the memfd is open, the one in the fd store included. The next process
maps the same memfd (:meth:`StreamGuard.adopt`) and reads the marks.

The rule that keeps the marks true (both hot loops follow it): a send that is
the whole of what is queued for the client, is at most
:func:`atomic_send_limit` bytes and carries no fds is all-or-nothing (see
:data:`ATOMIC_SEND_MAX`), and queued bytes are whole messages, so such a send
leaves the stream at a message boundary whatever happens. Before any other
send the client's byte is set to 1; it is set back to 0 only once the queue is
empty, the stream at a boundary again. A byte of 0 therefore proves the
stream is at a boundary; a 1 means it may not be. Almost every send is a
small notification into an empty queue, so a mark is rare, and costs one
byte store.

A client without a slot (``allocate`` returned ``None``: every slot taken)
has no such proof: after a crash it must be treated as marked.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import mmap
import os
import socket

#: The largest send the hot loops count on being all-or-nothing.
#:
#: net/unix/af_unix.c, ``unix_stream_sendmsg``: a stream send is cut into skbs
#: of at most ``min(sk_sndbuf / 2 - 64, SKB_MAX_HEAD(0) + UNIX_SKB_FRAGS_SZ)``
#: bytes (UNIX_SKB_FRAGS_SZ is 32 KiB rounded up to whole pages, so the second
#: term is about 36 KiB with 4 KiB pages and more with larger ones). Each skb
#: is allocated by ``sock_alloc_send_pskb``, which with ``MSG_DONTWAIT`` either
#: gets the whole skb (when the sender's queued memory is below ``sk_sndbuf``,
#: however much the skb then overshoots) or fails with EAGAIN; a failure after
#: the first skb returns the bytes sent so far. So a send that fits one skb
#: returns all of it or EAGAIN, and a larger one can stop after any skb.
#: 16 KiB is under the skb limit on every page size, and under
#: ``sk_sndbuf / 2 - 64`` for any send buffer from 33 KiB (the default,
#: net.core.wmem_default, is 208 KiB); :func:`atomic_send_limit` lowers it for
#: a socket with a smaller buffer. It is far above what interrupts need (an
#: ``irq`` notification takes 12 bytes per vector at most), so only large
#: responses and long backlogs are ever marked.
ATOMIC_SEND_MAX = 16 * 1024

#: net/unix/af_unix.c: the 64 bytes ``unix_stream_sendmsg`` keeps below half the send buffer.
_SNDBUF_SLACK = 64

#: The name the memfd shows in /proc/PID/fd.
MEMFD_NAME = "vfio-irqd-stream-guard"

#: include/uapi/linux/fcntl.h: an adopted memfd must never shrink under the
#: mapping (a read past its end would be SIGBUS) nor grow (its size is the slot count).
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def atomic_send_limit(fd: int) -> int:
    """The largest send on Unix stream socket ``fd`` that is all-or-nothing.

    ``min(ATOMIC_SEND_MAX, sk_sndbuf / 2 - 64)`` (see :data:`ATOMIC_SEND_MAX`);
    ``SO_SNDBUF`` reads back the kernel's ``sk_sndbuf`` (twice what was set).
    Read once per session: the daemon never lowers a client's send buffer
    after the session started (a lowered one would make this too high).
    0 when it cannot be read: every send is then marked.
    """
    try:
        sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
    except OSError:
        return 0
    try:
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return 0
    finally:
        sock.detach()
    return max(0, min(ATOMIC_SEND_MAX, sndbuf // 2 - _SNDBUF_SLACK))


def _sealed_size(fd: int) -> int:
    """The size of memfd ``fd``, sealed against shrinking; ``ValueError`` if it
    is empty or cannot be sealed (another file, or sealed without SHRINK)."""
    size = os.fstat(fd).st_size
    if size <= 0:
        raise ValueError(f"fd {fd} is empty: not a stream guard")
    with contextlib.suppress(OSError):  # EPERM once F_SEAL_SEAL is set: checked below
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ValueError(f"fd {fd} is not a memfd: {exc}") from exc
    if seals & fcntl.F_SEAL_SHRINK == 0:
        raise ValueError(f"fd {fd} can shrink under its mapping: not a stream guard")
    return size


class StreamGuard:
    """One byte per client slot in a shared memfd: 1 if the client's stream may be
    mid-message, 0 if it is at a message boundary (see the module docstring).

    Slots are handed out by :meth:`allocate` and given back by :meth:`release`;
    which slots are free is known only to this process. An adopted guard
    (:meth:`adopt`, the crash case) treats every slot whose byte is set as
    taken, so that nothing allocated clobbers a mark before it was read: read
    them (:meth:`marked`), then :meth:`release` each, or :meth:`reset`.

    The hot loops write the bytes; this object only allocates them, which is
    not thread-safe (the Trio thread does it). The native hot loop holds the
    mapping (``buffer``) until it is detached or closed: :meth:`close` after that.
    """

    def __init__(self, fd: int, slots: int) -> None:
        """Map ``fd`` (a memfd of ``slots`` bytes), taking ownership of it; use
        :meth:`create` or :meth:`adopt`."""
        if slots <= 0:
            raise ValueError(f"a stream guard needs at least one slot, not {slots}")
        self._fd = fd
        self._slots = slots
        self._map: mmap.mmap | None = mmap.mmap(
            fd, slots, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        #: Free slots, a heap: the lowest first, so that the marks stay dense.
        self._free: list[int] = []
        self._is_free: set[int] = set()
        self._free_all(held=self.marked())

    @classmethod
    def create(cls, slots: int) -> StreamGuard:
        """A new guard of ``slots`` slots, all free and zero, in a new sealed memfd."""
        if slots <= 0:
            raise ValueError(f"a stream guard needs at least one slot, not {slots}")
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, slots)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return cls(fd, slots)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int) -> StreamGuard:
        """The guard a previous process left in memfd ``fd`` (taken: closed by
        :meth:`close`); slots from its size. Marked slots stay taken until
        released; ``ValueError`` if ``fd`` is empty or could still shrink."""
        try:
            size = _sealed_size(fd)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            raise ValueError("the stream guard is closed")
        return self._map

    def _free_all(self, held: set[int]) -> None:
        self._free = [slot for slot in range(self._slots) if slot not in held]
        heapq.heapify(self._free)
        self._is_free = set(self._free)

    @property
    def slots(self) -> int:
        """How many clients can have a slot."""
        return self._slots

    @property
    def buffer(self) -> mmap.mmap:
        """The shared bytes, one per slot (what the native hot loop writes)."""
        return self._mapped()

    def fileno(self) -> int:
        """The memfd: keep it in the fd store, and the marks outlive this process."""
        if self._map is None:
            raise ValueError("the stream guard is closed")
        return self._fd

    def allocate(self) -> int | None:
        """A free slot, its byte zeroed; ``None`` when every slot is taken."""
        guard = self._mapped()
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._is_free.discard(slot)
        guard[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        """Zero ``slot``'s byte and free it (its client is gone); idempotent, and
        nothing once the guard is closed (a session ending after it)."""
        if self._map is None:
            return
        guard = self._map
        self._check(slot)
        guard[slot] = 0
        if slot not in self._is_free:
            self._is_free.add(slot)
            heapq.heappush(self._free, slot)

    def mark(self, slot: int) -> None:
        """The client's stream may be left mid-message from now on."""
        self._mapped()[slot] = 1

    def clear(self, slot: int) -> None:
        """The client's stream is at a message boundary with nothing queued."""
        self._mapped()[slot] = 0

    def mid_message(self, slot: int) -> bool:
        """Whether ``slot``'s stream may be mid-message."""
        self._check(slot)
        return self._mapped()[slot] != 0

    def marked(self) -> set[int]:
        """Every slot whose stream may be mid-message."""
        data = self._mapped()[:]
        return {slot for slot, value in enumerate(data) if value}

    def reset(self) -> None:
        """Every slot free and zero (a new process that adopts no marks)."""
        guard = self._mapped()
        guard[:] = bytes(self._slots)
        self._free_all(held=set())

    def close(self) -> None:
        """Unmap and close the memfd; idempotent. ``BufferError`` while a hot loop
        still holds the mapping (detach it or close the hot loop first)."""
        if self._map is not None:
            self._map.close()
            self._map = None
            os.close(self._fd)

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self._slots:
            raise ValueError(f"slot {slot} is not in 0..{self._slots - 1}")

    def __enter__(self) -> StreamGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._map is None else f"fd={self._fd}"
        return f"<StreamGuard {state} slots={self._slots} free={len(self._free)}>"
