"""The stream guard: the one byte per client that says whether its stream may be mid-message.

First the kernel fact it rests on (net/unix/af_unix.c, ``unix_stream_sendmsg``)
on real socketpairs, then :class:`StreamGuard` itself, then both hot loops
keeping the bytes true on real sockets, and last the crash itself: a process
holding a mark is SIGKILLed and the memfd it leaves behind still says so.

Nothing waits on time: every wait is on a socket, a task (``flush`` or a
response that completes) or ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from irqd.config import HotLoop as HotLoopChoice
from irqd.device.base import IrqIndex
from irqd.hotpath.guard import ATOMIC_SEND_MAX, StreamGuard, atomic_send_limit
from irqd.hotpath.interface import HotLoop
from irqd.hotpath.select import open_hot_loop
from irqd.hotpath.session import PeerCredentials, Session
from irqd.stats import LatencyHistogram

#: A response larger than any socket buffer the tests meet: it cannot go out at once.
BIG = 1 << 20


# -- the kernel fact ------------------------------------------------------------------


@contextlib.contextmanager
def nonblocking_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        ours.setblocking(False)
        theirs.setblocking(False)
        yield ours, theirs


def fill(sock: socket.socket, rng: random.Random) -> None:
    """Small sends of random sizes until the socket refuses (its queued memory is
    at the send buffer)."""
    while True:
        try:
            sock.send(b"f" * rng.randint(1, 3000))
        except BlockingIOError:
            return


def empty(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        while sock.recv(1 << 20):
            pass


def test_a_send_of_the_threshold_is_all_or_nothing() -> None:
    rng = random.Random(15)
    outcomes = {"whole": 0, "eagain": 0, "partial": 0}
    with nonblocking_pair() as (ours, theirs):
        assert atomic_send_limit(ours.fileno()) == ATOMIC_SEND_MAX  # the default buffer
        for _ in range(300):
            fill(ours, rng)
            # Reading frees some skbs, or none: the next sends find the
            # socket anywhere from just full to partly free.
            theirs.recv(rng.randint(1, 20_000))
            for _ in range(3):
                try:
                    sent = ours.send(b"t" * ATOMIC_SEND_MAX)
                except BlockingIOError:
                    outcomes["eagain"] += 1
                else:
                    outcomes["whole" if sent == ATOMIC_SEND_MAX else "partial"] += 1
            empty(theirs)
    assert outcomes["partial"] == 0, outcomes
    # Both other outcomes happened, so the partly full socket was really met.
    assert outcomes["whole"] > 50 and outcomes["eagain"] > 50, outcomes


def test_a_larger_send_into_a_partly_full_socket_can_be_cut() -> None:
    rng = random.Random(16)
    cuts: list[int] = []
    with nonblocking_pair() as (ours, theirs):
        for _ in range(50):
            fill(ours, rng)
            theirs.recv(rng.randint(1, 8000))
            with contextlib.suppress(BlockingIOError):
                sent = ours.send(b"b" * 100_000)
                if sent < 100_000:
                    cuts.append(sent)
            empty(theirs)
    # Cut after the first skb: more than the threshold went, less than the send.
    assert cuts, "no send of 100 KB was ever cut"
    assert all(ATOMIC_SEND_MAX < cut < 100_000 for cut in cuts), cuts


def test_the_limit_follows_a_small_send_buffer() -> None:
    with nonblocking_pair() as (ours, _):
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum
        sndbuf = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert atomic_send_limit(ours.fileno()) == sndbuf // 2 - 64 < ATOMIC_SEND_MAX
    r, w = os.pipe()
    with open(r, "rb"), open(w, "wb"):
        assert atomic_send_limit(r) == 0  # not a socket: every send would be marked


# -- StreamGuard ------------------------------------------------------------------------


def test_slots_are_handed_out_zeroed_and_taken_back() -> None:
    with StreamGuard.create(3) as guard:
        assert guard.slots == 3 and guard.marked() == set()
        slots = [guard.allocate() for _ in range(3)]
        assert slots == [0, 1, 2] and guard.allocate() is None
        guard.mark(1)
        assert guard.mid_message(1) and guard.marked() == {1}
        guard.release(1)
        guard.release(1)  # idempotent: handed out once only
        assert not guard.mid_message(1)
        assert guard.allocate() == 1 and guard.allocate() is None
        guard.mark(2)
        guard.reset()
        assert guard.marked() == set() and [guard.allocate() for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="slot 3"):
            guard.mid_message(3)
    guard.release(0)  # a session ending after the guard closed: nothing
    with pytest.raises(ValueError, match="closed"):
        guard.fileno()


def test_an_adopted_guard_keeps_the_marks_and_their_slots() -> None:
    with StreamGuard.create(4) as guard:
        for _ in range(4):
            guard.allocate()
        guard.mark(0)
        guard.mark(2)
        with StreamGuard.adopt(os.dup(guard.fileno())) as adopted:
            assert adopted.slots == 4 and adopted.marked() == {0, 2}
            # The unmarked slots are free; the marked ones wait to be read.
            assert [adopted.allocate(), adopted.allocate(), adopted.allocate()] == [1, 3, None]
            adopted.release(0)
            assert not guard.mid_message(0)  # one memfd: the first mapping sees it
            assert adopted.allocate() == 0
        assert guard.marked() == {2}


def test_adopt_refuses_what_is_not_a_guard(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"\0" * 8)
    fd = os.open(plain, os.O_RDWR)
    with pytest.raises(ValueError, match="not a memfd"):
        StreamGuard.adopt(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # taken: closed on failure too
    empty_fd = os.memfd_create("empty", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    with pytest.raises(ValueError, match="empty"):
        StreamGuard.adopt(empty_fd)


# -- both hot loops ---------------------------------------------------------------------

#: Slots in the guard of each test below.
SLOTS = 8

#: A whole message of 2 KB: sent straight into a socket, all-or-nothing.
FILLER = msgpack.packb([2, "fill", [b"f" * 2000]])


class Pair:
    """A session of a hot loop on one end of a socketpair; the client holds the other."""

    def __init__(self, loop: HotLoop, session_id: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.daemon_side = trio.socket.from_stdlib_socket(ours)
        self.client = trio.socket.from_stdlib_socket(theirs)
        self.session: Session = loop.new_session(
            self.daemon_side, session_id, PeerCredentials.of(self.daemon_side)
        )
        self.unpacker = msgpack.Unpacker(raw=False)
        self.messages: list[object] = []

    @property
    def slot(self) -> int:
        slot = self.session.guard_slot
        assert slot is not None
        return slot

    async def read_messages(self, count: int) -> list[object]:
        while len(self.messages) < count:
            data = await self.client.recv(1 << 20)
            assert data, "the daemon side closed"
            self.unpacker.feed(data)
            self.messages.extend(self.unpacker)
        taken, self.messages = self.messages[:count], self.messages[count:]
        return taken

    async def read_counts(self, total: int) -> dict[int, int]:
        """``irq`` counts per vector until they add up to ``total``."""
        counts: dict[int, int] = {}
        while sum(counts.values()) < total:
            (message,) = await self.read_messages(1)
            assert isinstance(message, list) and message[:2] == [2, "irq"], message
            flat = message[2][1]
            for vector, count in zip(flat[::2], flat[1::2], strict=True):
                counts[vector] = counts.get(vector, 0) + count
        assert sum(counts.values()) == total
        return counts

    async def read_raw(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = await self.client.recv(1 << 20)
            assert chunk, "the daemon side closed"
            data += chunk
        return data

    def fill(self) -> int:
        """Whole messages straight into the daemon side until it refuses; how many."""
        # trio's send is async; the stdlib socket underneath sends at once.
        stdlib = socket.socket(fileno=self.daemon_side.fileno())
        sent = 0
        try:
            while True:
                try:
                    n = stdlib.send(FILLER, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return sent
                assert n == len(FILLER)
                sent += 1
        finally:
            stdlib.detach()

    def close(self) -> None:
        """End the session (its slot goes back) and close both ends; idempotent."""
        self.session.close_output()
        self.daemon_side.close()
        self.client.close()


class Rig:
    """A running hot loop with a guard attached, and the sessions made on it."""

    def __init__(self, loop: HotLoop) -> None:
        self.loop = loop
        self.guard = StreamGuard.create(SLOTS)
        loop.attach_guard(self.guard)
        self.pairs: list[Pair] = []

    def pair(self) -> Pair:
        pair = Pair(self.loop, len(self.pairs) + 1)
        self.pairs.append(pair)
        return pair

    def close(self) -> None:
        for pair in self.pairs:
            pair.close()
        self.loop.close()  # lets go of the mapping before it is closed
        self.guard.close()


@pytest.fixture
async def rig(hot_loop: HotLoopChoice) -> AsyncIterator[Rig]:
    """The hot loop ``hot_loop`` picks, running, with a guard and no vectors."""
    hot = open_hot_loop(hot_loop, LatencyHistogram())
    hot.start()
    rig = Rig(hot)
    try:
        yield rig
    finally:
        rig.close()


async def test_a_client_that_reads_is_never_marked(rig: Rig) -> None:
    pair = rig.pair()
    assert pair.session.atomic_max == ATOMIC_SEND_MAX
    seen: set[bool] = set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.session.run_sender)
        for round_ in range(300):
            # Up to 300 vectors: up to ~1 KB of counts per notification.
            vectors = round_ + 1
            for vector in range(vectors):
                pair.session.add_pending(IrqIndex.MSIX, vector, 1)
            seen.add(rig.guard.mid_message(pair.slot))
            counts = await pair.read_counts(vectors)
            seen.add(rig.guard.mid_message(pair.slot))
            assert counts == dict.fromkeys(range(vectors), 1)
        await pair.session.flush()
        nursery.cancel_scope.cancel()
    assert seen == {False}
    assert rig.guard.marked() == set()


async def test_large_output_to_a_client_that_stops_reading_is_marked(rig: Rig) -> None:
    pair = rig.pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.session.respond, msgpack.packb([1, 7, None, b"r" * BIG]))
        await trio.testing.wait_all_tasks_blocked()
        # More than the socket takes: the stream stops inside the response.
        assert rig.guard.mid_message(pair.slot)
        assert await pair.read_messages(1) == [[1, 7, None, b"r" * BIG]]
    await pair.session.flush()
    assert not rig.guard.mid_message(pair.slot)


async def test_many_pending_vectors_to_a_full_socket_are_marked(rig: Rig) -> None:
    pair = rig.pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.session.run_sender)
        filled = pair.fill()
        # 4000 counts of 300: one notification of ~24 KB for a full socket.
        # (Stopped, the native thread cannot encode the first credits on
        # their own; ``flush`` encodes them all at once.)
        rig.loop.stop()
        for vector in range(4000):
            pair.session.add_pending(IrqIndex.MSIX, vector, 300)
        nursery.start_soon(pair.session.flush)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.guard.mid_message(pair.slot)
        rig.loop.start()
        assert len(await pair.read_messages(filled)) == filled
        assert await pair.read_counts(4000 * 300) == dict.fromkeys(range(4000), 300)
        await pair.session.flush()
        assert not rig.guard.mid_message(pair.slot)
        nursery.cancel_scope.cancel()


async def test_a_small_response_waiting_for_a_full_socket_is_not_marked(rig: Rig) -> None:
    pair = rig.pair()
    filled = pair.fill()
    async with trio.open_nursery() as nursery:
        # Waits for the socket (Python: the send; native: flush below).
        nursery.start_soon(pair.session.respond, msgpack.packb([1, 8, None, "ok"]))
        nursery.start_soon(pair.session.flush)
        await trio.testing.wait_all_tasks_blocked()
        # Refused whole (EAGAIN), so nothing of it is on the stream yet.
        assert not rig.guard.mid_message(pair.slot)
        assert len(await pair.read_messages(filled + 1)) == filled + 1
    assert not rig.guard.mid_message(pair.slot)


async def test_a_response_with_fds_is_marked_while_queued(rig: Rig) -> None:
    pair = rig.pair()
    filled = pair.fill()
    r, w = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.session.respond, msgpack.packb([1, 9, None, "fd"]), [r])
            await trio.testing.wait_all_tasks_blocked()
            # fds go with the first byte, the rest separately: never unmarked.
            assert rig.guard.mid_message(pair.slot)
            assert len(await pair.read_messages(filled + 1)) == filled + 1
        await pair.session.flush()
        assert not rig.guard.mid_message(pair.slot)
    finally:
        os.close(r)
        os.close(w)


async def test_closing_the_output_releases_the_slot_zeroed(rig: Rig) -> None:
    first, second = rig.pair(), rig.pair()
    assert (first.slot, second.slot) == (0, 1)
    while rig.guard.allocate() is not None:  # the others: taken
        pass
    assert rig.pair().session.guard_slot is None  # full: nothing proves where it is
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.session.respond, msgpack.packb([1, 1, None, b"x" * BIG]))
        await trio.testing.wait_all_tasks_blocked()
        assert rig.guard.marked() == {0}
        nursery.cancel_scope.cancel()  # the client never reads: the session ends
    first.close()
    assert rig.guard.marked() == set()
    assert first.session.guard_slot is None and rig.guard.allocate() == 0


async def test_a_new_mapping_of_the_memfd_sees_the_marks(rig: Rig) -> None:
    stuck, reader = rig.pair(), rig.pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stuck.session.respond, msgpack.packb([1, 1, None, b"x" * BIG]))
        await reader.session.respond(msgpack.packb([1, 2, None, "small"]))
        await trio.testing.wait_all_tasks_blocked()
        # What the next process would map after a crash: the same memfd.
        with StreamGuard.adopt(os.dup(rig.guard.fileno())) as adopted:
            assert adopted.marked() == {stuck.slot}
            assert adopted.mid_message(stuck.slot) and not adopted.mid_message(reader.slot)
        nursery.cancel_scope.cancel()


async def test_restored_output_is_marked_until_it_has_gone_out(rig: Rig) -> None:
    pair = rig.pair()
    whole = msgpack.packb([1, 3, None, "restored"])
    filled = pair.fill()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.session.run_sender)
        # The tail of a message the previous process had started.
        pair.session.restore_output([whole[5:]])
        await trio.testing.wait_all_tasks_blocked()
        assert rig.guard.mid_message(pair.slot)
        data = await pair.read_raw(filled * len(FILLER) + len(whole) - 5)
        assert data[filled * len(FILLER) :] == whole[5:]
        await pair.session.flush()
        assert not rig.guard.mid_message(pair.slot)
        nursery.cancel_scope.cancel()


# -- the extension's own checks -----------------------------------------------------


def test_the_extension_checks_slots_and_holds_the_mapping() -> None:
    from irqd._hotloop import HotLoop as NativeLoop  # noqa: PLC0415

    guard = StreamGuard.create(2)
    hot = NativeLoop(["intx", "msi", "msix"])
    ours, theirs = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="outside the guard"):
            hot.add_client(ours.fileno(), 0, ATOMIC_SEND_MAX)  # no guard yet
        hot.set_guard(guard.buffer)
        with pytest.raises(ValueError, match="outside the guard"):
            hot.add_client(ours.fileno(), 2, ATOMIC_SEND_MAX)
        with pytest.raises(BufferError):
            guard.close()  # the loop holds the mapping
        cid = hot.add_client(ours.fileno(), 1, ATOMIC_SEND_MAX)
        with pytest.raises(ValueError, match="has a guard slot"):
            hot.set_guard(None)
        hot.remove_client(cid)
        hot.set_guard(None)
        guard.close()  # let go of by set_guard(None)
    finally:
        hot.close()
        guard.close()
        ours.close()
        theirs.close()


# -- the crash ------------------------------------------------------------------------

CRASHING_DAEMON = textwrap.dedent(
    """
    import os, signal, sys
    from irqd._hotloop import HotLoop
    from irqd.hotpath.guard import ATOMIC_SEND_MAX, StreamGuard

    guard_fd, stuck_fd, reader_fd = map(int, sys.argv[1:4])
    guard = StreamGuard.adopt(guard_fd)
    hot = HotLoop(["intx", "msi", "msix"])
    hot.set_guard(guard.buffer)
    stuck = hot.add_client(stuck_fd, guard.allocate(), ATOMIC_SEND_MAX)
    reader = hot.add_client(reader_fd, guard.allocate(), ATOMIC_SEND_MAX)
    hot.start()
    assert hot.send(stuck, b"\\xc6" + (1 << 20).to_bytes(4, "big") + bytes(1 << 20)) > 0
    assert hot.send(reader, b"\\x91\\x01") == 0
    print("ready", flush=True)
    signal.pause()
    """
)


def test_a_sigkilled_process_leaves_its_marks_in_the_memfd() -> None:
    guard = StreamGuard.create(2)
    kept = os.dup(guard.fileno())  # what systemd's fd store would hold
    guard.close()
    stuck_ours, stuck_theirs = socket.socketpair()
    reader_ours, reader_theirs = socket.socketpair()
    child_guard = os.dup(kept)
    fds = (child_guard, stuck_ours.fileno(), reader_ours.fileno())
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_DAEMON, *map(str, fds)],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        os.close(child_guard)
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        with StreamGuard.adopt(kept) as adopted:
            assert adopted.marked() == {0}  # the client cut inside a message
            assert not adopted.mid_message(1)  # the other one: at a boundary
        assert reader_theirs.recv(16) == b"\x91\x01"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        for sock in (stuck_ours, stuck_theirs, reader_ours, reader_theirs):
            sock.close()
