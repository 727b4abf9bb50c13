"""The daemon end to end on the simulated device: real Unix sockets, real eventfds."""

from __future__ import annotations

import array
import os
import socket
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog.testing
import trio

from irqd.config import HotLoop, MsixStrategy, ServerConfig, SimConfig
from irqd.device.base import IrqIndex
from irqd.hotpath.native import NativeHotLoop
from irqd.hotpath.native_session import NativeSession
from irqd.hotpath.python import PythonHotLoop
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqproto.errors import Disconnected, RpcError
from irqproto.notifications import IrqNotification, ResizedNotification, ShutdownNotification
from irqproto.trio_client import TrioClient, open_client

# Every test here runs once with the native hot loop and once with the Trio one.
pytestmark = pytest.mark.usefixtures("hot_loop")


async def start_daemon(nursery: trio.Nursery, config: ServerConfig) -> Daemon:
    daemon: Daemon = await nursery.start(serve, config)
    return daemon


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> Daemon:
    config = ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=16))
    return await start_daemon(nursery, config)


def sock_path(daemon: Daemon) -> str:
    return str(daemon.config.socket_path)


async def collect(client: TrioClient, expected: dict[int, int], index: str = "msix") -> None:
    """Read ``irq`` notifications until the totals reach ``expected``.

    Fails past it, and fails if the stream ends first: a daemon that hangs up
    instead of delivering must not pass.
    """
    got: dict[int, int] = {}
    while got != expected:
        try:
            batch = await client.next_notification()
        except Disconnected:
            break
        if not isinstance(batch, IrqNotification):
            continue
        assert batch.index == index
        for vector, count in batch.counts:
            got[vector] = got.get(vector, 0) + count
            assert got[vector] <= expected.get(vector, 0), (got, expected)
    else:
        return
    raise AssertionError(f"the daemon ended the stream at {got}, before {expected}")


async def fire_from_another_process(path: str, count: int, vectors: list[int]) -> None:
    """`vfio-irqd sim fire`: writes the vector eventfds as the kernel would."""
    await trio.run_process(
        [
            sys.executable,
            "-m",
            "irqd",
            "sim",
            "fire",
            "--socket",
            path,
            "--count",
            str(count),
            *map(str, vectors),
        ],
        capture_stdout=True,
    )


async def test_counts_are_exact_with_several_clients_and_concurrent_firing(
    daemon: Daemon,
) -> None:
    path = sock_path(daemon)
    plan = {"a": [0, 1, 2], "b": [1, 2, 3], "c": [3]}
    n = 2000
    async with (
        open_client(path, client_name="a") as a,
        open_client(path, client_name="b") as b,
        open_client(path, client_name="c") as c,
    ):
        clients = {"a": a, "b": b, "c": c}
        for name, vectors in plan.items():
            await clients[name].subscribe("msix", vectors)
        async with trio.open_nursery() as nursery:
            for name, vectors in plan.items():
                nursery.start_soon(collect, clients[name], dict.fromkeys(vectors, n))
            # Two firing processes at once, overlapping on vector 1... 2.
            nursery.start_soon(fire_from_another_process, path, n // 2, [0, 1, 2, 3])
            nursery.start_soon(fire_from_another_process, path, n // 2, [0, 1, 2, 3])
        # Nothing more arrives: unsubscribe flushes everything before it answers.
        for name, vectors in plan.items():
            await clients[name].unsubscribe("msix", vectors)
        stats = await a.stats()
        assert all(client["pending"] == 0 for client in stats["clients"])


async def test_the_chosen_hot_loop_reads_the_vectors(daemon: Daemon, hot_loop: HotLoop) -> None:
    path = sock_path(daemon)
    async with open_client(path, client_name="a") as a:
        await a.subscribe("msix", [0, 5])
        fds = set(daemon.table.eventfds().values())
        await fire_from_another_process(path, 50, [0, 5])
        await collect(a, {0: 50, 5: 50})
        assert daemon.hot.name == hot_loop.value
        assert all(fd in daemon.hot and fd not in daemon.own_loop.dispatcher for fd in fds)
        # The daemon's own loop read none of them: it polls only its own eventfds.
        assert daemon.own_loop.dispatcher.stats.events == 0
        assert daemon.hot.rounds > 0
        if isinstance(daemon.hot, PythonHotLoop):
            assert daemon.hot.dispatcher.stats.events > 0
        else:
            assert isinstance(daemon.hot, NativeHotLoop)
        dispatch = (await a.stats())["dispatch"]
        assert dispatch["hot_loop"] == hot_loop.value
        assert list(dispatch) == ["rounds", "events", "native", "hot_loop"] + (
            ["hot_rounds"] if hot_loop is HotLoop.NATIVE else []
        )


async def test_subscribe_and_unsubscribe_racing_full_rate_firing_count_every_interrupt_once(
    daemon: Daemon,
) -> None:
    """The hot loop reads eventfds while the table changes subscriber lists: a
    count read twice or lost shows up in the steady subscriber's total."""
    path = sock_path(daemon)
    fired = 20000
    async with (
        open_client(path, client_name="steady") as steady,
        open_client(path, client_name="churn") as churn,
    ):
        await steady.subscribe("msix", [0])
        cycles = 0
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def fire() -> None:
                    await fire_from_another_process(path, fired, [0])
                    done.set()

                nursery.start_soon(fire)
                while not done.is_set() or cycles == 0:
                    await churn.subscribe("msix", [0])
                    await churn.unsubscribe("msix", [0])
                    cycles += 1
            await collect(steady, {0: fired})
        # Everything the churning client was owed is in front of its last answer.
        churned = 0
        while True:
            try:
                note = await churn.next_notification(timeout=0)
            except TimeoutError:
                break
            churned += sum(count for _, count in getattr(note, "counts", ()))
        assert 0 <= churned <= fired
        stats = await steady.stats()
        (vector,) = [v for v in stats["vectors"] if v["vector"] == 0]
        assert vector["count"] == fired
        assert cycles > 0


async def test_a_client_that_stops_reading_delays_nobody(daemon: Daemon) -> None:
    path = sock_path(daemon)
    async with open_client(path, client_name="fast") as fast:
        stuck = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await stuck.connect(path)
        with stuck:
            await raw_call(stuck, 1, "hello", [{"client": "stuck", "protocol": 1}])
            await raw_call(stuck, 2, "subscribe", ["msix", [0]])
            stuck_session = next(s for s in daemon.sessions.values() if s.name == "stuck")
            # The smallest send buffer the kernel allows fills after a few hundred
            # notifications, so the daemon's writes to it block from then on.
            stuck_session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            await fast.subscribe("msix", [0])
            (efd,) = await fast.sim_eventfds("msix", [0])
            rounds = 3000
            try:
                for _ in range(rounds):
                    os.eventfd_write(efd, 1)
                    await collect(fast, {0: 1})
            finally:
                os.close(efd)
            # Everything the stuck client missed is one coalesced counter.
            assert stuck_session.pending_total() > 0
            assert stuck_session.pending_counters() == 1
            # When it reads again, its total is exact too.
            total = await raw_read_irq_total(stuck, until=rounds)
            assert total == rounds


async def test_a_client_that_shut_its_read_side_is_disconnected(daemon: Daemon) -> None:
    """Its socket fails on the daemon's first write: the session ends and its
    vector is released, whichever loop did the writing."""
    path = sock_path(daemon)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    with sock:
        await raw_call(sock, 1, "hello", [{"client": "half", "protocol": 1}])
        await raw_call(sock, 2, "subscribe", ["msix", [0]])
        sock.shutdown(socket.SHUT_RD)
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            # The first write to it fails (EPIPE), whichever loop does it.
            daemon.table.trigger(IrqIndex.MSIX, [0])
            await daemon.wait_sessions(0)
    (gone,) = [e for e in logs if e["event"] == "client.disconnected"]
    assert gone["reason"].startswith("socket error")
    assert daemon.table.enabled(IrqIndex.MSIX) == []


async def test_a_failure_while_a_client_leaves_takes_only_that_client(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sock_path(daemon)

    def broken_drop(subscriber: object) -> None:
        raise RuntimeError("a bug in the vector table")

    with structlog.testing.capture_logs() as logs:
        async with open_client(path, client_name="first") as first:
            await first.subscribe("msix", [0])
            (session,) = daemon.sessions.values()
            monkeypatch.setattr(daemon.table, "drop", broken_drop)
        with trio.fail_after(10):
            await daemon.wait_sessions(0)
    assert [e["event"] for e in logs].count("client.cleanup_failed") == 1
    if isinstance(daemon.hot, NativeHotLoop):
        # Its socket is closed, so the hot loop must have let go of it.
        assert isinstance(session, NativeSession)
        with pytest.raises(KeyError):
            daemon.hot.hot.client_stats(session.client_id)
    monkeypatch.undo()
    async with open_client(path, client_name="second") as second:
        await second.subscribe("msix", [1])
        await fire_from_another_process(path, 3, [1])
        await collect(second, {1: 3})


async def test_a_plain_msgpack_client_gets_exact_counts(daemon: Daemon) -> None:
    """No irqproto: only msgpack and a socket, as a client in another language would."""
    path = sock_path(daemon)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    with sock:
        hello = await raw_call(sock, 7, "hello", [{"client": "plain", "protocol": 1}])
        assert hello["protocol"] == 1
        assert hello["device"]["msix"]["count"] == 16
        result = await raw_call(sock, 8, "subscribe", ["msix", [4, 5]])
        assert result == {"vectors": [4, 5], "enabled": [4, 5], "how": "dynamic"}
        fds = await raw_call_fds(sock, 9, "sim.eventfds", ["msix", [4, 5]], nfds=2)
        try:
            for _ in range(50):
                os.eventfd_write(fds[0], 1)
            os.eventfd_write(fds[1], 7)
        finally:
            for fd in fds:
                os.close(fd)
        assert await raw_read_irq_total(sock, until=57) == 57


async def test_errors_answer_the_request_and_keep_the_connection(daemon: Daemon) -> None:
    path = sock_path(daemon)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    with sock:
        error = await raw_call(sock, 1, "subscribe", ["msix", [0]], expect_error=True)
        assert error[0] == "EPROTO"
        await raw_call(sock, 2, "hello", [{"client": "e", "protocol": 1}])
        assert (await raw_call(sock, 3, "no.such", [], expect_error=True))[0] == "ENOSYS"
        bad = await raw_call(sock, 4, "subscribe", ["msix", [0, "x"]], expect_error=True)
        assert bad[0] == "EINVAL"
        assert "vectors[1]" in bad[1] or "[1]" in bad[1]
        out = await raw_call(sock, 5, "subscribe", ["msix", [99]], expect_error=True)
        assert out[0] == "EINVAL"
        assert "out of range" in out[1]
        nofd = await raw_call(sock, 6, "sim.eventfds", ["msix", [3]], expect_error=True)
        assert nofd[0] == "EINVAL"
        # still usable
        assert (await raw_call(sock, 7, "subscribe", ["msix", [0]]))["how"] == "dynamic"


async def test_garbage_from_one_client_closes_only_that_client(daemon: Daemon) -> None:
    path = sock_path(daemon)
    async with open_client(path, client_name="good") as good:
        await good.subscribe("msix", [0])
        bad = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await bad.connect(path)
        with bad:
            await bad.send(b"\xc1" * 16)  # 0xc1 is never valid msgpack
            assert await bad.recv(100) == b""
        await good.trigger("msix", [0])
        await collect(good, {0: 1})


async def test_grow_on_a_noresize_kernel_tells_subscribers(tmp_path: Path) -> None:
    config = ServerConfig(
        socket_path=tmp_path / "irqd.sock",
        sim=SimConfig(msix_vectors=8, noresize=True),
        msix_strategy=MsixStrategy.PREARM,
        msix_prearm=2,
    )
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config)
        path = sock_path(daemon)
        async with open_client(path, client_name="a") as a, open_client(path) as b:
            assert (await a.subscribe("msix", [1]))["how"] == "prearm"
            info = await b.device_info()
            assert info["msix"]["noresize"] is True
            assert info["msix_strategy"] == "prearm"
            assert (await b.subscribe("msix", [6]))["how"] == "resize"
            first = await a.next_notification()
            assert first == ResizedNotification("msix", (1,), True)
            # ...then the loopback trigger makes it look at its device
            second = await a.next_notification()
            assert isinstance(second, IrqNotification)
            assert second.counts == ((1, 1),)
            stats = await a.stats()
            assert stats["host_vectors"]["msix"] == 7
        nursery.cancel_scope.cancel()


async def test_errors_from_the_table_reach_the_client_as_rpc_errors(daemon: Daemon) -> None:
    path = sock_path(daemon)
    async with open_client(path, client_name="a") as a, open_client(path, client_name="b") as b:
        await a.subscribe("intx", [0])
        with pytest.raises(RpcError) as info:
            await b.subscribe("intx", [0])
        assert info.value.code == "EBUSY"
        with pytest.raises(RpcError) as info:
            await b.subscribe("msix", [0])
        assert info.value.code == "EBUSY"


async def test_disconnect_releases_vectors(daemon: Daemon) -> None:
    path = sock_path(daemon)
    async with open_client(path, client_name="a") as a:
        await a.subscribe("msix", [2, 3])
    with trio.fail_after(5):
        await daemon.wait_sessions(0)
    assert daemon.table.enabled(IrqIndex.MSIX) == []
    async with open_client(path, client_name="b") as b:
        info = await b.device_info()
        assert info["msix"]["enabled"] == []


async def test_shutdown_is_announced(daemon: Daemon) -> None:
    async with open_client(sock_path(daemon), client_name="a") as a:
        await a.subscribe("msix", [0])
        await daemon.shutdown("test")
        note = await a.next_notification()
        assert note == ShutdownNotification("test")


# -- a raw msgpack-RPC client, as in docs/protocol.md ----------------------------------------


async def raw_call(
    sock: trio.socket.SocketType,
    msgid: int,
    method: str,
    params: list[Any],
    *,
    expect_error: bool = False,
) -> Any:
    await sock.send(msgpack.packb([0, msgid, method, params]))
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    while True:
        data = await sock.recv(65536)
        assert data, "daemon closed the connection"
        unpacker.feed(data)
        for message in unpacker:
            if message[0] == 1 and message[1] == msgid:
                if expect_error:
                    assert message[2] is not None
                    return message[2]
                assert message[2] is None, message[2]
                return message[3]


async def raw_call_fds(
    sock: trio.socket.SocketType, msgid: int, method: str, params: list[Any], *, nfds: int
) -> list[int]:
    await sock.send(msgpack.packb([0, msgid, method, params]))
    unpacker = msgpack.Unpacker(raw=False)
    fds: list[int] = []
    space = socket.CMSG_SPACE(nfds * 4)
    while True:
        data, ancdata, _flags, _addr = await sock.recvmsg(65536, space)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        unpacker.feed(data)
        for message in unpacker:
            if message[0] == 1 and message[1] == msgid:
                assert message[2] is None
                assert len(fds) == nfds
                return fds


async def raw_read_irq_total(sock: trio.socket.SocketType, *, until: int) -> int:
    unpacker = msgpack.Unpacker(raw=False)
    total = 0
    with trio.fail_after(10):
        while total < until:
            data = await sock.recv(65536)
            assert data
            unpacker.feed(data)
            for message in unpacker:
                if message[0] == 2 and message[1] == "irq":
                    flat = message[2][1]
                    total += sum(flat[1::2])
    return total


async def test_a_client_leaving_with_unread_data_is_an_ordinary_disconnect(
    daemon: Daemon,
) -> None:
    path = sock_path(daemon)
    async with open_client(path, client_name="stays") as stays:
        await stays.subscribe("msix", [0])
        with structlog.testing.capture_logs() as logs:
            leaver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await leaver.connect(path)
            with leaver:
                await raw_call(leaver, 1, "hello", [{"client": "leaver", "protocol": 1}])
                await raw_call(leaver, 2, "subscribe", ["msix", [0]])
                await stays.trigger("msix", [0])
                await collect(stays, {0: 1})
                # The leaver's irq notification is unread in its buffer now:
                # closing makes the kernel reset the connection (ECONNRESET).
            with trio.fail_after(5):
                await daemon.wait_for_sessions(
                    lambda sessions: all(s.name != "leaver" for s in sessions.values())
                )
        events = [entry["event"] for entry in logs]
        assert "client.crashed" not in events
        (gone,) = [e for e in logs if e["event"] == "client.disconnected"]
        assert gone["name"] == "leaver"
        assert gone["reason"].startswith(("socket error", "closed by client")), gone
        # Everyone else goes on, and shutdown still reaches them.
        await stays.trigger("msix", [0])
        await collect(stays, {0: 1})
        await daemon.shutdown("test")
        assert await stays.next_notification() == ShutdownNotification("test")
