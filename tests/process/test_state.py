"""The pieces of a hand-over's state: sim, vector table, sessions, the memfd."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import pytest
import trio

from irqd.device.base import IrqIndex
from irqd.device.sim import SimDevice
from irqd.eventfd import EventFd
from irqd.hotpath.native import NativeHotLoop
from irqd.hotpath.native_session import NativeSession
from irqd.hotpath.python import PythonHotLoop
from irqd.hotpath.python_session import PythonSession
from irqd.hotpath.session import PeerCredentials, Session
from irqd.process.fdstore import (
    Carried,
    HandoverError,
    adopt_device,
    device_fds,
    export_device,
    read_state,
    write_state,
)
from irqd.server.vectors import VectorTable
from irqd.stats import LatencyHistogram

MSIX = IrqIndex.MSIX


class Sub:
    """A subscriber with an id, as a session has."""

    def __init__(self, sid: int) -> None:
        self.id = sid
        self.counts: dict[int, int] = {}

    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        self.counts[vector] = self.counts.get(vector, 0) + count

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        pass


def exported(table: VectorTable, *subscribers: Sub) -> dict[str, Any]:
    """The table's state as the next process reads it, ``subscribers`` known by their ids."""
    packed = table.packed_state({id(s): s.id for s in subscribers})
    state: dict[str, Any] = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return state


def pump(table: VectorTable) -> None:
    assert isinstance(table.poller, PythonHotLoop)
    for token, count in table.poller.dispatcher.drain().counts:
        table.deliver(token, count)


def close_poller(table: VectorTable) -> None:
    assert isinstance(table.poller, PythonHotLoop)
    table.poller.close()


@pytest.fixture
def old() -> Iterator[tuple[SimDevice, VectorTable]]:
    sim = SimDevice(msix_vectors=16, noresize=True)
    table = VectorTable(sim, PythonHotLoop())
    yield sim, table
    table.close()
    close_poller(table)
    sim.close()


def test_table_and_sim_carry_over_without_a_single_set_irqs(
    old: tuple[SimDevice, VectorTable],
) -> None:
    sim, table = old
    a, b = Sub(1), Sub(2)
    table.subscribe(a, MSIX, [0, 3])
    table.subscribe(b, MSIX, [3, 5])
    sim.raise_irq(MSIX, 3, 4)
    pump(table)
    # What a hand-over sends: the state, and dups of the eventfds (the fd store's).
    table_state = exported(table, a, b)
    sim_state = sim.export_state()
    carried = {key: EventFd.adopt(os.dup(fd)) for key, fd in table.eventfds().items()}
    table.detach()  # the old process lets go without touching the device
    sim.raise_irq(MSIX, 5, 2)  # while nobody reads: waits in the eventfd

    new_sim = SimDevice(msix_vectors=16, noresize=True)
    new_sim.import_state(sim_state, {v: efd.fileno() for (_, v), efd in carried.items()})
    new = VectorTable(new_sim, PythonHotLoop())
    a2, b2 = Sub(1), Sub(2)
    subs: dict[int, Sub] = {1: a2, 2: b2}
    assert new.import_state(table_state, carried, subs.get) == []
    assert new_sim.calls == []  # adopted, not enabled again
    assert new.enabled(MSIX) == [0, 3, 5] and new.host_vectors() == sim_state_host(sim_state)
    assert new.subscriptions(a2) == [(MSIX, 0), (MSIX, 3)]
    pump(new)
    assert b2.counts == {5: 2}
    new_sim.raise_irq(MSIX, 0, 1)  # the new "hardware" knows which vectors are assigned
    pump(new)
    assert a2.counts == {0: 1}
    vector3 = new.lookup(MSIX, 3)
    assert vector3 is not None and vector3.total == 4
    new.close()
    close_poller(new)
    new_sim.close()


def test_the_sim_is_handed_over_through_the_device_interface(
    old: tuple[SimDevice, VectorTable],
) -> None:
    sim, table = old
    table.subscribe(Sub(1), MSIX, [2])
    assert device_fds(sim) == {}  # it lives in the process: nothing to store
    described = export_device(sim)
    assert described["kind"] == "sim" and described["name"] == sim.name
    carried = Carried({"device": described})
    carried.eventfds = {key: EventFd.adopt(os.dup(fd)) for key, fd in table.eventfds().items()}
    table.detach()
    with pytest.raises(HandoverError, match="simulated device, not a real one"):
        adopt_device(carried, lambda: pytest.fail("must not open"), "0000:03:00.0")
    new_sim = adopt_device(carried, lambda: SimDevice(msix_vectors=16, noresize=True), None)
    assert isinstance(new_sim, SimDevice) and new_sim.calls == []
    assert new_sim.active_index() is MSIX and new_sim.assigned_fd(MSIX, 2) is not None
    new_sim.raise_irq(MSIX, 2, 3)  # the new "hardware" signals the carried eventfd
    assert carried.eventfds[(MSIX, 2)].read() == 3
    new_sim.close()
    carried.close()


def sim_state_host(state: dict[str, object]) -> dict[str, int]:
    host = state["host"]
    assert isinstance(host, list)
    return {"msi": 0, "msix": len(host)}


def test_a_vector_whose_eventfd_did_not_arrive_gets_a_fresh_one(
    old: tuple[SimDevice, VectorTable],
) -> None:
    sim, table = old
    a = Sub(1)
    table.subscribe(a, MSIX, [1, 2])
    state = exported(table, a)
    carried = {(MSIX, 1): EventFd.adopt(os.dup(table.eventfds()[(MSIX, 1)]))}
    table.detach()
    new = VectorTable(sim, PythonHotLoop())  # the same device: it still has both assigned
    a2 = Sub(1)
    assert new.import_state(state, carried, {1: a2}.get) == [(MSIX, 2)]
    sim.raise_irq(MSIX, 2, 3)
    pump(new)
    assert a2.counts == {2: 3}
    new.close()
    close_poller(new)


def test_a_vector_nobody_came_back_for_is_released(old: tuple[SimDevice, VectorTable]) -> None:
    sim, table = old
    seven = Sub(7)
    table.subscribe(seven, MSIX, [4])
    state = exported(table, seven)
    carried = {k: EventFd.adopt(os.dup(fd)) for k, fd in table.eventfds().items()}
    table.detach()
    new = VectorTable(sim, PythonHotLoop())
    nobody: dict[int, Sub] = {}
    new.import_state(state, carried, nobody.get)
    assert new.enabled(MSIX) == [] and sim.assigned_fd(MSIX, 4) is None
    new.close()
    close_poller(new)


async def test_a_session_carries_its_unsent_counts_and_identity() -> None:
    here, there = socket.socketpair()
    latency = LatencyHistogram()
    session = PythonSession(trio.socket.from_stdlib_socket(here), 4, _peer(), latency)
    session.name, session.greeted, session.requests = "collector", True, 9
    session.add_pending(MSIX, 3, 10)
    session.add_pending(MSIX, 1, 2)
    await session.hold_output()
    state = msgpack.unpackb(msgpack.packb(session.export_state()), strict_map_key=False)
    adopted_sock = trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(here.fileno())))
    session.sock.close()
    new = PythonSession.from_state(adopted_sock, state, latency)
    assert (new.id, new.name, new.greeted, new.requests) == (4, "collector", True, 9)
    assert new.pending_total() == 12
    await new.flush()
    raw = there.recv(4096)
    assert msgpack.unpackb(raw) == [2, "irq", ["msix", [1, 2, 3, 10]]]
    new.sock.close()
    there.close()


@pytest.mark.parametrize("kind", ["python", "native"])
async def test_a_restored_session_writes_resized_before_the_counts(kind: str) -> None:
    """A grow's ``resized`` and the loopback trigger's count, both still unsent at
    the hand-over: in the next process (with either hot loop) ``resized`` comes first."""
    state = {
        "id": 1,
        "name": "c",
        "greeted": True,
        "requests": 1,
        "delivered": 0,
        "notifications": 0,
        "connected_for": 1.0,
        "outbox": [],
        "pending": [[int(MSIX), 5, 1]],
        "resized": [[int(MSIX), [5], True]],
    }
    here, there = socket.socketpair()
    sock = trio.socket.from_stdlib_socket(here)
    native = NativeHotLoop() if kind == "native" else None
    session: Session
    if native is None:
        session = PythonSession(sock, 1, _peer(), LatencyHistogram())
    else:
        session = NativeSession(sock, 1, _peer(), LatencyHistogram(), native.hot)
    try:
        session.restore(state)
        await session.flush()
        unpacker = msgpack.Unpacker()
        unpacker.feed(there.recv(4096))
        assert [message[1] for message in unpacker] == ["resized", "irq"]
    finally:
        session.close_output()
        if native is not None:
            native.close()
        sock.close()
        there.close()


def _peer() -> PeerCredentials:
    return PeerCredentials(os.getpid(), os.getuid(), os.getgid())


def test_the_state_memfd_is_sealed_and_versioned() -> None:
    fd = write_state({"next_id": 3})
    with pytest.raises(PermissionError):
        os.write(fd, b"x")
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
    assert read_state(fd) == {"version": 1, "next_id": 3}
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    bad = os.memfd_create("x")
    os.write(bad, msgpack.packb({"version": 99}))
    with pytest.raises(HandoverError, match="version 99"):
        read_state(bad)
