"""What the daemon accepts beyond the letter of msgpack-RPC (docs/protocol.md,
"What the daemon accepts"), and that it stays strict in what it sends.

First the sans-IO rules on :class:`irqproto.Connection`, then the same rules
against a real daemon on the simulated device, spoken with raw msgpack: each
answer (or its absence) is checked, and the connection must stay usable.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog.testing
import trio

from irqd.config import ServerConfig, SimConfig
from irqd.device.base import IrqIndex
from irqd.device.sim import SimDevice
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqproto import (
    EINVAL,
    ENOSYS,
    Connection,
    LocalProtocolError,
    Notification,
    Request,
    RequestError,
    parse_params,
)
from irqproto.messages import MAX_MSGID, undecodable

NOT_UTF8 = b"\xff\xfehello"


def events_of(*messages: Any) -> list[Request | Notification]:
    """The requests and notifications a server-side Connection reads from ``messages``."""
    conn = Connection()
    conn.receive_data(b"".join(msgpack.packb(m, use_bin_type=True) for m in messages))
    out: list[Request | Notification] = []
    while isinstance(event := conn.next_event(), Request | Notification):
        out.append(event)
    return out


# -- the rules, sans-IO -------------------------------------------------------------


def test_a_bin_method_that_is_utf8_is_that_method() -> None:
    assert events_of([0, 1, b"stats", []], [2, b"nvim_set_client_info", ["x"]]) == [
        Request(1, "stats", ()),
        Notification("nvim_set_client_info", ("x",)),
    ]
    assert events_of([0, 2, "ünïcode".encode(), []]) == [Request(2, "ünïcode", ())]


def test_a_bin_method_that_is_not_utf8_is_einval_and_the_stream_goes_on() -> None:
    first, second = events_of([0, 1, NOT_UTF8, []], [0, 2, "stats", []])
    assert isinstance(first, Request) and undecodable(first.method)
    assert second == Request(2, "stats", ())
    with pytest.raises(RequestError) as info:
        parse_params(first.method, first.params)
    assert (info.value.code, info.value.field) == (EINVAL, "method")
    assert "\\xff\\xfe" in info.value.message  # the bytes as received, escaped
    # A str from msgpack can never be undecodable; an unknown one is still ENOSYS.
    assert not undecodable("stats") and not undecodable("ünïcode")
    with pytest.raises(RequestError) as unknown:
        parse_params("reboot", [])
    assert unknown.value.code == ENOSYS


@pytest.mark.parametrize(
    ("params", "read_as"),
    [
        ({"client": "x", "protocol": 1}, ({"client": "x", "protocol": 1},)),
        ("intx", ("intx",)),
        (5, (5,)),
        (None, (None,)),
        (b"raw", (b"raw",)),
        ([], ()),  # an array is the params, never wrapped
        ([["msix", [0]]], (["msix", [0]],)),
    ],
)
def test_params_that_are_not_an_array_are_one_param(params: Any, read_as: tuple[Any, ...]) -> None:
    assert events_of([0, 1, "m", params], [2, "n", params]) == [
        Request(1, "m", read_as),
        Notification("n", read_as),
    ]


def test_a_lone_value_then_meets_the_methods_own_arity() -> None:
    (hello,) = events_of([0, 1, "hello", {"client": "x", "protocol": 1}])
    assert isinstance(hello, Request)
    assert parse_params(hello.method, hello.params).client == "x"  # type: ignore[union-attr]
    (stats,) = events_of([0, 2, "stats", None])
    assert isinstance(stats, Request)
    with pytest.raises(RequestError) as info:
        parse_params(stats.method, stats.params)
    assert (info.value.code, info.value.field) == (EINVAL, "params")


@pytest.mark.parametrize("msgid", [0, 1, 2**31, MAX_MSGID - 1, MAX_MSGID])
def test_every_uint32_request_id_is_answered_with_it(msgid: int) -> None:
    server = Connection()
    server.receive_data(msgpack.packb([0, msgid, "stats", []]))
    request = server.next_event()
    assert request == Request(msgid, "stats", ())
    assert msgpack.unpackb(server.respond(request, {})) == [1, msgid, None, {}]


def test_what_we_send_has_str_methods_and_array_params() -> None:
    conn = Connection()
    _, data = conn.send_request("stats", ())
    sent = msgpack.unpackb(data, raw=True)  # raw: a str would come back as bytes too
    assert sent == [0, 0, b"stats", []]
    assert data[3] == 0xA5  # fixstr of 5 bytes, not bin (0xc4)
    note = conn.send_notification("irq", ("msix", [0, 1]))
    assert note[2] == 0xA3 and msgpack.unpackb(note) == [2, "irq", ["msix", [0, 1]]]
    # Never bin, and never an undecodable name passed through.
    with pytest.raises(LocalProtocolError):
        conn.send(Request(9, b"stats", ()))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        conn.send(Notification(NOT_UTF8.decode("utf-8", "surrogateescape"), ()))


# -- the rules, against a real daemon ---------------------------------------------


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> Daemon:
    config = ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=8))
    started: Daemon = await nursery.start(serve, config)
    return started


class RawPeer:
    """Bare msgpack over a Trio Unix socket: sends exactly what it is given."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        #: Whatever arrived while a response was awaited.
        self.notifications: list[Any] = []

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

    async def next_message(self) -> Any | None:
        """The next message, or ``None`` once the daemon closed."""
        while True:
            for message in self.unpacker:
                return message
            data = await self.sock.recv(65536)
            if not data:
                return None
            self.unpacker.feed(data)

    async def response(self, msgid: int) -> Any | None:
        """``[error, result]`` of response ``msgid``; ``None`` if the daemon closed first."""
        while (message := await self.next_message()) is not None:
            if message[0] == 1 and message[1] == msgid:
                return [message[2], message[3]]
            self.notifications.append(message)
        return None

    async def hello(self) -> None:
        error, _ = await raw_call(self, 0, "hello", [{"client": "raw", "protocol": 1}])
        assert error is None, error


async def raw_call(peer: RawPeer, msgid: int, method: Any, params: Any) -> Any:
    """``[error, result]`` of one request sent exactly as given (bin for bytes)."""
    await peer.send(msgpack.packb([0, msgid, method, params], use_bin_type=True))
    with trio.fail_after(5):
        answer = await peer.response(msgid)
    assert answer is not None, f"daemon closed instead of answering {method!r}"
    return answer


async def test_the_daemon_answers_bin_methods_and_lone_params(daemon: Daemon) -> None:
    peer = await RawPeer.connect(str(daemon.config.socket_path))
    try:
        # hello as bin, its one param not in an array
        error, result = await raw_call(peer, 0, b"hello", {"client": "lone", "protocol": 1})
        assert error is None and result["protocol"] == 1
        error, result = await raw_call(peer, 1, b"device.info", [])
        assert error is None and result["backend"] == "sim"
        # a lone index: unmask's one param, refused for what it says, not for its shape
        error, _ = await raw_call(peer, 2, "unmask", "msix")
        assert error[0] == EINVAL and "msix need no unmask" in error[1], error
        error, _ = await raw_call(peer, 3, "stats", None)
        assert error[0] == EINVAL and error[1].startswith("params"), error
        error, _ = await raw_call(peer, 4, NOT_UTF8, [])
        assert error[0] == EINVAL and error[1].startswith("method"), error
        # ...and the connection is as good as new.
        error, result = await raw_call(peer, 5, "stats", [])
        assert error is None and [c["name"] for c in result["clients"]] == ["lone"]
        assert peer.notifications == []
    finally:
        peer.close()


async def test_unknown_notifications_are_ignored_never_answered(daemon: Daemon) -> None:
    sim = daemon.device
    assert isinstance(sim, SimDevice)
    peer = await RawPeer.connect(str(daemon.config.socket_path))
    try:
        # Before hello too: a notification is not a request, so "hello first" does not apply.
        notes = [
            [2, "$/cancelRequest", [7]],
            [2, b"nvim_set_client_info", ["x", {}, "remote", {}, {}]],
            [2, NOT_UTF8, []],
            [2, "irq", "lone"],
        ]
        with structlog.testing.capture_logs() as logs:
            await peer.send(b"".join(msgpack.packb(n, use_bin_type=True) for n in notes))
            await peer.hello()
        logged = [e["method"] for e in logs if e["event"] == "client.notification"]
        assert logged == [
            "'$/cancelRequest'",
            "'nvim_set_client_info'",
            "'\\udcff\\udcfehello'",
            "'irq'",
        ]
        assert all(e["log_level"] == "debug" for e in logs if e["event"] == "client.notification")
        # hello's response was the first thing the daemon sent: nothing answered a notification.
        assert peer.notifications == []
        error, _ = await raw_call(peer, 1, "subscribe", ["msix", [2]])
        assert error is None
        sim.raise_irq(IrqIndex.MSIX, 2, 3)
        with trio.fail_after(5):
            irq = await peer.next_message()
        assert irq == [2, "irq", ["msix", [2, 3]]]
    finally:
        peer.close()


@pytest.mark.parametrize("first", [0, MAX_MSGID])
async def test_the_daemon_answers_request_ids_at_both_ends_of_uint32(
    daemon: Daemon, first: int
) -> None:
    peer = await RawPeer.connect(str(daemon.config.socket_path))
    try:
        error, _ = await raw_call(peer, first, "hello", [{"client": "ids", "protocol": 1}])
        assert error is None
        # A client counting from MAX wraps to 0; one counting from 0 goes on to 1.
        following = (first + 1) & MAX_MSGID
        error, result = await raw_call(peer, following, "device.info", [])
        assert error is None and result["backend"] == "sim"
    finally:
        peer.close()
