"""Every class of malformed input: an error response or a closed connection, and
no other client sees any change in its counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
from irqproto.errors import Disconnected
from irqproto.notifications import IrqNotification
from irqproto.trio_client import TrioClient, open_client

from .wire import RawPeer, wait_until_sessions

pack = msgpack.packb


def request(msgid: int, method: str, params: Any) -> bytes:
    return pack([0, msgid, method, params])


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@dataclass(frozen=True)
class Case:
    data: bytes
    #: "error": answered with this code, connection kept; "closed": no answer, closed.
    outcome: str
    code: str = ""
    #: Close our sending side after the bytes (EOF).
    eof: bool = False


HUGE = 2**64 - 1
CASES = {
    "not msgpack": Case(b"\xc1\xc1\xc1\xc1", "closed"),
    "text": Case(b"GET / HTTP/1.1\r\n\r\n", "closed"),
    "ext type": Case(pack(msgpack.ExtType(1, b"x")), "closed"),
    "not an array": Case(pack({"method": "hello"}), "closed"),
    "unknown type tag": Case(pack([7, 1, "stats", []]), "closed"),
    "a response from a client": Case(pack([1, 1, None, None]), "closed"),
    "envelope arity": Case(pack([0, 1, "stats"]), "closed"),
    # A lone value is one param (docs/protocol.md, "What the daemon accepts"): one too many here.
    "params not an array": Case(pack([0, 1, "stats", {}]), "error", "EINVAL"),
    "method a bin, not UTF-8": Case(pack([0, 1, b"\xff\xfe", []]), "error", "EINVAL"),
    "method neither str nor bin": Case(pack([0, 1, 5, []]), "closed"),
    "msgid huge": Case(pack([0, HUGE, "stats", []]), "closed"),
    "msgid negative": Case(pack([0, -1, "stats", []]), "closed"),
    "duplicate msgid in flight": Case(request(1, "stats", []) * 2, "closed"),
    "params arity": Case(request(1, "subscribe", ["msix"]), "error", "EINVAL"),
    "vector huge": Case(request(1, "subscribe", ["msix", [HUGE]]), "error", "EINVAL"),
    "vector negative huge": Case(request(1, "trigger", ["msix", [-(2**63)]]), "error", "EINVAL"),
    "vector a bool": Case(request(1, "claim", ["msix", True]), "error", "EINVAL"),
    "vector a float": Case(request(1, "unsubscribe", ["msix", [1.0]]), "error", "EINVAL"),
    "index unknown": Case(request(1, "subscribe", ["msi-x", [0]]), "error", "EINVAL"),
    "unknown method": Case(request(1, "reboot", []), "error", "ENOSYS"),
    "hello again, wrong version": Case(
        request(1, "hello", [{"client": "x", "protocol": 2**40}]), "error", "EINVAL"
    ),
    "deep nesting": Case(request(1, "stats", nested(100)), "closed"),
    "deep nesting, just past the limit": Case(request(1, "stats", nested(8)), "closed"),
    "oversized message": Case(request(1, "stats", ["x" * 4000] * 20), "closed"),
    "long array": Case(request(1, "trigger", ["msix", list(range(5000))]), "closed"),
    "long str": Case(request(1, "x" * 5000, []), "closed"),
    "half a message then close": Case(
        request(1, "subscribe", ["msix", [0]])[:7], "closed", eof=True
    ),
    "a flood of requests": Case(
        b"".join(request(i, "device.info", []) for i in range(1, 2000)), "closed"
    ),
    "unsubscribe what one does not hold": Case(
        request(1, "unsubscribe", ["msix", [0]]), "error", "EINVAL"
    ),
    "claim another's vector": Case(request(1, "claim", ["msix", 0]), "error", "EBUSY"),
}


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> Daemon:
    config = ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=8))
    started: Daemon = await nursery.start(serve, config)
    return started


async def expect_counts(client: TrioClient, expected: dict[int, int]) -> None:
    """Read ``irq`` notifications until the totals reach ``expected``; fails past
    it, and if the daemon ends the stream first."""
    got: dict[int, int] = {}
    with trio.fail_after(5):
        while got != expected:
            try:
                batch = await client.next_notification()
            except Disconnected:
                raise AssertionError(f"the daemon ended the stream at {got}") from None
            if not isinstance(batch, IrqNotification):
                continue
            for vector, count in batch.counts:
                got[vector] = got.get(vector, 0) + count
                assert got[vector] <= expected.get(vector, 0), (got, expected)


@pytest.mark.parametrize("name", list(CASES))
async def test_malformed_input_costs_only_its_sender(daemon: Daemon, name: str) -> None:
    case = CASES[name]
    sim = daemon.device
    assert isinstance(sim, SimDevice)
    fire: Callable[[int], None] = lambda n: sim.raise_irq(IrqIndex.MSIX, 0, n)  # noqa: E731
    path = str(daemon.config.socket_path)
    async with open_client(path, client_name="good") as good:
        await good.subscribe("msix", [0])
        fire(3)
        await expect_counts(good, {0: 3})
        with structlog.testing.capture_logs() as logs:
            bad = await RawPeer.connect(path)
            await bad.hello("bad")
            await bad.send(case.data)
            if case.eof:
                bad.sock.shutdown(trio.socket.SHUT_WR)
            fire(2)  # interrupts while the bad input is being dealt with
            if case.outcome == "error":
                with trio.fail_after(5):
                    answer = await bad.response(1)
                assert answer is not None, "closed instead of answering"
                error, result = answer
                assert result is None
                assert error[0] == case.code, error
                # ...and the connection still works
                assert (await bad.call(2, "device.info", []))[0] is None
            else:
                with trio.fail_after(5):
                    await bad.wait_closed()
                assert not [m for m in bad.notifications if m[0] == 1], bad.notifications
            bad.close()
            await wait_until_sessions(daemon, 1)
        if case.outcome == "closed":
            (gone,) = [e for e in logs if e["event"] == "client.disconnected"]
            assert gone["reason"].startswith(("protocol error", "limit")), gone
        assert not [e for e in logs if e["event"] == "client.crashed"]
        fire(4)
        await expect_counts(good, {0: 6})
        stats = await good.stats()
        (me,) = stats["clients"]
        assert (me["name"], me["delivered"], me["pending"]) == ("good", 9, 0)
        assert stats["vectors"][0]["count"] == 9
