"""A scripted stand-in for vfio-irqd, to test the clients over real sockets.

The script is sans-IO (a :class:`Connection` plus per-method handlers); two thin
runners put it on a socket: a thread for the blocking client, a Trio task for
the Trio client (a thread would let the autojump clock skip ahead while the
server works).
"""

from __future__ import annotations

import array
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from irqproto import NEED_DATA, Connection, ConnectionClosed, Request


@dataclass(frozen=True)
class Send:
    """One sendmsg: bytes and the fds attached to them."""

    data: bytes
    fds: tuple[int, ...] = ()


CLOSE: Final = "close"  # a handler step that hangs up
Step = Send | str
Handler = Callable[[Connection, Request], list[Step]]

HELLO_RESULT: Final = {"protocol": 1, "server": "vfio-irqd fake", "device": {"device": "fake"}}


def reply(result: Any) -> Handler:
    """A handler that answers every request with ``result``."""
    return lambda conn, req: [Send(conn.respond(req, result))]


@dataclass
class FakeServer:
    """Answers requests with its handlers (``{}`` by default) and records them."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    conn: Connection = field(default_factory=Connection)

    def on_data(self, data: bytes) -> list[Step]:
        """Steps to perform after receiving ``data`` (``b""`` = EOF)."""
        self.conn.receive_data(data)
        steps: list[Step] = []
        while (event := self.conn.next_event()) is not NEED_DATA:
            if isinstance(event, ConnectionClosed):
                return [*steps, CLOSE]
            assert isinstance(event, Request)
            self.requests.append(event)
            default = reply(HELLO_RESULT if event.method == "hello" else {})
            steps += self.handlers.get(event.method, default)(self.conn, event)
        return steps


def rights(fds: tuple[int, ...]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def serve_blocking(listener: socket.socket, server: FakeServer) -> None:
    """Serve one connection on a thread."""
    conn, _ = listener.accept()
    with conn:
        while True:
            for step in server.on_data(conn.recv(65536)):
                if step == CLOSE:
                    return
                assert isinstance(step, Send)
                conn.sendmsg([step.data], rights(step.fds))


async def serve_trio(listener: trio.socket.SocketType, server: FakeServer) -> None:
    """Serve one connection as a Trio task."""
    conn, _ = await listener.accept()
    with conn:
        while True:
            for step in server.on_data(await conn.recv(65536)):
                if step == CLOSE:
                    return
                assert isinstance(step, Send)
                await conn.sendmsg([step.data], rights(step.fds))
