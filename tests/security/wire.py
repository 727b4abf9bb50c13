"""A raw msgpack-RPC peer for tests that must send what no library would."""

from __future__ import annotations

import os
import socket
from typing import Any

import msgpack
import trio

from irqd.server.daemon import Daemon


class RawPeer:
    """A Trio Unix socket speaking bare msgpack: no validation, no library."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.notifications: list[Any] = []
        self.closed = False

    @classmethod
    async def connect(cls, path: str) -> RawPeer:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def request(self, msgid: int, method: str, params: list[Any]) -> None:
        await self.send(msgpack.packb([0, msgid, method, params]))

    async def next_message(self) -> Any | None:
        """The next message, or ``None`` once the daemon closed (EOF or reset)."""
        while True:
            for message in self.unpacker:
                return message
            if self.closed:
                return None
            try:
                data = await self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
            self.unpacker.feed(data)

    async def response(self, msgid: int) -> Any | None:
        """``[error, result]`` of response ``msgid``; ``None`` if the daemon closed first."""
        while True:
            message = await self.next_message()
            if message is None:
                return None
            if message[0] == 1 and message[1] == msgid:
                return [message[2], message[3]]
            self.notifications.append(message)

    async def call(self, msgid: int, method: str, params: list[Any]) -> Any:
        await self.request(msgid, method, params)
        answer = await self.response(msgid)
        assert answer is not None, f"daemon closed instead of answering {method}"
        return answer

    async def hello(self, name: str = "raw") -> None:
        error, _ = await self.call(0, "hello", [{"client": name, "protocol": 1}])
        assert error is None, error

    async def wait_closed(self) -> None:
        """Read (and keep) everything until the daemon closes the connection."""
        while await self.next_message() is not None:
            pass


async def wait_until_sessions(daemon: Daemon, count: int) -> None:
    """Until the daemon serves exactly ``count`` clients (a departure is asynchronous)."""
    with trio.fail_after(10):
        await daemon.wait_sessions(count)


def open_fds() -> set[int]:
    """This process's open fd numbers."""
    return {int(name) for name in os.listdir("/proc/self/fd")}
