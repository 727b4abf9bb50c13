"""The device broker end to end on the simulated device: device.*, dma.*, the driver helper.

Real Unix sockets, real fds over SCM_RIGHTS, real memfds mapped in both
processes' address spaces; the IOMMU is the simulated one (irqd.device.iommu).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing

from irqd.config import ServerConfig, SimConfig
from irqd.device.base import IrqIndex
from irqd.device.dma import IOVA_FLOOR
from irqd.device.iommu import SIM_IOMMU_INFO
from irqd.device.sim import SimDevice
from irqd.errors import ENODEV, IrqdError
from irqd.limits import MIB, LimitsError, ServerLimits
from irqd.policy import AccessPolicy, Action, Principals
from irqd.process.service import serve
from irqd.server.broker import Broker
from irqd.server.daemon import Daemon
from irqd.tools.render import client_dma, render_status
from irqproto.blocking import Client
from irqproto.driver import DeviceAccess, adma_alloc, dma_alloc
from irqproto.errors import RpcError
from irqproto.methods import DmaAllocParams
from irqproto.notifications import IrqNotification, ResizedNotification
from irqproto.trio_client import open_client

# The reset test's notifications go out through either hot loop's sessions.
pytestmark = pytest.mark.usefixtures("hot_loop")

PAGE = 4096
MSI_WINDOW_START = 0xFEE0_0000


async def start(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    limits: ServerLimits | None = None,
    policy: AccessPolicy | None = None,
) -> Daemon:
    config = ServerConfig(
        socket_path=tmp_path / "irqd.sock",
        sim=SimConfig(msix_vectors=8),
        server_limits=limits,
        access_policy=policy,
    )
    daemon: Daemon = await nursery.start(serve, config)
    return daemon


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> Daemon:
    return await start(nursery, tmp_path)


def path(daemon: Daemon) -> str:
    return str(daemon.config.socket_path)


def sim(daemon: Daemon) -> SimDevice:
    assert isinstance(daemon.device, SimDevice)
    return daemon.device


async def rpc_error(code: str, call: Any) -> str:
    with pytest.raises(RpcError) as info:
        await call
    assert info.value.code == code, info.value
    return str(info.value)


# -- device access ----------------------------------------------------------------------


async def test_regions_need_only_connect(daemon: Daemon) -> None:
    async with open_client(path(daemon)) as c:
        regions = await c.device_regions()
    by_name = {r["name"]: r for r in regions}
    assert set(by_name) == {"bar0", "bar2", "config"}
    assert by_name["bar0"] == {
        "index": 0,
        "name": "bar0",
        "size": 16 * 1024,
        "offset": 0,
        "read": True,
        "write": True,
        "mmap": True,
        "sparse": [],
    }
    assert by_name["bar2"]["sparse"] == [[0, 0x1000]]
    assert by_name["config"]["offset"] == 7 << 40 and not by_name["config"]["mmap"]


async def test_device_open_gives_bars_and_config_space(daemon: Daemon) -> None:
    device = sim(daemon)
    with structlog.testing.capture_logs() as logs:
        async with open_client(path(daemon)) as c:
            with await DeviceAccess.aopen(c) as access:
                assert access.fd != device.device_fd()  # a dup, not the daemon's own
                bar0 = access.bar("bar0")
                assert bar0.mapped == [(0, 16 * 1024)]
                bar0.write32(0x10, 0xDEADBEEF)
                bar0.write64(0x20, 0x1122334455667788)
                # The device (the daemon's fd) sees the writes, low half first.
                raw = os.pread(device.device_fd(), 16, 0x10)
                assert struct.unpack_from("<I", raw)[0] == 0xDEADBEEF
                assert bar0.read64(0x20) == 0x1122334455667788
                assert os.pread(device.device_fd(), 8, 0x20) == struct.pack(
                    "<Q", 0x1122334455667788
                )
                # BAR2: the MSI-X table hole is reached with pread/pwrite.
                bar2 = access.bar("bar2")
                assert bar2.mapped == [(0, 0x1000)]
                bar2.write32(0x1004, 7)
                assert os.pread(device.device_fd(), 4, (2 << 40) + 0x1004) == struct.pack("<I", 7)
                assert bar2.read32(0x1004) == 7
                with pytest.raises(ValueError):
                    bar0.read32(0x2)  # not a register boundary
                with pytest.raises(ValueError):
                    bar0.read32(16 * 1024)  # past the end
                # Config space: the sim's header, and bus mastering turned on.
                assert access.config_read(0, 2) == 0x1B36
                assert access.config_read(4, 2) == 0
                access.enable_bus_master()
                assert access.config_read(4, 2) == 0x6
                assert os.pread(device.device_fd(), 2, (7 << 40) + 4) == b"\x06\x00"
                with pytest.raises(ValueError):
                    access.config_read(1, 2)
            assert access.fd == -1
    opened = [e for e in logs if e["event"] == "device.opened"]
    assert opened and opened[0]["pid"] == os.getpid() and opened[0]["uid"] == os.geteuid()
    assert opened[0]["gid"] == os.getegid()


async def test_reset_rearms_and_tells_every_subscriber(daemon: Daemon) -> None:
    device = sim(daemon)
    async with open_client(path(daemon)) as a, open_client(path(daemon)) as b:
        await a.subscribe("msix", [0, 1])
        await b.subscribe("msix", [1])
        calls_before = len(device.calls)
        with structlog.testing.capture_logs() as logs:
            await a.device_reset()
        assert device.resets == 1
        assert any(e["event"] == "device.reset" and e["pid"] == os.getpid() for e in logs)
        # Each subscribed vector was assigned again, one count=1 call each.
        reassigned = [
            (c.start, c.count) for c in device.calls[calls_before:] if c.data and c.data[0] >= 0
        ]
        assert sorted(reassigned) == [(0, 1), (1, 1)]
        for client, vectors in ((a, [0, 1]), (b, [1])):
            note = await client.next_notification(timeout=5)
            assert isinstance(note, ResizedNotification)
            assert (note.index, list(note.vectors), note.possible_loss) == ("msix", vectors, True)
            # Then the loopback trigger: one interrupt per vector, so they look at the device.
            got: dict[int, int] = {}
            while sum(got.values()) < len(vectors):
                irq = await client.next_notification(timeout=5)
                assert isinstance(irq, IrqNotification)
                for vector, count in irq.counts:
                    got[vector] = got.get(vector, 0) + count
            assert got == dict.fromkeys(vectors, 1)
        # Still armed: the hardware's next interrupt arrives.
        device.raise_irq(IrqIndex.MSIX, 1)
        note = await b.next_notification(timeout=5)
        assert isinstance(note, IrqNotification) and note.as_dict() == {1: 1}


@dataclass(frozen=True)
class _Peer:
    pid: int = 1234
    uid: int = 1000
    gid: int = 1000


@dataclass
class FakeClient:
    id: int = 1
    peer: Any = field(default_factory=_Peer)
    resized: list[tuple[IrqIndex, list[int], bool]] = field(default_factory=list)

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        self.resized.append((index, list(vectors), possible_loss))


class NoVectors:
    """A vector table with nothing enabled (the broker's unit tests need no hot loop)."""

    def vectors(self) -> list[Any]:
        return []


def make_broker(**sim: Any) -> tuple[Broker, SimDevice]:
    device = SimDevice(msix_vectors=8, **sim)
    return Broker(device, NoVectors()), device


def test_reset_of_a_device_without_reset_is_enodev() -> None:
    broker, device = make_broker(resettable=False)
    with pytest.raises(IrqdError) as info:
        broker.reset(FakeClient())
    assert info.value.code == ENODEV
    assert "VFIO_DEVICE_FLAGS_RESET" in info.value.message
    assert device.resets == 0
    device.close()


# -- permissions ------------------------------------------------------------------------


async def test_drive_and_dma_are_refused_to_others(tmp_path: Path, nursery: trio.Nursery) -> None:
    someone_else = Principals(uids=frozenset({os.geteuid() + 1}))
    policy = AccessPolicy(connect=Principals(anyone=True), drive=someone_else, dma=someone_else)
    daemon = await start(nursery, tmp_path, policy=policy)
    async with open_client(path(daemon)) as c:
        assert await c.device_regions()  # connect is enough
        message = await rpc_error("EACCES", c.device_open())
        assert "drive" in message
        await rpc_error("EACCES", c.device_reset())
        message = await rpc_error("EACCES", c.dma_alloc(PAGE))
        assert "DMA" in message
        await rpc_error("EACCES", c.dma_free(1))
    assert sim(daemon).resets == 0 and sim(daemon).iommu.mappings == {}


def test_default_policy_gives_drive_and_dma_to_root_and_the_daemon_only() -> None:
    policy = AccessPolicy()
    me, other = _Peer(uid=os.geteuid()), _Peer(uid=os.geteuid() + 1)
    for action in (Action.DRIVE, Action.DMA):
        assert policy.allows(action, _Creds(0), socket_gid=None)
        assert policy.allows(action, _Creds(me.uid), socket_gid=None)
        assert not policy.allows(action, _Creds(other.uid), socket_gid=None)
    parsed = AccessPolicy.from_mapping({"drive": ["uid:4242"], "dma": ["any"]})
    assert parsed.drive == Principals(uids=frozenset({4242}))
    assert parsed.dma.anyone


@dataclass(frozen=True)
class _Creds:
    uid: int
    gid: int = 99999
    groups: frozenset[int] = frozenset()


# -- DMA memory -------------------------------------------------------------------------


async def test_alloc_maps_shared_memory_and_free_unmaps_it(daemon: Daemon) -> None:
    device = sim(daemon)
    broker = daemon.handlers.broker
    async with open_client(path(daemon)) as c:
        with await adma_alloc(c, 2 * PAGE, name="queue") as buf:
            assert (buf.iova, buf.size, buf.name) == (IOVA_FLOOR, 2 * PAGE, "queue")
            assert device.iommu.mappings[buf.iova][0] == 2 * PAGE
            # The daemon's mapping (the vaddr the IOMMU got) is the client's memory.
            (allocation,) = broker.allocations()
            assert allocation.memory is not None
            assert device.iommu.mappings[buf.iova][1] == allocation.memory.vaddr
            buf.mem[100:105] = b"hello"
            assert ctypes.string_at(allocation.memory.vaddr + 100, 5) == b"hello"
            stats = await c.stats()
            assert stats["dma"] == {"bytes": 2 * PAGE, "mappings": 1}
            (me,) = stats["clients"]
            assert me["dma_bytes"] == 2 * PAGE
            second = await c.dma_alloc(PAGE)
            os.close(second["fd"])
            assert second["iova"] == IOVA_FLOOR + 2 * PAGE and second["id"] == buf.id + 1
            await c.dma_free(buf.id)
            assert buf.iova not in device.iommu.mappings
            await rpc_error("EINVAL", c.dma_free(buf.id))  # already freed
            stats = await c.stats()
            assert stats["dma"] == {"bytes": PAGE, "mappings": 1}
            # The freed IOVA is the first free one again.
            third = await c.dma_alloc(PAGE)
            os.close(third["fd"])
            assert third["iova"] == IOVA_FLOOR


async def test_requested_iova_and_iova_max(daemon: Daemon) -> None:
    async with open_client(path(daemon)) as c:
        wanted = 0x4000_0000
        first = await c.dma_alloc(PAGE, iova=wanted)
        os.close(first["fd"])
        assert first["iova"] == wanted
        message = await rpc_error("EINVAL", c.dma_alloc(PAGE, iova=wanted))
        assert "overlaps" in message and hex(wanted) in message
        message = await rpc_error("EINVAL", c.dma_alloc(PAGE, iova=MSI_WINDOW_START))
        assert SIM_IOMMU_INFO.describe_ranges() in message
        message = await rpc_error("EINVAL", c.dma_alloc(PAGE, iova=wanted + 0x800))
        assert "aligned" in message
        # A 28-bit DMA mask (QEMU's edu device): everything below 256 MiB.
        low = await c.dma_alloc(MIB, iova_max=(1 << 28) - 1)
        os.close(low["fd"])
        assert low["iova"] + MIB <= 1 << 28
        message = await rpc_error("EINVAL", c.dma_alloc(1 << 27, iova_max=(1 << 27) - 1))
        assert "iova_max 0x7ffffff" in message
        assert daemon.handlers.broker.totals() == {"bytes": MIB + PAGE, "mappings": 2}


async def test_every_refusal_is_clear_and_leaves_nothing(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    limits = ServerLimits(
        dma_client_bytes=4 * PAGE, dma_total_bytes=6 * PAGE, dma_client_mappings=3
    )
    daemon = await start(nursery, tmp_path, limits=limits)
    broker = daemon.handlers.broker
    async with open_client(path(daemon)) as a, open_client(path(daemon)) as b:
        assert "size" in await rpc_error("EINVAL", a.dma_alloc(0))
        assert "page size 0x1000" in await rpc_error("EINVAL", a.dma_alloc(PAGE + 1))
        assert "dma_client_bytes = 16384" in await rpc_error("E2BIG", a.dma_alloc(5 * PAGE))
        held = [await a.dma_alloc(PAGE) for _ in range(3)]
        assert "dma_client_mappings = 3" in await rpc_error("E2BIG", a.dma_alloc(PAGE))
        more = await b.dma_alloc(2 * PAGE)
        assert "dma_total_bytes = 24576" in await rpc_error("ENOSPC", b.dma_alloc(2 * PAGE))
        # b may not free a's buffer.
        assert "no DMA buffer" in await rpc_error("EINVAL", b.dma_free(held[0]["id"]))
        for result in [*held, more]:
            os.close(result["fd"])
        assert broker.totals() == {"bytes": 5 * PAGE, "mappings": 4}
        assert len(sim(daemon).iommu.mappings) == 4


async def test_a_kernel_refusal_leaves_nothing_half_mapped(daemon: Daemon) -> None:
    device = sim(daemon)
    broker = daemon.handlers.broker
    async with open_client(path(daemon)) as c:
        fds_before = len(os.listdir("/proc/self/fd"))
        device.iommu.fail_next_map = errno.ENOMEM
        message = await rpc_error("EIO", c.dma_alloc(4 * PAGE))
        assert "VFIO_IOMMU_MAP_DMA" in message and "RLIMIT_MEMLOCK" in message
        device.iommu.fail_next_map = errno.EFAULT
        message = await rpc_error("EIO", c.dma_alloc(4 * PAGE))
        assert "Bad address" in message
        assert device.iommu.mappings == {}
        assert broker.totals() == {"bytes": 0, "mappings": 0}
        assert broker.dma._allocator().used == []
        assert len(os.listdir("/proc/self/fd")) == fds_before  # no memfd kept
        # The IOVA that failed is handed out again.
        ok = await c.dma_alloc(4 * PAGE)
        os.close(ok["fd"])
        assert ok["iova"] == IOVA_FLOOR
        # An unmap the kernel refuses keeps the buffer mapped and counted.
        device.iommu.fail_next_unmap = errno.EIO
        await rpc_error("EIO", c.dma_free(ok["id"]))
        assert ok["iova"] in device.iommu.mappings
        assert broker.totals() == {"bytes": 4 * PAGE, "mappings": 1}
        again = await c.dma_alloc(PAGE)
        os.close(again["fd"])
        assert again["iova"] == IOVA_FLOOR + 4 * PAGE  # never over a stuck mapping


async def test_disconnect_frees_only_the_leavers_buffers(daemon: Daemon) -> None:
    device = sim(daemon)
    async with open_client(path(daemon)) as other:
        theirs = await other.dma_alloc(PAGE)
        os.close(theirs["fd"])
        async with open_client(path(daemon)) as c:
            mine = await c.dma_alloc(2 * PAGE)
            os.close(mine["fd"])
        await trio.testing.wait_all_tasks_blocked()
        assert list(device.iommu.mappings) == [theirs["iova"]]
        stats = await other.stats()
        assert stats["dma"] == {"bytes": PAGE, "mappings": 1}


KILLED_CLIENT = textwrap.dedent(
    """
    import sys, time
    from irqproto.blocking import Client
    from irqproto.driver import dma_alloc
    c = Client(sys.argv[1], client_name="doomed")
    bufs = [dma_alloc(c, 4096 * (i + 1)) for i in range(3)]
    bufs[0].mem[0:4] = b"busy"
    print("ready", flush=True)
    time.sleep(60)
    """
)


async def test_sigkill_of_a_client_frees_its_buffers(daemon: Daemon) -> None:
    device = sim(daemon)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", KILLED_CLIENT, path(daemon)], stdout=-1, env=env
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            # A pipe may hand the line over in pieces.
            while not line.endswith(b"\n") and (chunk := await process.stdout.receive_some(6)):
                line += chunk
        assert line == b"ready\n"
        assert daemon.handlers.broker.totals() == {"bytes": 6 * PAGE, "mappings": 3}
        process.send_signal(signal.SIGKILL)
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    with trio.fail_after(10):
        # The daemon offers no event for a client's cleanup; it reads the EOF in its own time.
        while daemon.handlers.broker.totals()["mappings"]:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert device.iommu.mappings == {}


async def test_the_blocking_client_and_the_driver_helper(daemon: Daemon) -> None:
    def drive() -> tuple[int, int, bytes]:
        with Client(path(daemon), client_name="driver") as c:
            with DeviceAccess.open(c) as access:
                access.enable_bus_master()
                command = access.config_read(4, 2)
                access.bar("bar0").write32(0, 0xCAFE)
            with dma_alloc(c, 3 * PAGE) as buf:
                buf.mem[:3] = b"abc"
                c.dma_free(buf.id)
                return command, buf.iova, bytes(buf.mem[:3])

    command, iova, data = await trio.to_thread.run_sync(drive)
    assert command == 0x6 and iova == IOVA_FLOOR and data == b"abc"
    assert os.pread(sim(daemon).device_fd(), 4, 0) == struct.pack("<I", 0xCAFE)
    assert daemon.handlers.broker.totals() == {"bytes": 0, "mappings": 0}


def test_release_after_a_failed_unmap_keeps_the_iova_reserved() -> None:
    broker, device = make_broker()
    client = FakeClient()
    result, fd = broker.alloc(client, DmaAllocParams(PAGE), ServerLimits())
    os.close(fd)
    device.iommu.fail_next_unmap = errno.EIO
    assert broker.release(client) == 0
    assert broker.totals() == {"bytes": PAGE, "mappings": 1}
    result2, fd2 = broker.alloc(FakeClient(id=2), DmaAllocParams(PAGE), ServerLimits())
    os.close(fd2)
    assert result2["iova"] != result["iova"]
    device.close()


async def test_status_and_top_show_dma(daemon: Daemon) -> None:
    async with open_client(path(daemon), client_name="driver") as c:
        held = await c.dma_alloc(2 * PAGE)
        os.close(held["fd"])
        info, stats = await c.device_info(), await c.stats()
    text = render_status(dict(info), dict(stats))
    assert "dma       8 KiB mapped in 1 buffer" in text
    (client,) = stats["clients"]
    assert client_dma(dict(client)) == "   dma 8 KiB"
    limits = ServerLimits.from_mapping({"dma_client_bytes": 4096, "dma_total_bytes": 8192})
    assert (limits.dma_client_bytes, limits.dma_total_bytes) == (4096, 8192)
    with pytest.raises(LimitsError, match="dma_total_bytes"):
        ServerLimits.from_mapping({"dma_total_bytes": 0})


def test_buffers_of_a_closed_device_are_dropped_without_errors() -> None:
    broker, device = make_broker()
    client = FakeClient()
    _, fd = broker.alloc(client, DmaAllocParams(2 * PAGE), ServerLimits())
    os.close(fd)
    device.close()  # the device was lost; the kernel drops the container's mappings
    assert broker.release(client) == 2 * PAGE
    assert broker.totals() == {"bytes": 0, "mappings": 0}


def test_buffers_survive_a_hand_over() -> None:
    old, device = make_broker()
    client = FakeClient(id=7)
    result, fd = old.alloc(client, DmaAllocParams(2 * PAGE, name="sq"), ServerLimits())
    os.close(fd)
    state = old.export_state()
    # The next process: the same device (container), a fresh broker.
    new = Broker(device, NoVectors())
    new.import_state(state)
    assert new.totals() == {"bytes": 2 * PAGE, "mappings": 1}
    assert new.client_bytes(client) == 2 * PAGE
    # Its IOVA is not handed out again, and ids go on from where they were.
    other, fd2 = new.alloc(FakeClient(id=8), DmaAllocParams(PAGE), ServerLimits())
    os.close(fd2)
    assert other["iova"] == result["iova"] + 2 * PAGE and other["id"] == result["id"] + 1
    new.free(client, result["id"])
    assert result["iova"] not in device.iommu.mappings
    device.close()
