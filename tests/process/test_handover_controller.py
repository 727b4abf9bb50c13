"""The hand-over controller in process: its states, a called-off hand-over, a stored one.

tests/process/test_handover.py runs the whole restart between two processes;
here the daemon runs in the test's own, so its state can be looked at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog.testing
import trio

from irqd.config import ServerConfig, SimConfig
from irqd.device.base import IrqIndex
from irqd.process.activation import InheritedFds
from irqd.process.fdstore import read_state
from irqd.process.sdnotify import Notifier
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqd.server.handover import HandoverState
from irqproto.notifications import IrqNotification
from irqproto.trio_client import TrioClient, open_client

from .fakesystemd import FakeManager

# Runs once with the native hot loop and once with the Trio one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("hot_loop")

#: Guards against a hang; nothing waits for a fixed time.
DEADLINE = 10


async def counts(client: TrioClient, total: int) -> None:
    """Read ``irq`` notifications until they add up to ``total`` (more fails)."""
    got = 0
    while got < total:
        note = await client.next_notification()
        if isinstance(note, IrqNotification):
            got += sum(count for _, count in note.counts)
    assert got == total


async def start(nursery: trio.Nursery, tmp_path: Path, notifier: Notifier) -> Daemon:
    config = ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=8))
    daemon: Daemon = await nursery.start(
        lambda task_status: serve(
            config, notifier=notifier, inherited=InheritedFds(), task_status=task_status
        )
    )
    return daemon


async def test_a_hand_over_the_store_never_took_is_called_off_and_serving_goes_on(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # A $NOTIFY_SOCKET nobody listens on: every FDSTORE=1 fails.
    notifier = Notifier(str(tmp_path / "nobody"))
    try:
        daemon = await start(nursery, tmp_path, notifier)
        path = str(daemon.config.socket_path)
        assert daemon.handover.state.name == "SERVING"  # (not narrowed for what follows)
        async with open_client(path, client_name="a") as a:
            await a.subscribe("msix", [0])
            (efd,) = await a.sim_eventfds("msix", [0])
            try:
                os.eventfd_write(efd, 3)
                await counts(a, 3)
                with structlog.testing.capture_logs() as logs, trio.fail_after(DEADLINE):
                    assert not await daemon.hand_over()
                assert "handover.called_off" in [e["event"] for e in logs]
                assert daemon.handover.state is HandoverState.CALLED_OFF
                assert daemon.handover.serving
                # The parked client reads again, both loops forward again, its
                # output was given back...
                os.eventfd_write(efd, 4)
                with trio.fail_after(DEADLINE):
                    await counts(a, 4)
                    assert (await a.unsubscribe("msix", [0]))["vectors"] == [0]
                # ...and new connections are taken again.
                with trio.fail_after(DEADLINE):
                    async with open_client(path, client_name="b") as b:
                        await b.device_info()
            finally:
                os.close(efd)
    finally:
        notifier.close()


async def test_a_stored_hand_over_leaves_the_device_and_the_clients_to_the_next_process(
    tmp_path: Path, nursery: trio.Nursery, manager: FakeManager
) -> None:
    notifier = Notifier(str(manager.path))
    try:
        daemon = await start(nursery, tmp_path, notifier)
        async with open_client(str(daemon.config.socket_path), client_name="a") as a:
            await a.subscribe("msix", [1])
            buffer = await a.dma_alloc(2 * 4096, name="ring")
            os.close(buffer["fd"])
            with trio.fail_after(DEADLINE):
                assert await daemon.hand_over()
            assert daemon.handover.state is HandoverState.STORED
            assert not daemon.handover.serving
            names = [name for name, _ in manager.store]
            assert names[0] == "listener" and names[-1] == "state"
            assert {"vector-2-1", "client-1"} <= set(names)
            # The client was parked, not dropped: its connection is the next process's.
            assert list(daemon.sessions) == [1]
            # This process forgot the vector without de-assigning it: the
            # stored eventfd still receives its interrupts.
            assert daemon.table.vectors() == []
            assert daemon.device.assigned_fd(IrqIndex.MSIX, 1) is not None
            # The DMA buffer stays mapped in the container the next process
            # adopts; the state tells it whose buffer it is and where.
            state = read_state(os.dup(dict(manager.store)["state"]))
            assert state["dma"] == daemon.handlers.broker.export_state()
            (stored,) = state["dma"]
            assert (stored["owner"], stored["iova"], stored["size"]) == (
                1,
                buffer["iova"],
                2 * 4096,
            )
    finally:
        notifier.close()
