"""Control notifications (``err``, ``resized``, ``shutdown``, ``device_lost``) coalesce
like counts: a client that never reads costs a bounded amount however many are raised.

The storms run against a daemon on the simulated device with each hot loop
(tests/conftest.py ``hot_loop``): the client that does not read is a raw
socket whose daemon side gets the smallest send buffer, so the daemon finds it
full after a few messages and everything later has to wait in the session.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from irqd import _hotloop
from irqd.config import MsixStrategy, ServerConfig, SimConfig
from irqd.device.base import IrqIndex
from irqd.device.sim import SimDevice
from irqd.hotpath.native import NativeHotLoop
from irqd.hotpath.native_session import NativeSession
from irqd.hotpath.session import PendingControl, Session, encode_notification
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqproto.notifications import (
    DeviceLostNotification,
    ErrNotification,
    ResizedNotification,
    ShutdownNotification,
)
from irqproto.trio_client import open_client

#: Generous: nothing here waits on time, only on the daemon's answers.
DEADLINE = 30

#: Bytes the native extension may keep queued for the client that does not
#: read, beyond what the socket took: the tail of one write that did not fit.
MAX_QUEUED = 4096


# -- the coalescing rules -------------------------------------------------------------


def test_pending_control_merges_like_counts() -> None:
    control = PendingControl()
    assert not control and len(control) == 0
    for count in (1, 2, 3):
        control.add(ErrNotification(count))
    control.add_resized(IrqIndex.MSIX, [3, 1], False)
    control.add(ResizedNotification("msix", (2,), True))
    control.add_resized(IrqIndex.MSI, [0], False)
    control.add(DeviceLostNotification("request"))
    control.add(DeviceLostNotification("removed"))
    control.add(ShutdownNotification("SIGTERM"))
    control.add(ShutdownNotification("again"))
    assert len(control) == 5
    assert control.notifications() == [
        ResizedNotification("msi", (0,), False),
        ResizedNotification("msix", (1, 2, 3), True),
        ErrNotification(6),
        DeviceLostNotification("request"),
        ShutdownNotification("SIGTERM"),
    ]
    assert control.encode() == b"".join(encode_notification(n) for n in control.notifications())
    copy = control.copy()
    copy.add(ErrNotification(1))
    copy.add_resized(IrqIndex.MSIX, [9], False)
    assert control.err == 6 and control.resized[IrqIndex.MSIX][0] == {1, 2, 3}


# -- the extension's control buffer -----------------------------------------------------


def test_hold_control_replaces_until_queued_and_goes_ahead_of_counts() -> None:
    hot = _hotloop.HotLoop(["intx", "msi", "msix", "err", "req"])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ours.setblocking(False)
        cid = hot.add_client(ours.fileno())
        token = int(IrqIndex.MSIX) << 16 | 5
        # Nothing held: replace refuses and holds nothing.
        assert hot.hold_control(cid, b"\x90", 1, True) is False
        assert hot.held_control(cid) == 0
        # The queue is empty: held bytes are written at once.
        first = encode_notification(ErrNotification(1))
        assert hot.hold_control(cid, first, 1) is True
        assert hot.held_control(cid) == 0 and hot.queued(cid) == 0
        assert theirs.recv(4096) == first
        # ...so the next one cannot merge into it.
        assert hot.hold_control(cid, b"\x90", 1, True) is False
        # While the queue holds bytes, held ones stay held and can be replaced.
        filler = msgpack.packb([1, 0, None, b"x" * 100_000])
        for _ in range(3):  # more than the socket takes
            hot.send(cid, filler)
        assert hot.queued(cid) > 0
        hot.credit(cid, token, 2)
        merged = encode_notification(ErrNotification(5))
        assert hot.hold_control(cid, encode_notification(ErrNotification(3)), 1) is True
        assert hot.hold_control(cid, merged, 1, True) is True
        assert hot.held_control(cid) == 1
        # A hand-over takes the queue, then what is held; the counts stay pending.
        out = hot.take_output(cid)
        assert out.endswith(merged) and len(out) > len(merged)
        assert hot.held_control(cid) == 0
        assert hot.take_pending(cid) == [(token, 2)]
        assert hot.client_stats(cid)[1] == 2  # both errs count as written
        # Put back (a hand-over called off); the socket is still full. Held
        # bytes go into the queue ahead of counts credited after them.
        hot.send(cid, out)
        hot.hold_control(cid, encode_notification(ErrNotification(4)), 1)
        hot.credit(cid, token, 7)
        theirs.setblocking(False)
        unpacker = msgpack.Unpacker(raw=False)
        messages: list[Any] = []
        while hot.flush(cid) or hot.client_stats(cid)[2]:
            with contextlib.suppress(BlockingIOError):
                while data := theirs.recv(1 << 20):
                    unpacker.feed(data)
            messages.extend(unpacker)
        with contextlib.suppress(BlockingIOError):
            unpacker.feed(theirs.recv(1 << 20))
        messages.extend(unpacker)
        assert messages[-3:] == [
            [2, "err", [{"count": 5}]],
            [2, "err", [{"count": 4}]],
            [2, "irq", ["msix", [5, 7]]],
        ]
        assert messages[:-3] == [[1, 0, None, b"x" * 100_000]] * 3
        hot.remove_client(cid)
    finally:
        hot.close()
        ours.close()
        theirs.close()


# -- storms against a daemon that a client does not read ------------------------------


async def start(nursery: trio.Nursery, config: ServerConfig, sim: SimDevice | None) -> Daemon:
    async def run(task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(config, device=sim, task_status=task_status)

    daemon: Daemon = await nursery.start(run)
    return daemon


class Silent:
    """A raw msgpack-RPC client that sends requests and stops reading in between."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.received = 0
        self.notes: list[list[Any]] = []
        self.msgid = 0

    async def call(self, method: str, params: list[Any]) -> Any:
        """Send a request and read until its answer; notifications before it are kept."""
        self.msgid += 1
        await self.sock.send(msgpack.packb([0, self.msgid, method, params]))
        while True:
            data = await self.sock.recv(65536)
            assert data, "the daemon closed the connection"
            self.received += len(data)
            self.unpacker.feed(data)
            for message in self.unpacker:
                if message[0] == 1 and message[1] == self.msgid:
                    assert message[2] is None, message[2]
                    return message[3]
                self.notes.append(message)

    async def read_until(self, done: Any) -> None:
        """Read notifications until ``done(self.notes)``."""
        while not done(self.notes):
            data = await self.sock.recv(65536)
            assert data, "the daemon closed the connection"
            self.received += len(data)
            self.unpacker.feed(data)
            self.notes.extend(self.unpacker)


async def connect_silent(daemon: Daemon) -> tuple[Silent, Session]:
    """A raw client after ``hello``, and its session, whose send buffer is shrunk."""
    before = {s.id for s in daemon.session_set.live()}
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(daemon.config.socket_path))
    silent = Silent(sock)
    await silent.call("hello", [{"client": "silent", "protocol": 1}])
    (session,) = [s for s in daemon.session_set.live() if s.id not in before]
    # The kernel's minimum: the daemon finds the socket full after a few messages.
    session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    return silent, session


def queued_bytes(daemon: Daemon, session: Session) -> int:
    """What the extension keeps queued for the client (the Python loop queues nothing:
    its sender waits on the socket with one write's bytes)."""
    if isinstance(session, NativeSession):
        assert isinstance(daemon.hot, NativeHotLoop)
        return daemon.hot.hot.queued(session.client_id)
    return 0


@pytest.mark.usefixtures("hot_loop")
async def test_an_err_storm_costs_a_client_that_does_not_read_one_count(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    sim = SimDevice(msix_vectors=8)
    config = ServerConfig(socket_path=tmp_path / "irqd.sock")
    daemon = await start(nursery, config, sim)
    silent, session = await connect_silent(daemon)
    with silent.sock:
        await silent.call("subscribe", ["msix", [0]])
        storms = 3000
        async with open_client(str(config.socket_path), client_name="reader") as reader:
            for _ in range(storms):
                sim.raise_irq(IrqIndex.ERR, 0)
                # The reader's copy says the daemon has handled this one.
                with trio.fail_after(DEADLINE):
                    while True:
                        note = await reader.next_notification()
                        if isinstance(note, ErrNotification):
                            assert note.count == 1
                            break
                assert session.pending_control() <= 1
                assert queued_bytes(daemon, session) <= MAX_QUEUED
        assert daemon.events.errors == storms
        # The socket filled long ago: the rest waits merged in the session.
        assert session.pending_control() == 1
        with trio.fail_after(DEADLINE):
            await silent.call("stats", [])
        errs = [m[2][0]["count"] for m in silent.notes if m[1] == "err"]
        assert sum(errs) == storms
        assert len(errs) < storms // 10, "err notifications were not merged"
        one = len(encode_notification(ErrNotification(1)))
        assert silent.received < storms * one // 4
        assert session.pending_control() == 0


@pytest.mark.usefixtures("hot_loop")
async def test_a_grow_storm_costs_a_client_that_does_not_read_one_resized(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    vectors = 2048
    config = ServerConfig(
        socket_path=tmp_path / "irqd.sock",
        sim=SimConfig(msix_vectors=vectors, noresize=True),
        msix_strategy=MsixStrategy.GROW,
    )
    daemon = await start(nursery, config, None)
    silent, session = await connect_silent(daemon)
    with silent.sock:
        await silent.call("subscribe", ["msix", [0, 1]])
        grows = 0
        async with open_client(str(config.socket_path), client_name="grower") as grower:
            # Every subscribe beyond the enabled range grows it: disable, enable
            # again, ``resized`` to the silent client, a loopback trigger of its vectors.
            for vector in range(2, vectors):
                with trio.fail_after(DEADLINE):
                    assert (await grower.subscribe("msix", [vector]))["how"] == "resize"
                    await grower.unsubscribe("msix", [vector])
                grows += 1
                assert session.pending_control() <= 1
                assert session.pending_counters() <= 2
                assert queued_bytes(daemon, session) <= MAX_QUEUED
        assert session.pending_control() == 1
        with trio.fail_after(DEADLINE):
            await silent.call("stats", [])
            # The loopback triggers of the last grow may still be on their way.
            await silent.read_until(lambda notes: irq_total(notes) == 2 * grows)
        resized = [m for m in silent.notes if m[1] == "resized"]
        assert len(resized) < grows // 10, "resized notifications were not merged"
        for _, _, (index, body) in resized:
            assert index == "msix"
            assert body == {"vectors": [0, 1], "possible_loss": True}
        # Each loopback trigger's count comes after a ``resized``.
        first_irq = next(i for i, m in enumerate(silent.notes) if m[1] == "irq")
        assert silent.notes[first_irq - 1][1] == "resized"
        assert silent.notes[-1][1] == "irq"
        assert any(m[1] == "resized" for m in silent.notes[-3:])


def irq_total(notes: list[list[Any]]) -> int:
    return sum(sum(m[2][1][1::2]) for m in notes if m[1] == "irq")
