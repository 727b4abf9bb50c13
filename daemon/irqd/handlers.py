"""The protocol's methods, each turned into calls on the vector table.

A handler gets already validated, typed params (``irqproto.methods``) and
either returns a result or raises ``IrqdError``; the session loop turns that
into a response. Nothing here touches a socket.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from irqd import __version__
from irqd.device.base import Device, IrqIndex
from irqd.device.sim import SimDevice
from irqd.dispatcher import Dispatcher
from irqd.errors import EINVAL, ENOSYS, IrqdError
from irqd.session import Session
from irqd.stats import LatencyHistogram
from irqd.vectors import VectorTable
from irqproto import methods as m


@dataclass
class Reply:
    """A handler's result and the fds to pass with it (SCM_RIGHTS)."""

    result: Any
    fds: list[int] = field(default_factory=list)


@dataclass
class Handlers:
    """Method implementations sharing the daemon's state."""

    device: Device
    table: VectorTable
    dispatcher: Dispatcher
    latency: LatencyHistogram
    sessions: Callable[[], list[Session]]
    started: float = field(default_factory=time.monotonic)

    def handle(self, session: Session, method: str, params: Any) -> Reply:
        """Run one validated request for ``session``."""
        if isinstance(params, m.HelloParams):
            return Reply(self.hello(session, params))
        if isinstance(params, m.DeviceInfoParams):
            return Reply(self.table.device_info())
        if isinstance(params, m.SubscribeParams):
            return Reply(self.subscribe(session, params))
        if isinstance(params, m.UnsubscribeParams):
            index = _index(params.index)
            done = self.table.unsubscribe(session, index, params.vectors)
            return Reply({"vectors": done})
        if isinstance(params, m.TriggerParams):
            self.table.trigger(_index(params.index), params.vectors)
            return Reply({})
        if isinstance(params, m.UnmaskParams):
            self.table.unmask(session, _index(params.index))
            return Reply({})
        if isinstance(params, m.StatsParams):
            return Reply(self.stats())
        if isinstance(params, m.SimEventfdsParams):
            return self.sim_eventfds(_index(params.index), params.vectors)
        raise IrqdError(ENOSYS, f"{method} is not implemented by this server")

    def hello(self, session: Session, params: m.HelloParams) -> dict[str, Any]:
        session.name = params.client
        session.greeted = True
        return {
            "protocol": m.PROTOCOL_VERSION,
            "server": f"vfio-irqd {__version__}",
            "device": self.table.device_info(),
        }

    def subscribe(self, session: Session, params: m.SubscribeParams) -> dict[str, Any]:
        outcome = self.table.subscribe(session, _index(params.index), params.vectors)
        return {
            "vectors": list(outcome.vectors),
            "enabled": list(outcome.enabled),
            "how": outcome.how,
        }

    def sim_eventfds(self, index: IrqIndex, vectors: tuple[int, ...]) -> Reply:
        if not isinstance(self.device, SimDevice):
            raise IrqdError(EINVAL, "sim.eventfds exists only on the simulated device")
        fds = []
        for vector in vectors:
            fd = self.device.assigned_fd(index, vector)
            if fd is None:
                raise IrqdError(
                    EINVAL,
                    f"{index.wire_name} vector {vector} has no eventfd: subscribe to it first",
                )
            fds.append(fd)
        return Reply({"vectors": list(vectors)}, fds)

    def stats(self) -> dict[str, Any]:
        sessions = self.sessions()
        vectors = [
            {
                "index": v.index.wire_name,
                "vector": v.number,
                "count": v.total,
                "subscribers": len(v.subscribers),
            }
            for v in self.table.vectors()
        ]
        clients = [
            {
                "id": s.id,
                "name": s.name,
                "pid": s.peer.pid,
                "uid": s.peer.uid,
                "vectors": [
                    [index.wire_name, number] for index, number in self.table.subscriptions(s)
                ],
                "pending": s.pending_total(),
                "delivered": s.delivered,
            }
            for s in sessions
        ]
        dstats = self.dispatcher.stats
        return {
            "vectors": vectors,
            "clients": clients,
            "dispatch": {
                "rounds": dstats.rounds,
                "events": dstats.events,
                "native": self.dispatcher.native,
            },
            "latency_us": self.latency.as_wire(),
            "host_vectors": self.table.host_vectors(),
            "msix_strategy": str(self.table.msix_strategy),
            "uptime_s": round(time.monotonic() - self.started, 3),
        }


def _index(name: str) -> IrqIndex:
    try:
        return IrqIndex.from_wire(name)
    except KeyError:
        raise IrqdError(EINVAL, f"unknown interrupt index {name!r}") from None
