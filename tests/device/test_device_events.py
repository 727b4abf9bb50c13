"""REQ and ERR on the simulated device: the daemon's own eventfds, end to end.

The same behaviour is checked against the real kernel in tests/vm (writing the
device's ``driver/unbind`` there makes the kernel signal REQ).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from irqd.config import ServerConfig
from irqd.device.base import IrqIndex
from irqd.device.sim import SimDevice
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqproto.errors import Disconnected, RpcError
from irqproto.messages import Notification
from irqproto.notifications import (
    DeviceLostNotification,
    ErrNotification,
    IrqNotification,
    TypedNotification,
)
from irqproto.trio_client import TrioClient, open_client

# Runs once with the native hot loop and once with the Trio one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("hot_loop")

#: Generous: nothing here waits on time, only on the daemon's answers.
DEADLINE = 10


async def next_other_than_irq(client: TrioClient) -> TypedNotification | Notification:
    while True:
        note = await client.next_notification(timeout=DEADLINE)
        if not isinstance(note, IrqNotification):
            return note


@pytest.fixture
def sim() -> SimDevice:
    return SimDevice(msix_vectors=8)


async def start(nursery: trio.Nursery, tmp_path: Path, sim: SimDevice) -> tuple[Daemon, trio.Event]:
    """The daemon on ``sim``; the event is set when ``serve`` returned on its own."""
    stopped = trio.Event()
    config = ServerConfig(socket_path=tmp_path / "irqd.sock")

    async def run(task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(config, device=sim, task_status=task_status)
        stopped.set()

    daemon: Daemon = await nursery.start(run)
    return daemon, stopped


async def test_req_and_err_are_armed_with_the_daemons_own_eventfds(
    tmp_path: Path, nursery: trio.Nursery, sim: SimDevice
) -> None:
    daemon, _ = await start(nursery, tmp_path, sim)
    req = sim.assigned_fd(IrqIndex.REQ, 0)
    err = sim.assigned_fd(IrqIndex.ERR, 0)
    assert req is not None and err is not None
    assert daemon.events.armed == [IrqIndex.REQ, IrqIndex.ERR]
    # Nothing of the table's: no client asked for anything yet.
    assert daemon.table.vectors() == []


async def test_err_is_forwarded_to_every_client(
    tmp_path: Path, nursery: trio.Nursery, sim: SimDevice
) -> None:
    daemon, _ = await start(nursery, tmp_path, sim)
    path = str(daemon.config.socket_path)
    async with open_client(path, client_name="a") as a, open_client(path, client_name="b") as b:
        await a.subscribe("msix", [0])  # subscribed or not, both are told
        sim.raise_irq(IrqIndex.ERR, 0, n=3)
        for client in (a, b):
            note = await next_other_than_irq(client)
            assert isinstance(note, ErrNotification)
            assert note.count == 3
        # The daemon carries on.
        assert (await b.device_info())["msix"]["count"] == 8


async def test_req_tells_every_client_releases_everything_and_stops(
    tmp_path: Path, nursery: trio.Nursery, sim: SimDevice
) -> None:
    daemon, stopped = await start(nursery, tmp_path, sim)
    path = str(daemon.config.socket_path)
    async with open_client(path, client_name="a") as a, open_client(path, client_name="b") as b:
        await a.subscribe("msix", [0, 1])
        await b.subscribe("msix", [1])
        sim.request_release()
        sim.request_release()  # the kernel asks again and again: harmless
        for client in (a, b):
            note = await next_other_than_irq(client)
            assert note == DeviceLostNotification("request")
            with pytest.raises(Disconnected), trio.fail_after(DEADLINE):
                await next_other_than_irq(client)
    with trio.fail_after(DEADLINE):
        await stopped.wait()
    # De-assigned and closed: the kernel side holds nothing of the daemon's.
    assert sim.active_index() is None
    assert sim.assigned_fd(IrqIndex.REQ, 0) is None
    assert sim.assigned_fd(IrqIndex.ERR, 0) is None
    with pytest.raises(OSError):
        sim.irq_info(IrqIndex.MSIX)  # closed
    assert daemon.own_loop.dispatcher.closed


async def test_a_request_after_req_gets_enodev_not_a_device_call(
    tmp_path: Path, nursery: trio.Nursery, sim: SimDevice
) -> None:
    daemon, stopped = await start(nursery, tmp_path, sim)
    path = str(daemon.config.socket_path)
    async with open_client(path, client_name="a") as a:
        daemon.events.lost.set()  # as the dispatch loop does on REQ
        note = await next_other_than_irq(a)
        assert isinstance(note, DeviceLostNotification)
        calls = len(sim.calls)
        # ENODEV from the closed table, or the connection already closed.
        with pytest.raises((Disconnected, RpcError)):
            await a.subscribe("msix", [2])
        assert len(sim.calls) == calls  # no new work reached the device
    with trio.fail_after(DEADLINE):
        await stopped.wait()


async def test_req_unmaps_every_dma_buffer_before_the_device_is_closed(
    tmp_path: Path, nursery: trio.Nursery, sim: SimDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, stopped = await start(nursery, tmp_path, sim)
    unmapped: list[tuple[int, int]] = []
    real_unmap = sim.dma_unmap

    def unmap(iova: int, size: int) -> int:
        done = real_unmap(iova, size)  # raises once the device is closed
        unmapped.append((iova, size))
        return done

    monkeypatch.setattr(sim, "dma_unmap", unmap)
    async with open_client(str(daemon.config.socket_path), client_name="driver") as a:
        buffer = await a.dma_alloc(4096)
        os.close(buffer["fd"])
        sim.request_release()
        assert await next_other_than_irq(a) == DeviceLostNotification("request")
    with trio.fail_after(DEADLINE):
        await stopped.wait()
    # Unmapped by the daemon while the container was still open, not merely
    # forgotten when the device closed.
    assert unmapped == [(buffer["iova"], 4096)]
    assert daemon.handlers.broker.totals() == {"bytes": 0, "mappings": 0}


async def test_a_removal_seen_after_req_is_what_clients_are_told(
    tmp_path: Path, nursery: trio.Nursery, sim: SimDevice
) -> None:
    # vfio-pci's remove path asks through REQ first; the ``remove`` uevent comes
    # once the daemon let go. With a uevent watcher running, the daemon waits
    # for it (bounded) before telling its clients.
    daemon, stopped = await start(nursery, tmp_path, sim)
    daemon.events.removal_grace = DEADLINE
    async with open_client(str(daemon.config.socket_path), client_name="a") as a:
        sim.request_release()
        with trio.fail_after(DEADLINE):
            while sim.active_index() is not None or sim.assigned_fd(IrqIndex.REQ, 0) is not None:
                await trio.lowlevel.checkpoint()  # the release runs first
        daemon.events.device_gone("unbound")  # the unbind uevent: not a reason to change
        daemon.events.device_gone("removed")
        assert await next_other_than_irq(a) == DeviceLostNotification("removed")
    with trio.fail_after(DEADLINE):
        await stopped.wait()
