"""Every server limit: its default, its error, and that it costs nobody else anything.

Timeouts run on Trio's MockClock with ``autojump_threshold=0``: whenever every
task waits, the clock jumps to the next deadline, so a 300-second idle limit
takes no real time and no test sleeps.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog.testing
import trio
import trio.testing

from irqd.config import HotLoop, ServerConfig, SimConfig
from irqd.errors import ConfigError
from irqd.limits import ServerLimits
from irqd.process.service import bind_listener, serve
from irqd.server.daemon import Daemon
from irqproto.errors import RpcError
from irqproto.trio_client import open_client

from .wire import RawPeer, wait_until_sessions

# Runs once with the native hot loop and once with the Trio one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("hot_loop")


def config(tmp_path: Path, **limits: Any) -> ServerConfig:
    return ServerConfig(
        socket_path=tmp_path / "irqd.sock",
        sim=SimConfig(msix_vectors=16),
        server_limits=ServerLimits(**limits),
    )


async def start(nursery: trio.Nursery, cfg: ServerConfig) -> Daemon:
    daemon: Daemon = await nursery.start(serve, cfg)
    return daemon


def reasons(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "client.disconnected"]


def test_defaults_are_the_documented_ones() -> None:
    limits = ServerLimits()
    assert (limits.max_clients, limits.max_vectors_per_request, limits.max_outstanding) == (
        256,
        2048,
        32,
    )
    assert (limits.hello_timeout, limits.idle_timeout) == (10.0, 300.0)
    assert limits.message.max_message_size == 65536


async def test_a_client_that_never_says_hello_is_closed_after_hello_timeout(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    daemon = await start(nursery, config(tmp_path, hello_timeout=10))
    with structlog.testing.capture_logs() as logs:
        silent = await RawPeer.connect(str(daemon.config.socket_path))
        started = trio.current_time()
        await silent.wait_closed()
        assert trio.current_time() - started == pytest.approx(10)
        silent.close()
        await wait_until_sessions(daemon, 0)
    assert reasons(logs) == ["limit: no hello within 10 s"]


async def test_idle_means_holding_nothing_and_asking_nothing(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    daemon = await start(nursery, config(tmp_path, idle_timeout=60))
    path = str(daemon.config.socket_path)
    with structlog.testing.capture_logs() as logs:
        idle = await RawPeer.connect(path)
        await idle.hello("idle")
        waiting = await RawPeer.connect(path)
        await waiting.hello("waiting")
        error, _ = await waiting.call(1, "subscribe", ["msix", [0]])
        assert error is None
        await idle.wait_closed()
        # Ten idle periods later, the subscribed client is still served: it is
        # waiting for interrupts, which may take as long as they like.
        await trio.sleep(600)
        assert [s.name for s in daemon.sessions.values()] == ["waiting"]
        error, _ = await waiting.call(2, "trigger", ["msix", [0]])
        assert error is None
        # Once it holds nothing, the idle clock runs from its last request.
        error, _ = await waiting.call(3, "unsubscribe", ["msix", [0]])
        assert error is None
        before = trio.current_time()
        await waiting.wait_closed()
        assert trio.current_time() - before == pytest.approx(60)
        irq = [m for m in waiting.notifications if m[0] == 2 and m[1] == "irq"]
        assert irq == [[2, "irq", ["msix", [0, 1]]]]
        for peer in (idle, waiting):
            peer.close()
        await wait_until_sessions(daemon, 0)
    assert reasons(logs) == ["limit: idle for 60 s"] * 2


async def test_too_many_clients_get_a_clear_error_and_room_comes_back(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    daemon = await start(nursery, config(tmp_path, max_clients=2))
    path = str(daemon.config.socket_path)
    async with open_client(path, client_name="a") as a, open_client(path, client_name="b"):
        with pytest.raises(RpcError) as info:
            async with open_client(path, client_name="c"):
                pass
        assert info.value.code == "E2BIG"
        assert "at most 2" in info.value.message
        assert (await a.stats())["clients"].__len__() == 2
    await wait_until_sessions(daemon, 0)
    async with open_client(path, client_name="c") as c:
        assert (await c.device_info())["msix"]["count"] == 16


async def test_vectors_per_request(tmp_path: Path, nursery: trio.Nursery) -> None:
    daemon = await start(nursery, config(tmp_path, max_vectors_per_request=4))
    async with open_client(str(daemon.config.socket_path)) as client:
        await client.subscribe("msix", [0, 1, 2, 3])
        for call in (
            client.subscribe("msix", [4, 5, 6, 7, 8]),
            client.unsubscribe("msix", [0, 1, 2, 3, 4]),
            client.trigger("msix", [0, 1, 2, 3, 4]),
        ):
            with pytest.raises(RpcError) as info:
                await call
            assert info.value.code == "EINVAL"
            assert info.value.message == "params[1]: at most 4 vectors per request, got 5"
        assert (await client.unsubscribe("msix", [0, 1, 2, 3]))["vectors"] == [0, 1, 2, 3]


def pipelined(count: int, first: int = 1) -> bytes:
    return b"".join(msgpack.packb([0, first + i, "device.info", []]) for i in range(count))


async def test_outstanding_requests(tmp_path: Path, nursery: trio.Nursery) -> None:
    daemon = await start(nursery, config(tmp_path, max_outstanding=8))
    path = str(daemon.config.socket_path)
    # Up to the limit in one go: every request answered, in order.
    fine = await RawPeer.connect(path)
    await fine.hello()
    await fine.send(pipelined(8))
    ids = []
    for _ in range(8):
        message = await fine.next_message()
        assert message is not None
        ids.append(message[1])
    assert ids == list(range(1, 9))
    # One more than the limit, unread: the client is pipelining past it.
    with structlog.testing.capture_logs() as logs:
        flood = await RawPeer.connect(path)
        await flood.hello()
        await flood.send(pipelined(9))
        await flood.wait_closed()
        flood.close()
        await wait_until_sessions(daemon, 1)
    assert reasons(logs) == ["limit (E2BIG): more than 8 requests outstanding"]
    assert [m[1] for m in flood.notifications] == []  # closed without answers
    # The other client did not notice.
    assert (await fine.call(100, "device.info", []))[0] is None
    fine.close()


# -- the listening socket ---------------------------------------------------------------------


def test_socket_is_created_with_its_final_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mode right after bind() is the final one: no chmod, so no looser window."""
    seen: list[int] = []
    real = socket.socket

    class Spy(real):  # type: ignore[misc,valid-type]
        def bind(self, address: Any) -> None:
            super().bind(address)
            seen.append(stat.S_IMODE(os.stat(address).st_mode))

    monkeypatch.setattr(socket, "socket", Spy)
    before = os.umask(0o022)
    try:
        for mode in (0o660, 0o600, 0o666):
            path = tmp_path / f"{mode:o}.sock"
            with bind_listener(path, mode):
                assert stat.S_IMODE(path.stat().st_mode) == mode
        assert os.umask(0o022) == 0o022  # restored
    finally:
        os.umask(before)
    assert seen == [0o660, 0o600, 0o666]


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "irqd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays; nothing listens
    with structlog.testing.capture_logs() as logs, bind_listener(path, 0o660) as sock:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        conn, _ = sock.accept()
        conn.close()
        client.close()
    assert [e["event"] for e in logs] == ["socket.stale_removed"]


def test_a_live_socket_is_never_stolen(tmp_path: Path) -> None:
    path = tmp_path / "irqd.sock"
    with bind_listener(path, 0o660) as live:
        inode = path.stat().st_ino
        with pytest.raises(ConfigError, match="another daemon is listening"):
            bind_listener(path, 0o660)
        assert path.stat().st_ino == inode
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))  # still the live one's
        conn, _ = live.accept()
        conn.close()
        client.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        bind_listener(tmp_path / "file", 0o660)


# -- out of fds: accept backs off and recovers ----------------------------------------------


@pytest.fixture
def low_fd_daemon(tmp_path: Path, hot_loop: HotLoop) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A daemon process whose RLIMIT_NOFILE leaves room for a few clients only."""
    path = str(tmp_path / "irqd.sock")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    proc = subprocess.Popen(
        [sys.executable, "-m", "irqd", "serve", "--sim", "--socket", path, "--hot-loop", hot_loop],
        preexec_fn=limit,  # noqa: PLW1509  only setrlimit, before exec
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        for line in proc.stdout or ():
            if "daemon.ready" in line:
                break
        yield proc, path
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_accept_out_of_fds_backs_off_and_recovers(
    low_fd_daemon: tuple[subprocess.Popen[str], str],
) -> None:
    proc, path = low_fd_daemon
    assert proc.stdout is not None
    hello = msgpack.packb([0, 0, "hello", [{"client": "fd", "protocol": 1}]])
    clients = []
    try:
        # More clients than fds: the backlog takes them, accept() runs out.
        for _ in range(60):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            sock.sendall(hello)
            clients.append(sock)
        for line in proc.stdout:
            if "accept.backoff" in line:
                assert "EMFILE" in line
                break
        # Those accepted before the fds ran out answer; the rest wait in the
        # backlog. (A slow answer only moves a client to the second group,
        # which is served later all the same.)
        readable, _, _ = select.select(clients, [], [], 1.0)
        served = [c for c in clients if c in readable and answered(c, timeout=10)]
        waiting = [c for c in clients if c not in served]
        assert served
        assert waiting
        assert proc.poll() is None
        # Room again: everyone left in the backlog is served, and the daemon says so.
        for sock in served:
            sock.close()
        # Each one leaves once answered: the backlog may hold more clients than
        # there is room for at once (how many depends on the fds the hot loop
        # itself holds).
        for sock in waiting:
            assert answered(sock, timeout=10)
            sock.close()
        for line in proc.stdout:
            if "accept.recovered" in line:
                break
        assert proc.poll() is None
    finally:
        for sock in clients:
            sock.close()


def answered(sock: socket.socket, *, timeout: float) -> bool:
    """Whether the hello response arrives within ``timeout``."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return False
    message = msgpack.unpackb(data, raw=False)
    assert message[:3] == [1, 0, None]
    return True
