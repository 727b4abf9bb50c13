"""sd_notify in process: readiness, status, the watchdog (a stuck dispatcher trips it), reload."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog.testing
import trio
import trio.testing

from irqd.config import ServerConfig, SimConfig
from irqd.device.base import IrqIndex
from irqd.device.sim import SimDevice
from irqd.errors import ConfigError
from irqd.hotpath.native import NativeHotLoop
from irqd.hotpath.python import PollLoop
from irqd.logsetup import current_level, set_log_level
from irqd.process.activation import InheritedFds, check_listener, inherited_fds, split_fd_names
from irqd.process.sdnotify import Notifier, watchdog_interval
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqproto.notifications import ShutdownNotification
from irqproto.trio_client import open_client

from .fakesystemd import FakeManager

# Runs once with the native hot loop and once with the Trio one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("hot_loop")

WATCHDOG_S = 2.0


class Manager(FakeManager):
    """The fake service manager, which also closes the daemons' notifiers it made."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._notifiers: list[Notifier] = []

    def notifier(self) -> Notifier:
        """A daemon's sd_notify client for this manager; closed with it."""
        notifier = Notifier(str(self.path))
        self._notifiers.append(notifier)
        return notifier

    def close(self) -> None:
        for notifier in self._notifiers:
            notifier.close()
        super().close()


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    manager = Manager(tmp_path / "notify")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        yield manager
        nursery.cancel_scope.cancel()
    manager.close()


async def start(nursery: trio.Nursery, manager: Manager, config: ServerConfig) -> Daemon:
    daemon: Daemon = await nursery.start(
        lambda task_status: serve(
            config,
            notifier=manager.notifier(),
            inherited=InheritedFds(),
            task_status=task_status,
        )
    )
    return daemon


def sim_config(tmp_path: Path, **kw: object) -> ServerConfig:
    return ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=8), **kw)  # type: ignore[arg-type]


def watchdog_pings(manager: Manager) -> int:
    return sum(m.get("WATCHDOG") == "1" for m in manager.messages)


async def test_ready_after_listening_and_status_follows_changes(
    tmp_path: Path,
    manager: Manager,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    daemon = await start(nursery, manager, sim_config(tmp_path))
    ready = await manager.wait_for("READY", "1")
    assert ready["STATUS"] == "sim: 0 clients, 0 vectors enabled, 0 host vectors, msix dynamic"
    # READY came after the socket listens: connecting works at once.
    async with open_client(str(daemon.config.socket_path), client_name="c") as client:
        mark = len(manager.messages)
        await client.subscribe("msix", [0, 1])
        status = await manager.wait_for("STATUS", since=mark)
        assert status["STATUS"] == "sim: 1 client, 2 vectors enabled, 2 host vectors, msix dynamic"


async def test_the_watchdog_is_fed_while_the_dispatch_loop_goes_round(
    tmp_path: Path,
    manager: Manager,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    daemon = await start(nursery, manager, sim_config(tmp_path))
    # An idle device: the heartbeat eventfd alone makes the loop go round.
    await trio.sleep(WATCHDOG_S * 5)
    assert watchdog_pings(manager) >= 8
    assert daemon.rounds >= 8


async def test_a_stuck_dispatch_loop_trips_the_watchdog(
    tmp_path: Path,
    manager: Manager,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    stuck = trio.Event()

    async def hung(self: PollLoop) -> None:
        # As if blocked for good somewhere in the loop: the rest of the daemon runs on.
        await stuck.wait()

    # The daemon's own loop (and the Python hot loop, which is one too).
    monkeypatch.setattr(PollLoop, "run", hung)
    with structlog.testing.capture_logs() as logs:
        daemon = await start(nursery, manager, sim_config(tmp_path))
        async with open_client(str(daemon.config.socket_path), client_name="c") as client:
            await client.stats()  # the control plane still answers...
        await trio.sleep(WATCHDOG_S * 5)
    # ...but systemd hears nothing and restarts the service after WatchdogSec.
    assert watchdog_pings(manager) == 0
    assert [e["event"] for e in logs].count("watchdog.stalled") == 1


async def test_a_stuck_hot_thread_trips_the_watchdog(
    tmp_path: Path,
    manager: Manager,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    # As if the thread never came back from a round: the Trio loop goes on.
    monkeypatch.setattr(NativeHotLoop, "responds", lambda self, timeout: False)
    with structlog.testing.capture_logs() as logs:
        daemon = await start(nursery, manager, sim_config(tmp_path))
        if not isinstance(daemon.hot, NativeHotLoop):
            pytest.skip("the Trio hot loop has no thread of its own")
        await trio.sleep(WATCHDOG_S * 5)
    assert daemon.rounds >= 4  # the Trio dispatch loop was fine
    assert watchdog_pings(manager) == 0
    assert [e["event"] for e in logs].count("watchdog.stalled") == 1


def test_watchdog_interval_honours_the_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "500", "WATCHDOG_PID": pid}) == 0.0005
    assert watchdog_interval({}) is None


async def test_notifier_reaches_an_abstract_socket_and_passes_fds() -> None:
    name = f"irqd-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    notifier = Notifier("@" + name)
    r, w = os.pipe()
    try:
        assert notifier.store_fd(r, "a-pipe")
        data, ancdata, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(4))
        assert data == b"FDSTORE=1\nFDNAME=a-pipe"
        ((_, _, payload),) = ancdata
        passed = int.from_bytes(payload[:4], "little")
        os.write(w, b"x")
        assert os.read(passed, 1) == b"x"
        os.close(passed)
        assert notifier.status("two\nlines")
        assert receiver.recv(4096) == b"STATUS=two lines"
    finally:
        os.close(r)
        os.close(w)
        notifier.close()
        receiver.close()
    assert not Notifier(None).ready("x")


async def test_sighup_reloads_the_level_and_says_what_it_refused(
    tmp_path: Path, manager: Manager, nursery: trio.Nursery
) -> None:
    path = tmp_path / "irqd.toml"
    path.write_text('[log]\nlevel = "info"\n')
    daemon = await start(nursery, manager, sim_config(tmp_path, config_path=path))
    path.write_text('[log]\nlevel = "debug"\n[msix]\nstrategy = "grow"\n')
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        os.kill(os.getpid(), signal.SIGHUP)
        await daemon.wait_reloads(1)
    (reloaded,) = [e for e in logs if e["event"] == "config.reloaded"]
    assert reloaded["changed"] == ["log.level=debug"]
    assert reloaded["refused"] == ["msix.strategy"]
    assert current_level() == "debug" and daemon.config.log_level == "debug"
    path.write_text("[log]\nlevel = 3\n")
    with structlog.testing.capture_logs() as logs:
        daemon.reload()
    (failed,) = logs
    assert failed["event"] == "config.reload_failed"
    assert "log.level: must be one of" in failed["error"]
    set_log_level("info")


async def test_sigterm_tells_clients_disables_everything_and_ends_in_bounded_time(
    tmp_path: Path, manager: Manager, autojump_clock: trio.testing.MockClock
) -> None:
    sim = SimDevice(msix_vectors=8)
    config = sim_config(tmp_path)
    async with trio.open_nursery() as nursery:
        done = trio.Event()
        status: list[int] = []

        async def run(task_status: trio.TaskStatus[Daemon]) -> None:
            status.append(
                await serve(
                    config,
                    device=sim,
                    notifier=manager.notifier(),
                    inherited=InheritedFds(),
                    task_status=task_status,
                )
            )
            done.set()

        daemon: Daemon = await nursery.start(run)
        path = str(daemon.config.socket_path)
        async with open_client(path, client_name="reader") as reader:
            await reader.subscribe("msix", [0, 1])
            # A client that never reads: its socket fills, shutdown must not wait for it.
            stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            stuck.connect(path)
            start = trio.current_time()
            os.kill(os.getpid(), signal.SIGTERM)
            note = await reader.next_notification()
            assert isinstance(note, ShutdownNotification)
            await done.wait()
            stuck.close()
            end = trio.current_time()
            # The manager reads what the daemon sent on its own time.
            with trio.fail_after(5):
                while manager.store:
                    await manager.wait_for("FDSTOREREMOVE", since=len(manager.messages))
    assert status == [0]
    assert end - start <= config.stop_timeout
    # STOPPING=1, and in the end (the device closed) the live fd store emptied:
    # nothing is left for a later start to adopt.
    assert any("STOPPING" in m for m in manager.messages)
    assert "FDSTOREREMOVE" in manager.messages[-1]
    assert manager.store == []
    # Every index disabled before the device was closed, and the socket file gone.
    assert sim.active_index() is None
    assert sim.calls[-1].count == 0 and sim.calls[-1].index == IrqIndex.MSIX
    assert not config.socket_path.exists()


def test_a_pid_that_is_not_ours_gets_no_fds() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert not inherited_fds(env)
    assert env == {}  # read once, then gone, as sd_listen_fds(unset_environment=1)


def test_a_socket_named_after_its_unit_does_not_shift_the_stored_names() -> None:
    # systemd's default name for a socket unit's fd is the unit's name, colons and all.
    names = "vfio-irqd@0000:00:05.0.socket:listener:live-state:client-3"
    assert split_fd_names(names, 4) == [
        "vfio-irqd@0000:00:05.0.socket",
        "listener",
        "live-state",
        "client-3",
    ]
    assert split_fd_names("a:b", 2) == ["a", "b"]
    assert split_fd_names("a", 2) == ["a"]
    assert split_fd_names("x:y:z", 1) == ["x:y:z"]


def test_only_a_listening_unix_stream_socket_is_taken() -> None:
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(ConfigError, match="ListenStream"):
        check_listener(dgram.detach())
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ConfigError, match="not listening"):
        check_listener(idle.detach())
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ConfigError, match="not a socket"):
        check_listener(r)
    good = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    good.bind(f"\0irqd-test-listener-{os.getpid()}")
    good.listen()
    taken = check_listener(good.detach())
    assert not taken.get_inheritable()
    taken.close()


def test_a_manager_that_stops_reading_does_not_hang_the_daemon(tmp_path: Path) -> None:
    # Nobody reads this socket: once its queue (max_dgram_qlen) is full a send
    # waits; it must give up instead of blocking the daemon for good.
    path = tmp_path / "notify"
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(path))
    notifier = Notifier(str(path))
    sent = 0
    try:
        while notifier.status(f"message {sent}"):
            sent += 1
            assert sent < 100_000, "every send went through: the queue never filled"
    finally:
        notifier.close()
        deaf.close()
    # The queue took some, then a send timed out instead of waiting for good.
    assert sent > 0
