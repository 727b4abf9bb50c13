"""msgpack-RPC client libraries from PyPI, written for other servers, used as they are.

- ``pynvim``'s msgpack-RPC session layer (written for Neovim; the most used
  msgpack-RPC client on PyPI). It announces itself with a notification whose
  method is a msgpack **bin** (``b"nvim_set_client_info"``) the moment it
  connects, and callers name methods as ``bytes`` too.
- ``arduino-router-bridge`` (written for the Arduino router). Providing a
  handler for a notification registers it with a ``$/register`` request the
  daemon does not know, and a call that times out sends ``$/cancelRequest``.

Each says hello, subscribes, receives ``irq`` notifications for interrupts
another process raises on the simulated device, and must count them exactly
on one connection that the daemon never drops (docs/protocol.md, "What the
daemon accepts").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from arduino.router_bridge import Bridge
from arduino.router_bridge.protocol import RpcError
from pynvim.msgpack_rpc import socket_session

from .helpers import DEADLINE, cli, running_daemon

#: Interrupts raised on each vector.
FIRED = 500


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    """A simulated-device daemon's socket."""
    path = tmp_path / "irqd.sock"
    with running_daemon(path):
        yield path


def sim_fire(sock: Path, count: int, *vectors: int) -> None:
    """``vfio-irqd sim fire --count COUNT VECTORS`` (another process)."""
    fired = cli("sim", "fire", "--socket", str(sock), "--count", str(count), *map(str, vectors))
    assert fired.returncode == 0, fired.stderr


def add_irq(totals: dict[int, int], params: list[Any]) -> None:
    """Add an ``irq`` notification's ``[index, [v1, n1, ...]]`` to ``totals``."""
    index, flat = params
    assert index == "msix", params
    for vector, count in zip(flat[::2], flat[1::2], strict=True):
        totals[vector] = totals.get(vector, 0) + count


def client_named(stats: dict[str, Any], name: str) -> dict[str, Any]:
    """The one client called ``name`` in a ``stats`` result."""
    (client,) = [c for c in stats["clients"] if c["name"] == name]
    found: dict[str, Any] = client
    return found


def test_pynvim_session_counts_exactly(sock: Path) -> None:
    # socket_session() has already sent its bin-named notification when it returns.
    session = socket_session(str(sock))
    # pynvim's calls have no timeout: past the deadline, stop its loop so that
    # a waiting call or next_message() returns and the test fails instead of hanging.
    watchdog = threading.Timer(DEADLINE, lambda: session.threadsafe_call(session.stop))
    watchdog.start()
    try:
        hello = session.request("hello", {"client": "pynvim", "protocol": 1})
        assert hello["protocol"] == 1
        first = client_named(session.request(b"stats"), "pynvim")
        subscribed = session.request(b"subscribe", "msix", [3, 4])
        assert (subscribed["vectors"], subscribed["how"]) == ([3, 4], "dynamic")

        sim_fire(sock, FIRED, 3, 4)
        totals: dict[int, int] = {}
        while totals != {3: FIRED, 4: FIRED}:
            message = session.next_message()
            assert message is not None, f"no notification in time; got {totals}"
            assert message.type == "notification", message
            assert message.name == "irq", message
            add_irq(totals, message.args)
            assert all(n <= FIRED for n in totals.values()), totals

        assert session.request("unsubscribe", "msix", [3, 4]) == {"vectors": [3, 4]}
        last = client_named(session.request("stats"), "pynvim")
        # One connection all along, every count delivered, nothing more.
        assert last["id"] == first["id"]
        assert (last["delivered"], last["pending"], last["vectors"]) == (2 * FIRED, 0, [])
    finally:
        watchdog.cancel()
        session.close()


def test_arduino_router_bridge_counts_exactly(sock: Path) -> None:
    bridge = Bridge(f"unix://{sock}")
    notes: queue.Queue[list[Any]] = queue.Queue()
    try:
        assert bridge.connect(timeout=DEADLINE), "could not connect"
        hello = bridge.call("hello", {"client": "arduino", "protocol": 1}, timeout=DEADLINE)
        assert hello["protocol"] == 1
        first = client_named(bridge.call("stats", timeout=DEADLINE), "arduino")
        # Registers "irq" with a "$/register" request: ENOSYS here, which the
        # library logs and shrugs off; the handler stays.
        bridge.provide("irq", lambda index, flat: notes.put([index, flat]))
        with pytest.raises(RpcError) as info:
            bridge.call("$/register", "irq", timeout=DEADLINE)
        code: object = info.value.code  # typed int: the Arduino router's codes are
        assert code == "ENOSYS"
        # What the library sends for a call that timed out: never answered.
        bridge.notify("$/cancelRequest", 12345)

        subscribed = bridge.call("subscribe", "msix", [5, 6], timeout=DEADLINE)
        assert (subscribed["vectors"], subscribed["how"]) == ([5, 6], "dynamic")
        sim_fire(sock, FIRED, 5, 6)
        totals: dict[int, int] = {}
        while totals != {5: FIRED, 6: FIRED}:
            try:
                add_irq(totals, notes.get(timeout=DEADLINE))
            except queue.Empty:
                raise AssertionError(f"no notification in time; got {totals}") from None
            assert all(n <= FIRED for n in totals.values()), totals

        assert bridge.call("unsubscribe", "msix", [5, 6], timeout=DEADLINE) == {"vectors": [5, 6]}
        last = client_named(bridge.call("stats", timeout=DEADLINE), "arduino")
        # The bridge reconnects by itself when dropped: the same client id
        # proves it never had to.
        assert last["id"] == first["id"]
        assert (last["delivered"], last["pending"], last["vectors"]) == (2 * FIRED, 0, [])
        assert notes.empty()
    finally:
        bridge.disconnect()
