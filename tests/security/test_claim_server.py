"""``claim`` and ``unclaim`` over the socket, and fd ownership across the daemon."""

from __future__ import annotations

import array
import os
import socket
from pathlib import Path

import msgpack
import pytest
import trio

from irqd.config import ServerConfig, SimConfig
from irqd.device.base import IrqIndex
from irqd.device.sim import SimDevice
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqproto.errors import RpcError
from irqproto.trio_client import open_client

from .wire import RawPeer, open_fds, wait_until_sessions

# Runs once with the native hot loop and once with the Trio one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("hot_loop")


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> Daemon:
    config = ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=8))
    started: Daemon = await nursery.start(serve, config)
    return started


def sim(daemon: Daemon) -> SimDevice:
    assert isinstance(daemon.device, SimDevice)
    return daemon.device


async def test_claim_hands_over_the_eventfd_and_is_exclusive(daemon: Daemon) -> None:
    path = str(daemon.config.socket_path)
    async with open_client(path, client_name="owner") as owner, open_client(path) as other:
        fd = await owner.claim("msix", 3)
        try:
            sim(daemon).raise_irq(IrqIndex.MSIX, 3, 4)
            await owner.trigger("msix", [3])
            assert os.eventfd_read(fd) == 5
            for attempt in (other.subscribe("msix", [2, 3]), other.claim("msix", 3)):
                with pytest.raises(RpcError) as info:
                    await attempt
                assert info.value.code == "EBUSY"
            stats = await other.stats()
            (vector,) = stats["vectors"]
            assert vector["claimed_by"] == next(
                c["id"] for c in stats["clients"] if c["name"] == "owner"
            )
            assert [c["claims"] for c in stats["clients"] if c["name"] == "owner"] == [
                [["msix", 3]]
            ]
            device = await other.device_info()
            assert (device["msix"]["enabled"], device["msix"]["claimed"]) == ([3], [3])
            # unclaim: taken back and released; now anyone may have it
            await owner.unclaim("msix", 3)
            assert (await other.subscribe("msix", [3]))["enabled"] == [3]
            with pytest.raises(RpcError) as info_error:
                await owner.unclaim("msix", 3)
            assert info_error.value.code == "EINVAL"
        finally:
            os.close(fd)


async def test_disconnect_takes_every_claim_back(daemon: Daemon) -> None:
    path = str(daemon.config.socket_path)
    async with open_client(path, client_name="owner") as owner:
        fds = [await owner.claim("msix", v) for v in (0, 5)]
    for fd in fds:
        os.close(fd)
    await wait_until_sessions(daemon, 0)
    assert daemon.table.enabled(IrqIndex.MSIX) == []
    async with open_client(path) as other:
        assert (await other.subscribe("msix", [0, 5]))["enabled"] == [0, 5]


async def test_every_fd_is_closed_exactly_once(daemon: Daemon) -> None:
    """Claims, sim.eventfds and refused requests leave the daemon's fd table as it was.

    The daemon runs in this process, so its fds are this process's fds.
    """
    path = str(daemon.config.socket_path)
    before = open_fds()
    for _ in range(20):
        async with open_client(path) as a, open_client(path) as b:
            claimed = await a.claim("msix", 1)
            await b.subscribe("msix", [2])
            (fired,) = await b.sim_eventfds("msix", [2])
            with pytest.raises(RpcError):
                await b.claim("msix", 1)
            with pytest.raises(RpcError):
                await b.sim_eventfds("msix", [2, 3])  # 3 has no eventfd: no dup leaks
            os.close(claimed)
            os.close(fired)
        await wait_until_sessions(daemon, 0)
    assert open_fds() == before


async def test_fds_a_client_sends_are_dropped_by_the_kernel(daemon: Daemon) -> None:
    """The daemon reads with recv(): SCM_RIGHTS sent to it are never installed."""
    peer = await RawPeer.connect(str(daemon.config.socket_path))
    await peer.hello()
    before = open_fds()
    junk = [os.eventfd(0) for _ in range(5)]
    try:
        message = msgpack.packb([0, 1, "device.info", []])
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", junk).tobytes())]
        await peer.sock.sendmsg([message], rights)
        error, _ = await peer.response(1) or [None, None]
        assert error is None
    finally:
        for fd in junk:
            os.close(fd)
    assert open_fds() == before
    peer.close()
