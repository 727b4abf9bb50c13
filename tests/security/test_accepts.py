"""What the daemon accepts beyond the letter of msgpack-RPC (docs/protocol.md,
"What the daemon accepts"), against a real daemon on the simulated device,
spoken with raw msgpack: each answer (or its absence) is checked, and the
connection must stay usable. The same rules, sans-IO on
:class:`irqproto.Connection`, are in tests/protocol/test_interop.py.
"""

from __future__ import annotations

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
from irqproto import EINVAL
from irqproto.messages import MAX_MSGID

from .wire import RawPeer

NOT_UTF8 = b"\xff\xfehello"


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> Daemon:
    config = ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=8))
    started: Daemon = await nursery.start(serve, config)
    return started


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
