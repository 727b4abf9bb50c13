"""A crash never resets the device: the live fd store, its record, and a SIGKILLed daemon.

The test plays systemd (tests/process/fakesystemd.py): it keeps what the
daemon stores, and after a SIGKILL starts the next process with the store as
``$LISTEN_FDS``, as systemd does when it restarts a service that died.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing

from irqd.config import ServerConfig, SimConfig
from irqd.device.sim import SimDevice
from irqd.process import crashstate
from irqd.process.activation import InheritedFds
from irqd.process.crashstate import (
    DATA_START,
    HEADER,
    CrashStateError,
    CrashStateWriter,
    read_crash_state,
)
from irqd.process.fdstore import HandoverError, read_live_state
from irqd.process.livestore import LIVE_STATE_NAME, LiveStore
from irqd.process.sdnotify import Notifier
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqproto.errors import Disconnected
from irqproto.notifications import (
    DeviceLostNotification,
    IrqNotification,
    ResizedNotification,
)
from irqproto.trio_client import TrioClient, open_client

from .fakesystemd import (
    FakeManager,
    NotifyState,
    child_env,
    daemon_argv,
    open_notify_socket,
    restart_argv,
    run_daemons,
)

#: Guards against a hang; nothing waits for a fixed time.
DEADLINE = 30

# -- the crash-consistent record ------------------------------------------------------------


def test_a_record_reads_back_and_an_unchanged_one_is_not_written() -> None:
    writer = CrashStateWriter.create()
    try:
        assert writer.write({"a": 1})
        assert not writer.write({"a": 1})
        assert writer.write({"a": 2, "b": [1, 2]})
        assert read_crash_state(writer.fileno()) == (2, {"a": 2, "b": [1, 2]})
        assert writer.writes == 2
    finally:
        writer.close()


def test_a_new_record_never_overlaps_the_current_one() -> None:
    writer = CrashStateWriter.create()
    try:
        regions: list[tuple[int, int]] = []
        for i, size in enumerate((10, 5000, 100, 100, 9000, 3, 3)):
            assert writer.write({"pad": "x" * size, "i": i})
            raw = os.pread(writer.fileno(), HEADER.size, 0)
            _, _, _, offset, length, _ = HEADER.unpack(raw)
            assert offset >= DATA_START
            if regions:
                last_offset, last_length = regions[-1]
                # Disjoint from the record the header named before.
                assert offset + length <= last_offset or offset >= last_offset + last_length
            regions.append((offset, length))
        # It alternates instead of growing without end.
        assert os.fstat(writer.fileno()).st_size < DATA_START + 3 * 9100
    finally:
        writer.close()


def test_a_writer_killed_before_the_header_leaves_the_previous_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = CrashStateWriter.create()
    try:
        writer.write({"generation": "first"})
        real = crashstate._pwrite_all

        def die_at_the_header(fd: int, data: bytes, offset: int) -> None:
            if offset == 0:
                raise SystemExit("killed")  # the process ends between the two writes
            # And the record itself only half written, as a kill mid-write would.
            real(fd, data[: len(data) // 2], offset)

        monkeypatch.setattr(crashstate, "_pwrite_all", die_at_the_header)
        with pytest.raises(SystemExit):
            writer.write({"generation": "second", "pad": "y" * 3000})
        assert read_crash_state(writer.fileno()) == (1, {"generation": "first"})
        # A process that adopts the file carries on from the record that is whole.
        monkeypatch.setattr(crashstate, "_pwrite_all", real)
        again = CrashStateWriter.adopt(os.dup(writer.fileno()))
        try:
            assert again.write({"generation": "third"})
            assert read_crash_state(again.fileno()) == (2, {"generation": "third"})
        finally:
            again.close()
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("what", "damage"),
    [
        ("empty", lambda fd: None),
        ("short", lambda fd: os.pwrite(fd, b"IRQDLIV1", 0)),
        ("not ours", lambda fd: os.pwrite(fd, b"x" * 4200, 0)),
        ("crc", lambda fd: os.pwrite(fd, b"\xff", DATA_START + 2)),
        ("truncated", lambda fd: os.ftruncate(fd, DATA_START + 3)),
    ],
)
def test_a_damaged_record_is_refused(what: str, damage: Any) -> None:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        if what not in ("empty", "short", "not ours"):
            writer = CrashStateWriter(os.dup(fd))
            writer.write({"version": 1, "pad": "z" * 100})
            writer.close()
        damage(fd)
        with pytest.raises(CrashStateError):
            read_crash_state(fd)
        with pytest.raises(HandoverError):
            read_live_state(fd)
    finally:
        os.close(fd)


def test_a_record_of_another_kind_or_version_is_refused() -> None:
    writer = CrashStateWriter.create()
    try:
        writer.write({"version": 999, "kind": "live"})
        with pytest.raises(HandoverError, match="version"):
            read_live_state(writer.fileno())
        writer.write({"version": 1, "kind": "handover"})
        with pytest.raises(HandoverError, match="kind"):
            read_live_state(writer.fileno())
    finally:
        writer.close()


# -- the live store's order -----------------------------------------------------------------


def _received(raw: socket.socket, state: NotifyState) -> list[dict[str, str]]:
    """Every datagram waiting on ``raw``, acted on as systemd would."""
    got = []
    while select.select([raw], [], [], 0)[0]:
        data, ancdata, _, _ = raw.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        got.append(state.handle(data, ancdata))
    return got


def test_the_store_adds_then_writes_the_state_then_removes(tmp_path: Path) -> None:
    raw = open_notify_socket(tmp_path / "notify")
    state = NotifyState()
    notifier = Notifier(str(tmp_path / "notify"))
    writer = CrashStateWriter.create()
    store = LiveStore(notifier, writer)
    a, b, c = (os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3))
    try:
        seen_at_write: list[list[str]] = []

        def write() -> None:
            seen_at_write.append([m["FDNAME"] for m in _received(raw, state)])
            writer.write({"n": len(seen_at_write)})

        store.sync({"x": a, "y": b}, write)
        assert seen_at_write[-1] == ["x", "y", LIVE_STATE_NAME]
        assert _received(raw, state) == []
        # "y" is gone, "z" is new: added before the state, removed after it.
        store.sync({"x": a, "z": c}, write)
        assert seen_at_write[-1] == ["z"]
        after = _received(raw, state)
        assert after == [{"FDSTOREREMOVE": "1", "FDNAME": "y"}]
        assert state.names() == ["x", LIVE_STATE_NAME, "z"]
        # "x" under a new eventfd: removed first (systemd would ignore a second
        # fd of the same name only if it were the same file; it is not, and two
        # fds of one name must not pile up), then stored again.
        d = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            store.sync({"x": d, "z": c}, write)
            assert [m.get("FDNAME") for m in _received(raw, state)] == []
            assert sorted(state.names()) == sorted(["x", LIVE_STATE_NAME, "z"])
            assert state.ignored == []
        finally:
            os.close(d)
        store.clear()
        _received(raw, state)
        assert state.store == []
    finally:
        for fd in (a, b, c):
            os.close(fd)
        writer.close()
        state.close_store()
        notifier.close()
        raw.close()


def test_the_fake_store_ignores_a_file_it_holds_already(tmp_path: Path) -> None:
    raw = open_notify_socket(tmp_path / "notify")
    state = NotifyState()
    notifier = Notifier(str(tmp_path / "notify"))
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        notifier.store_fd(efd, "one")
        notifier.store_fd(os.dup(efd), "two")  # the same file under another name and number
        other = os.eventfd(0, os.EFD_CLOEXEC)
        notifier.store_fd(other, "three")
        os.close(other)
        _received(raw, state)
        assert state.names() == ["one", "three"]
        assert state.ignored == ["two"]
    finally:
        os.close(efd)
        state.close_store()
        notifier.close()
        raw.close()


# -- a daemon that starts from a bad live state ---------------------------------------------


@pytest.mark.parametrize("content", [b"", b"IRQDLIV1\x01", b"garbage" * 1000])
async def test_a_corrupt_or_short_live_state_is_refused_and_the_daemon_starts_afresh(
    tmp_path: Path, manager: FakeManager, nursery: trio.Nursery, content: bytes
) -> None:
    live = os.memfd_create("bad", os.MFD_CLOEXEC)
    if content:
        os.write(live, content)
    stale = os.eventfd(0, os.EFD_CLOEXEC)
    inherited = InheritedFds({LIVE_STATE_NAME: [live], "vector-2-0": [stale]})
    config = ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=8))
    notifier = Notifier(str(manager.path))
    with (
        structlog.testing.capture_logs() as logs,
        trio.fail_after(DEADLINE),
        contextlib.closing(notifier),
    ):
        daemon: Daemon = await nursery.start(
            lambda task_status: serve(
                config, notifier=notifier, inherited=inherited, task_status=task_status
            )
        )
        ready = await manager.wait_for("READY", "1")
        # The stale names were removed before READY=1 (and before the device opened).
        index = manager.messages.index(ready)
        removed = {m["FDNAME"] for m in manager.messages[:index] if "FDSTOREREMOVE" in m}
        assert {LIVE_STATE_NAME, "vector-2-0"} <= removed
        async with open_client(str(config.socket_path), client_name="a") as a:
            await a.subscribe("msix", [0])
            stats = await a.stats()
            assert stats["lifecycle"] == {"handovers": 0, "crash_recoveries": 0}
        assert daemon.handover.live is not None
        nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
    assert any(e["event"] == "crash.bad_live_state" for e in logs), logs


# -- SIGKILL mid-stream, between processes --------------------------------------------------


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


class Subscriber:
    """A client's received counts and ``resized`` notifications, read all the while."""

    def __init__(self, client: TrioClient, vectors: list[int]) -> None:
        self.client = client
        self.vectors = vectors
        self.got: dict[int, int] = dict.fromkeys(vectors, 0)
        self.resized: list[ResizedNotification] = []
        self.disconnected = False

    async def read(self) -> None:
        try:
            while True:
                note = await self.client.next_notification()
                if isinstance(note, IrqNotification):
                    for vector, count in note.counts:
                        self.got[vector] += count
                elif isinstance(note, ResizedNotification):
                    self.resized.append(note)
        except Disconnected:
            self.disconnected = True


def readable(fd: int) -> bool:
    """Whether an eventfd holds a count (POLLIN), without reading it."""
    return bool(select.select([fd], [], [], 0)[0])


@pytest.mark.parametrize("hot_loop", ["native", "python"])
async def test_sigkill_mid_stream_keeps_clients_vectors_and_dma(
    tmp_path: Path, hot_loop: str
) -> None:
    sock = await run_daemons(
        tmp_path,
        lambda manager, sock, procs: crash_with_clients(manager, sock, tmp_path, procs, hot_loop),
    )
    assert not sock.exists()


async def crash_with_clients(
    manager: FakeManager, sock: Path, tmp_path: Path, procs: list[trio.Process], hot_loop: str
) -> None:
    env = child_env(manager)
    argv = daemon_argv(sock, hot_loop)
    with trio.fail_after(DEADLINE):
        with (tmp_path / "old.log").open("wb") as out:
            old = await trio.lowlevel.open_process([sys.executable, *argv], env=env, stdout=out)
        procs.append(old)
        await manager.wait_for("READY", "1")
        async with (
            open_client(str(sock), client_name="a") as a,
            open_client(str(sock), client_name="b") as b,
            open_client(str(sock), client_name="c") as c,
            trio.open_nursery() as readers,
        ):
            await a.subscribe("msix", [0, 1, 2])
            await b.subscribe("msix", [1, 2, 3])
            await c.subscribe("msix", [0])
            buffer = await a.dma_alloc(2 * 4096, name="queue")
            os.close(buffer["fd"])
            ids = {cl["name"]: cl["id"] for cl in (await a.stats())["clients"]}
            hw = dict(zip(range(4), await a.sim_eventfds("msix", range(4)), strict=True))
            subs = [Subscriber(a, [0, 1, 2]), Subscriber(b, [1, 2, 3])]
            for sub in subs:
                readers.start_soon(sub.read)
            fired = dict.fromkeys(hw, 0)
            stop = trio.Event()

            async def fire() -> None:
                while not stop.is_set():
                    for vector, fd in hw.items():
                        os.eventfd_write(fd, 1)
                        fired[vector] += 1
                    await trio.sleep(0.0005)  # pacing only: about 2000 rounds a second

            readers.start_soon(fire)
            # Kill it while interrupts flow: once a has seen some of them.
            while subs[0].got[0] < 50:
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(0.001)
            # No checkpoint between these and the kill: exact as of the signal.
            fired_before = dict(fired)
            got_before = [dict(sub.got) for sub in subs]
            old.send_signal(signal.SIGKILL)
            assert await old.wait() == -signal.SIGKILL

            # Like systemd: the next process gets copies, the store keeps its own.
            store = manager.copy_store()
            names = [name for name, _ in store]
            assert len(names) == len(set(names)), names
            # (The simulated device has no fds of its own: it lives in the process.)
            assert {"listener", "live-state", "guard", "event-req"} <= set(names)
            assert {f"client-{i}" for i in ids.values()} <= set(names)
            assert {f"vector-2-{v}" for v in range(4)} <= set(names)
            assert "state" not in names
            # c was (say) writing a message when the daemon died: its guard byte is set.
            by_name = dict(store)
            _, record = read_crash_state(by_name["live-state"])
            slots = {s["id"]: s["guard_slot"] for s in record["sessions"]}
            assert None not in slots.values(), slots
            os.pwrite(by_name["guard"], b"\x01", slots[ids["c"]])
            restart, extra = restart_argv(argv, store)
            fds = [fd for _, fd in store]
            mark = len(manager.messages)
            with (tmp_path / "new.log").open("wb") as out:
                new = await trio.lowlevel.open_process(
                    [sys.executable, *restart], env=env | extra, pass_fds=fds, stdout=out
                )
            procs.append(new)
            for fd in fds:
                os.close(fd)
            await manager.wait_for("READY", "1", since=mark)
            # c is closed (its stream may have been cut); it reconnects and is served.
            with pytest.raises(Disconnected):
                while True:
                    await c.next_notification()
            async with open_client(str(sock), client_name="c again") as c2:
                await c2.subscribe("msix", [0])
            # Interrupts go on after the restart: until a has seen more of them.
            target = subs[0].got[0] + 50
            while subs[0].got[0] < target:
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(0.001)
            stop.set()
            # Settle: every eventfd read by the daemon, and everything it credited
            # written (a response comes after everything pending before it).
            while any(readable(fd) for fd in hw.values()):
                await a.stats()
            for sub in subs:
                await sub.client.stats()
                await sub.client.stats()
            await trio.testing.wait_all_tasks_blocked()
            stats = await a.stats()
            readers.cancel_scope.cancel()

        lost: dict[str, dict[int, int]] = {}
        for sub, before in zip(subs, got_before, strict=True):
            assert not sub.disconnected
            # possible_loss, once, naming the subscriber's vectors.
            assert len(sub.resized) == 1, sub.resized
            assert sub.resized[0].index == "msix" and sub.resized[0].possible_loss
            assert sorted(sub.resized[0].vectors) == sub.vectors
            for v in sub.vectors:
                # Never more than fired (+1: the loopback after the resized).
                assert sub.got[v] <= fired[v] + 1, (v, sub.got, fired)
                # Everything fired from the kill on arrives; only what the dead
                # process had read and not yet written may be lost.
                assert sub.got[v] >= before[v] + (fired[v] - fired_before[v]), (v, sub.got)
                lost.setdefault(sub.client.client_name, {})[v] = fired[v] + 1 - sub.got[v]
        print(f"\n{hot_loop}: fired {fired} (at the kill {fired_before}); lost per client {lost}")
        # Still armed, the same eventfds (nothing re-assigned), DMA accounted.
        adopted = [e for e in log_events(tmp_path / "new.log") if e["event"] == "handover.adopted"]
        assert adopted and adopted[0]["vectors_reassigned"] == [], adopted
        assert sorted(adopted[0]["clients"]) == sorted([ids["a"], ids["b"]])
        assert stats["lifecycle"] == {"handovers": 0, "crash_recoveries": 1}
        assert stats["dma"]["bytes"] == 2 * 4096
        by_id = {cl["id"]: cl for cl in stats["clients"]}
        assert by_id[ids["a"]]["dma_bytes"] == 2 * 4096
        enabled = {v["vector"] for v in stats["vectors"] if v["index"] == "msix"}
        assert {0, 1, 2, 3} <= enabled
        for fd in hw.values():
            os.close(fd)
        new.send_signal(signal.SIGTERM)
        assert await new.wait() == 0
        # A clean stop leaves nothing in the store for a later start to adopt.
        assert manager.names() == []


# -- the device given back: nothing of it may stay in the store ------------------------------


async def test_giving_the_device_back_empties_the_store_before_clients_are_told(
    tmp_path: Path, manager: FakeManager, nursery: trio.Nursery
) -> None:
    config = ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=8))
    notifier = Notifier(str(manager.path))
    with trio.fail_after(DEADLINE), contextlib.closing(notifier):
        daemon: Daemon = await nursery.start(
            lambda task_status: serve(config, notifier=notifier, task_status=task_status)
        )
        await manager.wait_for("READY", "1")
        async with open_client(str(config.socket_path), client_name="a") as a:
            await a.subscribe("msix", [0, 1])
            assert {"vector-2-0", "vector-2-1", "client-1", LIVE_STATE_NAME} <= set(manager.names())
            held = manager.names()
            since = len(manager.messages)
            assert isinstance(daemon.device, SimDevice)
            daemon.device.request_release()  # the kernel's REQ: vfio-pci wants it back
            async for note in a.notifications(timeout=DEADLINE):
                if isinstance(note, DeviceLostNotification):
                    break
            # The store let go of everything (the kernel's unbind waits for
            # systemd's copies of the device fds as much as for the daemon's)...
            for name in held:
                removal = await manager.wait_for("FDNAME", name, since=since)
                assert "FDSTOREREMOVE" in removal
            assert manager.names() == []
            # ...and nothing was stored again afterwards.
            assert not any("FDSTORE" in m for m in manager.messages[since:])
