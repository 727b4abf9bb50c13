"""Random sequences of subscribe, unsubscribe, trigger, claim, unclaim and disconnect
against the running daemon, while interrupts fire in the background.

The daemon (``irqd.process.service.serve`` on the simulated device) runs in the test's
Trio loop with real sockets and eventfds. The state machine runs in a worker
thread with blocking ``irqproto`` clients; a Trio task fires interrupts at every
vector that has an eventfd, as hardware would, and counts them.

Attribution: the firing task fires only while it holds ``lock``, and every
rule that changes who receives a vector holds ``lock`` from just before its
request until its response. Every interrupt fired before the request belongs to
the old receivers (the daemon reads the eventfd at the change), every one after
the response to the new ones. Some requests also raise interrupts inside the
daemon's handler, just before it changes anything, so they are still unread in
the eventfds at that moment: they too belong to the old receivers. So for each
subscription the model knows exactly what was fired while it lasted, and
``unsubscribe`` (whose response comes after every count for it) checks the
client received exactly that. A claimer reads
its eventfd itself and must find exactly what was fired while it held it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.from_thread
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from irqd.config import ServerConfig, SimConfig
from irqd.device.base import IrqIndex
from irqd.device.sim import SimDevice
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqproto.blocking import Client
from irqproto.errors import RpcError
from irqproto.notifications import IrqNotification

VECTORS = 6
MSIX = IrqIndex.MSIX
T = TypeVar("T")


@dataclass
class Firing:
    """What the background task fired, per vector; read and changed under ``lock``."""

    sim: SimDevice
    lock: threading.Lock = field(default_factory=threading.Lock)
    fired: list[int] = field(default_factory=lambda: [0] * VECTORS)
    stop: bool = False
    #: Interrupts to raise inside the next request, just before the daemon acts
    #: on it: they sit unread in the eventfds at the very moment receivers change.
    at_boundary: int = 0

    def boundary(self) -> None:
        """Called by the daemon's request handler (see the test's hook)."""
        n, self.at_boundary = self.at_boundary, 0
        if n:
            self.burst(n)

    def burst(self, n: int) -> None:
        """Raise every vector that has an eventfd ``n`` times (call holding ``lock``)."""
        for vector in range(VECTORS):
            if self.sim.assigned_fd(MSIX, vector) is not None:
                self.sim.raise_irq(MSIX, vector, n)
                self.fired[vector] += n

    async def run(self) -> None:
        n = 0
        while not self.stop:
            if self.lock.acquire(blocking=False):
                try:
                    n = n % 3 + 1
                    self.burst(n)
                finally:
                    self.lock.release()
            await trio.sleep(0.0005)


@dataclass(eq=False)
class Model:
    """One client as the model sees it."""

    name: str
    client: Client
    #: vector -> fired[vector] when the subscription began
    subscribed: dict[int, int] = field(default_factory=dict)
    #: vector -> (fd, fired[vector] when the claim began)
    claimed: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: counts received per subscribed vector since its subscription began
    received: dict[int, int] = field(default_factory=dict)

    def take_notifications(self) -> None:
        """Everything queued so far (what arrived before the last response)."""
        while True:
            try:
                note = self.client.next_notification(timeout=0)
            except TimeoutError:
                return
            if isinstance(note, IrqNotification):
                for vector, count in note.counts:
                    assert vector in self.subscribed, (self.name, vector, note)
                    self.received[vector] = self.received.get(vector, 0) + count


class DaemonMachine(RuleBasedStateMachine):
    """The daemon against a model of subscriptions and claims."""

    path: str
    firing: Firing
    on_trio: Callable[[Callable[[], Any]], Any]

    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        self.live: list[Model] = []
        self.serial = 0

    # -- helpers -------------------------------------------------------------------------

    def fired(self, vector: int) -> int:
        return self.firing.fired[vector]

    def holder_of_claim(self, vector: int) -> Model | None:
        return next((m for m in self.live if vector in m.claimed), None)

    def subscribers(self, vector: int) -> list[Model]:
        return [m for m in self.live if vector in m.subscribed]

    def finish_subscription(self, model: Model, vector: int) -> None:
        """Counts are final for ``vector``: check them against what was fired."""
        model.take_notifications()
        expected = self.fired(vector) - model.subscribed.pop(vector)
        got = model.received.pop(vector, 0)
        assert got == expected, (model.name, vector, got, expected)

    def finish_claim(self, model: Model, vector: int) -> None:
        fd, start = model.claimed.pop(vector)
        try:
            got = os.eventfd_read(fd)
        except BlockingIOError:
            got = 0
        finally:
            os.close(fd)
        assert got == self.fired(vector) - start, (model.name, vector, got)

    # -- rules ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.live) < 4)
    @rule(target=clients)
    def connect(self) -> Model:
        self.serial += 1
        model = Model(f"c{self.serial}", Client(self.path, client_name=f"c{self.serial}"))
        self.live.append(model)
        return model

    @rule(
        model=clients,
        vectors=st.sets(st.integers(0, VECTORS - 1), min_size=1, max_size=3),
        boundary=st.integers(0, 3),
    )
    def subscribe(self, model: Model, vectors: set[int], boundary: int) -> None:
        if model not in self.live:
            return
        busy = any(self.holder_of_claim(v) is not None for v in vectors)
        with self.firing.lock:
            self.firing.at_boundary = boundary
            try:
                model.client.subscribe("msix", sorted(vectors))
            except RpcError as exc:
                assert busy, exc
                assert exc.code == "EBUSY"
                return
            assert not busy
            for vector in vectors:
                model.subscribed.setdefault(vector, self.fired(vector))

    @rule(model=clients, data=st.data(), boundary=st.integers(0, 3))
    def unsubscribe(self, model: Model, data: st.DataObject, boundary: int) -> None:
        if model not in self.live or not model.subscribed:
            return
        vectors = data.draw(st.sets(st.sampled_from(sorted(model.subscribed)), min_size=1))
        with self.firing.lock:
            self.firing.at_boundary = boundary
            assert model.client.unsubscribe("msix", sorted(vectors))["vectors"] == sorted(vectors)
            for vector in vectors:
                self.finish_subscription(model, vector)

    @rule(model=clients, vector=st.integers(0, VECTORS - 1))
    def unsubscribe_what_is_not_held(self, model: Model, vector: int) -> None:
        if model not in self.live or vector in model.subscribed:
            return
        with pytest.raises(RpcError) as info:
            model.client.unsubscribe("msix", [vector])
        assert info.value.code == "EINVAL"

    @rule(model=clients, vectors=st.sets(st.integers(0, VECTORS - 1), min_size=1, max_size=2))
    def trigger(self, model: Model, vectors: set[int]) -> None:
        if model not in self.live:
            return
        with self.firing.lock:
            enabled = all(self.subscribers(v) or self.holder_of_claim(v) for v in vectors)
            try:
                model.client.trigger("msix", sorted(vectors))
            except RpcError as exc:
                assert not enabled, exc
                assert exc.code == "EINVAL"
                return
            assert enabled
            for vector in vectors:
                self.firing.fired[vector] += 1

    @rule(model=clients, vector=st.integers(0, VECTORS - 1), boundary=st.integers(0, 3))
    def claim(self, model: Model, vector: int, boundary: int) -> None:
        if model not in self.live:
            return
        holder = self.holder_of_claim(vector)
        others = [m for m in self.subscribers(vector) if m is not model]
        with self.firing.lock:
            self.firing.at_boundary = boundary
            try:
                fd = model.client.claim("msix", vector)
            except RpcError as exc:
                assert holder is not None or others, exc
                assert exc.code == "EBUSY"
                return
            assert holder is None
            assert not others
            if vector in model.subscribed:
                # Its own subscription ends with the claim; the counts came first.
                self.finish_subscription(model, vector)
            model.claimed[vector] = (fd, self.fired(vector))

    @rule(model=clients, data=st.data(), boundary=st.integers(0, 3))
    def unclaim(self, model: Model, data: st.DataObject, boundary: int) -> None:
        if model not in self.live or not model.claimed:
            return
        vector = data.draw(st.sampled_from(sorted(model.claimed)))
        with self.firing.lock:
            self.firing.at_boundary = boundary
            model.client.unclaim("msix", vector)
            # What is left in the eventfd is the claimer's, even after the claim.
            self.finish_claim(model, vector)

    @rule(model=consumes(clients))
    def disconnect(self, model: Model) -> None:
        if model not in self.live:
            return
        with self.firing.lock:
            model.client.close()
            self.live.remove(model)
            model.subscribed.clear()
            # Leaving is asynchronous on the daemon's side; the model waits for it.
            names = {m.name for m in self.live}
            while not self._sessions_are(names):
                pass
            for vector in list(model.claimed):
                self.finish_claim(model, vector)

    @rule(n=st.integers(1, 50))
    def fire_now(self, n: int) -> None:
        with self.firing.lock:
            self.on_trio(lambda: self.firing.burst(n))

    # -- the daemon's view ---------------------------------------------------------------

    def _sessions_are(self, names: set[str]) -> bool:
        found: set[str] = self.on_trio(
            lambda: {s.name for s in DaemonMachine.daemon.sessions.values()}
        )
        return found == names

    daemon: Daemon

    @invariant()
    def the_daemon_agrees_with_the_model(self) -> None:
        with self.firing.lock:
            info, stats = self.on_trio(
                lambda: (self.daemon.table.device_info(), self.daemon.handlers.stats())
            )
        subscribed = {v for m in self.live for v in m.subscribed}
        claimed = {v for m in self.live for v in m.claimed}
        assert info["msix"]["enabled"] == sorted(subscribed | claimed)
        assert info["msix"]["claimed"] == sorted(claimed)
        by_vector = {v["vector"]: v for v in stats["vectors"]}
        for vector in subscribed | claimed:
            assert by_vector[vector]["subscribers"] == len(self.subscribers(vector))
            assert (by_vector[vector]["claimed_by"] is not None) == (vector in claimed)
        clients = {c["name"]: c for c in stats["clients"]}
        assert set(clients) == {m.name for m in self.live}
        for model in self.live:
            entry = clients[model.name]
            assert sorted(v for _, v in entry["vectors"]) == sorted(model.subscribed)
            assert sorted(v for _, v in entry["claims"]) == sorted(model.claimed)

    def teardown(self) -> None:
        for model in list(self.live):
            with self.firing.lock:
                if model.subscribed:
                    vectors = sorted(model.subscribed)
                    model.client.unsubscribe("msix", vectors)
                    for vector in vectors:
                        self.finish_subscription(model, vector)
                for vector in list(model.claimed):
                    self.finish_claim(model, vector)
            model.client.close()
        self.live.clear()
        names: set[str] = set()
        while not self._sessions_are(names):
            pass


async def test_random_sequences_keep_counts_exact_and_the_view_right(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServerConfig(socket_path=tmp_path / "irqd.sock", sim=SimConfig(msix_vectors=8))
    daemon: Daemon = await nursery.start(serve, config)
    assert isinstance(daemon.device, SimDevice)
    firing = Firing(daemon.device)
    nursery.start_soon(firing.run)
    handle = daemon.handlers.handle

    def handle_at_boundary(session: Any, method: str, params: Any) -> Any:
        firing.boundary()
        return handle(session, method, params)

    monkeypatch.setattr(daemon.handlers, "handle", handle_at_boundary)

    def on_trio(fn: Callable[[], T]) -> T:
        return trio.from_thread.run_sync(fn)

    DaemonMachine.path = str(config.socket_path)
    DaemonMachine.firing = firing
    DaemonMachine.on_trio = staticmethod(on_trio)
    DaemonMachine.daemon = daemon
    try:
        await trio.to_thread.run_sync(
            lambda: run_state_machine_as_test(
                DaemonMachine,
                settings=settings(
                    max_examples=100,
                    stateful_step_count=30,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        )
    finally:
        firing.stop = True
    assert sum(firing.fired) > 0
