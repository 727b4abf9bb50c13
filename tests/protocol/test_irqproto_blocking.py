"""The blocking client against a scripted server on a real Unix socket."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from irqproto import (
    DeviceLostNotification,
    Disconnected,
    IrqNotification,
    RemoteProtocolError,
    ResizedNotification,
    RpcError,
)
from irqproto.blocking import Client
from irqproto.connection import Connection
from irqproto.messages import Request

from .fake_irqd import CLOSE, FakeServer, Send, serve_blocking

Start = Callable[[FakeServer], str]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start a fake server on a thread; returns the socket path to connect to."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def _start(server: FakeServer) -> str:
        path = str(tmp_path / f"irqd{len(threads)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        listeners.append(listener)
        thread = threading.Thread(target=serve_blocking, args=(listener, server), daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield _start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()


def open_eventfds() -> int:
    """Eventfds open in this process (sockets come and go with the server thread)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]"
    return count


def test_hello_then_calls_with_notifications_queued_not_lost(start: Start) -> None:
    def subscribe(conn: Connection, req: Request) -> list[Send | str]:
        return [
            Send(conn.send_notification("irq", ["msix", [0, 2]])),  # before the response
            Send(conn.respond(req, {"vectors": [0, 1], "enabled": [0, 1], "how": "dynamic"})),
            Send(
                conn.send_notification(
                    "resized", ["msix", {"vectors": [0, 1], "possible_loss": True}]
                )
            ),
            Send(conn.send_notification("irq", ["msix", [1, 1, 0, 5]])),
            CLOSE,
        ]

    server = FakeServer({"subscribe": subscribe})
    with Client(start(server), client_name="test") as client:
        assert client.server_info == {
            "protocol": 1,
            "server": "vfio-irqd fake",
            "device": {"device": "fake"},
        }
        result = client.subscribe("msix", range(2))
        assert result["how"] == "dynamic"
        assert list(client.interrupts()) == [
            IrqNotification("msix", ((0, 2),)),
            IrqNotification("msix", ((1, 1), (0, 5))),
        ]
    hello, sub = server.requests
    assert (hello.method, hello.params) == ("hello", ({"client": "test", "protocol": 1},))
    assert (sub.method, sub.params) == ("subscribe", ("msix", [0, 1], {}))


def test_notifications_sees_everything_then_disconnected(start: Start) -> None:
    def stats(conn: Connection, req: Request) -> list[Send | str]:
        return [
            Send(conn.respond(req, {})),
            Send(
                conn.send_notification(
                    "resized", ["msix", {"vectors": [3], "possible_loss": False}]
                )
            ),
            Send(conn.send_notification("device_lost", [{"reason": "removed"}])),
            CLOSE,
        ]

    with Client(start(FakeServer({"stats": stats}))) as client:
        client.stats()
        assert list(client.notifications()) == [
            ResizedNotification("msix", (3,), possible_loss=False),
            DeviceLostNotification("removed"),
        ]
        with pytest.raises(Disconnected):
            client.next_notification()
        with pytest.raises(Disconnected):
            client.stats()


def test_error_response_raises_rpc_error_and_the_connection_goes_on(start: Start) -> None:
    busy = FakeServer(
        {"claim": lambda conn, req: [Send(conn.respond_error(req, "EBUSY", "taken"))]}
    )
    with Client(start(busy)) as client:
        with pytest.raises(RpcError) as info:
            client.claim("msix", 3)
        assert (info.value.code, info.value.message) == ("EBUSY", "taken")
        assert dict(client.device_info()) == {}


def test_sim_eventfds_and_claim_hand_over_real_eventfds(start: Start) -> None:
    eventfds = {v: os.eventfd(0) for v in (0, 1, 2, 5)}

    def sim_eventfds(conn: Connection, req: Request) -> list[Send | str]:
        # Fds in another order than asked, spread over two sendmsg calls as
        # the server must do beyond 253 fds.
        data = conn.respond(req, {"vectors": [2, 0, 1]})
        return [Send(data[:3], (eventfds[2],)), Send(data[3:], (eventfds[0], eventfds[1]))]

    def claim(conn: Connection, req: Request) -> list[Send | str]:
        return [Send(conn.respond(req, {"vectors": [5]}), (eventfds[5],))]

    server = FakeServer({"sim.eventfds": sim_eventfds, "claim": claim})
    try:
        with Client(start(server)) as client:
            fds = client.sim_eventfds("msix", [0, 1, 2])
            claimed = client.claim("msix", 5)
        try:
            for n, fd in enumerate([*fds, claimed], start=1):
                os.eventfd_write(fd, n)
            assert [os.eventfd_read(eventfds[v]) for v in (0, 1, 2, 5)] == [1, 2, 3, 4]
            assert all(os.get_inheritable(fd) is False for fd in fds)
        finally:
            for fd in [*fds, claimed]:
                os.close(fd)
    finally:
        for fd in eventfds.values():
            os.close(fd)


def test_fewer_fds_than_promised_is_a_remote_error_and_leaks_nothing(start: Start) -> None:
    efd = os.eventfd(0)

    def sim_eventfds(conn: Connection, req: Request) -> list[Send | str]:
        return [Send(conn.respond(req, {"vectors": [0, 1]}), (efd,))]

    try:
        before = open_eventfds()
        with Client(start(FakeServer({"sim.eventfds": sim_eventfds}))) as client:
            with pytest.raises(RemoteProtocolError, match="promised 2 fds"):
                client.sim_eventfds("msix", [0, 1])
            with pytest.raises(RemoteProtocolError):
                client.stats()  # the connection stays broken
        assert open_eventfds() == before
    finally:
        os.close(efd)


def test_fds_nobody_takes_are_closed(start: Start) -> None:
    efd = os.eventfd(0)
    stray = FakeServer({"stats": lambda conn, req: [Send(conn.respond(req, {}), (efd, efd))]})
    try:
        before = open_eventfds()
        with Client(start(stray)) as client:
            client.stats()
        assert open_eventfds() == before
    finally:
        os.close(efd)


def test_a_call_that_times_out_ignores_its_late_response(start: Start) -> None:
    late: list[Request] = []

    def stats(conn: Connection, req: Request) -> list[Send | str]:
        late.append(req)
        return []  # no answer for now

    def device_info(conn: Connection, req: Request) -> list[Send | str]:
        return [
            Send(conn.respond(late[0], {"late": True})),
            Send(conn.respond(req, {"on": "time"})),
        ]

    server = FakeServer({"stats": stats, "device.info": device_info})
    with Client(start(server), timeout=0.01) as client:
        # No sleeping: the server never answers within the timeout.
        with pytest.raises(TimeoutError):
            client.stats()
        client.timeout = 5.0
        assert dict(client.device_info()) == {"on": "time"}


def test_next_notification_times_out(start: Start) -> None:
    with Client(start(FakeServer())) as client, pytest.raises(TimeoutError):
        client.next_notification(timeout=0.001)


def test_hello_false_sends_nothing_first(start: Start) -> None:
    server = FakeServer()
    with Client(start(server), hello=False) as client:
        assert client.server_info is None
        client.stats()
    assert [r.method for r in server.requests] == ["stats"]


def test_server_hanging_up_mid_call_is_disconnected(start: Start) -> None:
    server = FakeServer({"stats": lambda conn, req: [CLOSE]})
    with Client(start(server)) as client, pytest.raises(Disconnected):
        client.stats()


def test_garbage_from_the_server_is_a_remote_error(start: Start) -> None:
    server = FakeServer({"stats": lambda conn, req: [Send(b"\xc1")]})
    with Client(start(server)) as client, pytest.raises(RemoteProtocolError):
        client.stats()
