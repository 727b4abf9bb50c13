"""The Trio client against a scripted server task on a real Unix socket."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from irqproto import (
    Disconnected,
    IrqNotification,
    RemoteProtocolError,
    ResizedNotification,
    RpcError,
)
from irqproto.connection import Connection
from irqproto.messages import Request
from irqproto.trio_client import open_client

from .fake_irqd import CLOSE, FakeServer, Send, serve_trio

Start = Callable[[FakeServer], Awaitable[str]]


@pytest.fixture
def start(tmp_path: Path, nursery: trio.Nursery) -> Start:
    """Start a fake server task; returns the socket path to connect to."""

    async def _start(server: FakeServer) -> str:
        path = str(tmp_path / "irqd.sock")
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen()

        async def run() -> None:
            with listener:
                await serve_trio(listener, server)

        nursery.start_soon(run)
        return path

    return _start


async def test_concurrent_calls_are_routed_by_msgid(start: Start) -> None:
    held: list[Request] = []

    def stats(conn: Connection, req: Request) -> list[Send | str]:
        held.append(req)
        return []

    def device_info(conn: Connection, req: Request) -> list[Send | str]:
        # Answer the later call first, then the one held back.
        return [Send(conn.respond(req, {"device": "x"})), Send(conn.respond(held[0], {"n": 1}))]

    server = FakeServer({"stats": stats, "device.info": device_info})
    results: dict[str, object] = {}
    async with open_client(await start(server), client_name="trio") as client:
        assert client.server_info is not None
        assert client.server_info["server"] == "vfio-irqd fake"

        async def stats_task() -> None:
            results["stats"] = await client.stats()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stats_task)
            await trio.testing.wait_all_tasks_blocked()
            results["info"] = await client.device_info()
    assert results == {"stats": {"n": 1}, "info": {"device": "x"}}
    assert server.requests[0].params == ({"client": "trio", "protocol": 1},)


async def test_interrupts_and_notifications(start: Start) -> None:
    def subscribe(conn: Connection, req: Request) -> list[Send | str]:
        return [
            Send(conn.send_notification("irq", ["msix", [4, 1]])),
            Send(conn.respond(req, {"vectors": [4], "enabled": [], "how": "already"})),
            Send(
                conn.send_notification("resized", ["msix", {"vectors": [4], "possible_loss": True}])
            ),
            Send(conn.send_notification("irq", ["msix", [4, 9]])),
            CLOSE,
        ]

    async with open_client(await start(FakeServer({"subscribe": subscribe}))) as client:
        assert (await client.subscribe("msix", [4]))["how"] == "already"
        assert await client.next_notification() == IrqNotification("msix", ((4, 1),))
        assert await client.next_notification() == ResizedNotification("msix", (4,), True)
        assert [batch async for batch in client.interrupts()] == [
            IrqNotification("msix", ((4, 9),))
        ]
        with pytest.raises(Disconnected):
            await client.stats()


async def test_sim_eventfds_and_claim_hand_over_real_eventfds(start: Start) -> None:
    eventfds = [os.eventfd(0) for _ in range(3)]

    def sim_eventfds(conn: Connection, req: Request) -> list[Send | str]:
        return [Send(conn.respond(req, {"vectors": [1, 0]}), (eventfds[1], eventfds[0]))]

    def claim(conn: Connection, req: Request) -> list[Send | str]:
        return [Send(conn.respond(req, {"vectors": [2]}), (eventfds[2],))]

    server = FakeServer({"sim.eventfds": sim_eventfds, "claim": claim})
    try:
        async with open_client(await start(server)) as client:
            fds = await client.sim_eventfds("msix", [0, 1])
            fds.append(await client.claim("msix", 2))
        for n, fd in enumerate(fds, start=1):
            os.eventfd_write(fd, n)
            os.close(fd)
        assert [os.eventfd_read(fd) for fd in eventfds] == [1, 2, 3]
    finally:
        for fd in eventfds:
            os.close(fd)


async def test_timeout_uses_trio_time_and_raises_timeout_error(
    start: Start, autojump_clock: trio.testing.MockClock
) -> None:
    held: list[Request] = []

    def stats(conn: Connection, req: Request) -> list[Send | str]:
        held.append(req)
        return []

    def device_info(conn: Connection, req: Request) -> list[Send | str]:
        return [Send(conn.respond(held[0], {"late": True})), Send(conn.respond(req, {}))]

    server = FakeServer({"stats": stats, "device.info": device_info})
    async with open_client(await start(server), timeout=30) as client:
        before = trio.current_time()
        with pytest.raises(TimeoutError):
            await client.stats()
        assert trio.current_time() - before == pytest.approx(30)
        assert dict(await client.device_info()) == {}
        with pytest.raises(TimeoutError):
            await client.next_notification(timeout=1)


async def test_errors_from_the_body_come_out_unwrapped(start: Start) -> None:
    denied = FakeServer(
        {"trigger": lambda conn, req: [Send(conn.respond_error(req, "EACCES", "no"))]}
    )
    with pytest.raises(RpcError) as info:
        async with open_client(await start(denied)) as client:
            await client.trigger("msix", [0])
    assert info.value.code == "EACCES"


async def test_garbage_from_the_server_fails_every_waiter(start: Start) -> None:
    async with open_client(
        await start(FakeServer({"stats": lambda conn, req: [Send(b"\xc1")]}))
    ) as client:
        with pytest.raises(RemoteProtocolError):
            await client.stats()
        with pytest.raises(RemoteProtocolError):
            await client.next_notification()


async def test_hello_false(start: Start) -> None:
    server = FakeServer()
    async with open_client(await start(server), hello=False) as client:
        await client.unmask()
    assert [(r.method, r.params) for r in server.requests] == [("unmask", ("intx",))]
