"""The protocol's methods, each turned into calls on the vector table.

A handler gets already validated, typed params (``irqproto.methods``) and
either returns a result or raises ``IrqdError``; the session loop turns that
into a response. Nothing here touches a socket.

Access control (``irqd.policy``) is checked here, per method and per vector,
before anything changes; a refusal is ``AccessDenied`` (``EACCES``), which the
session loop also logs with the peer's pid and uid.

File descriptors in a ``Reply`` are the reply's own (dups): the session loop
sends them and closes them, whatever happens. Handing out the table's own fd
numbers would be a race: another client's ``unsubscribe`` can close the
vector's eventfd while this response waits for room in its socket, and the
number may be reused by then (DPDK PR 66).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from irqd import __version__
from irqd.config import ServerConfig
from irqd.device.base import Device, IrqIndex, Unsupported
from irqd.errors import EACCES, EINVAL, EIO, ENOSPC, ENOSYS, ConfigError, IrqdError
from irqd.hotpath.session import Session
from irqd.limits import ServerLimits
from irqd.policy import AccessPolicy, Action
from irqd.server.broker import Broker
from irqd.server.vectors import VectorTable
from irqd.stats import LatencyHistogram
from irqproto import methods as m

_S = TypeVar("_S", AccessPolicy, ServerLimits)

log = structlog.get_logger("irqd.server.handlers")


class AccessDenied(IrqdError):
    """The policy does not allow this client this request (``EACCES``)."""

    def __init__(self, action: Action, reason: str) -> None:
        super().__init__(EACCES, reason)
        self.action = action


@dataclass
class Reply:
    """A handler's result and the fds to pass with it (SCM_RIGHTS).

    The fds are owned by the reply: whoever sends it closes them afterwards
    (``close``), sent or not.
    """

    result: Any
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Close the reply's fds; idempotent (the list is emptied first)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Handlers:
    """Method implementations sharing the daemon's state."""

    device: Device
    table: VectorTable
    latency: LatencyHistogram
    sessions: Callable[[], list[Session]]
    #: ``stats``' ``dispatch`` map (``HotLoop.dispatch_stats``).
    dispatch_stats: Callable[[], dict[str, Any]]
    started: float = field(default_factory=time.monotonic)
    #: Who may do what; the server sets these from its config before each request.
    policy: AccessPolicy = field(default_factory=AccessPolicy)
    limits: ServerLimits = field(default_factory=ServerLimits)
    #: The gid owning the socket file (``socket-group`` in the policy).
    socket_gid: int | None = None
    #: The config object ``policy`` and ``limits`` were taken from.
    settings_from: object | None = None
    #: Device access and DMA memory (``device.*``, ``dma.*``); made from device and table.
    broker: Broker = field(init=False)
    #: ``stats``' ``lifecycle``: hand-overs and crash recoveries (the daemon sets it).
    lifecycle: Callable[[], dict[str, int]] = field(
        default=lambda: {"handovers": 0, "crash_recoveries": 0}
    )

    def __post_init__(self) -> None:
        self.broker = Broker(self.device, self.table)

    def apply_config(self, config: ServerConfig, *, strict: bool = False) -> None:
        """Take the policy and limits from ``config`` (at start-up and on reload).

        Settings that cannot work raise ``ConfigError`` when ``strict``; else
        the previous ones stay in force and the error is logged.
        """
        try:
            policy, limits = settings_of(config)
        except ConfigError as exc:
            if strict:
                raise
            log.error("config.rejected", error=str(exc), note="previous access and limits kept")
        else:
            self.policy, self.limits = policy, limits
        self.settings_from = config

    def handle(self, session: Session, method: str, params: Any) -> Reply:
        """Run one validated request for ``session``."""
        if isinstance(params, m.HelloParams):
            return Reply(self.hello(session, params))
        if isinstance(params, m.DeviceInfoParams):
            return Reply(self.table.device_info())
        if isinstance(params, m.SubscribeParams):
            self._check(session, Action.SUBSCRIBE, params.index, params.vectors)
            return Reply(self.subscribe(session, params))
        if isinstance(params, m.UnsubscribeParams):
            self._check_count(params.vectors)
            index = _index(params.index)
            done = self.table.unsubscribe(session, index, params.vectors)
            return Reply({"vectors": done})
        if isinstance(params, m.TriggerParams):
            self._check(session, Action.TRIGGER, params.index, params.vectors)
            self.table.trigger(_index(params.index), params.vectors)
            return Reply({})
        if isinstance(params, m.UnmaskParams):
            self.table.unmask(session, _index(params.index))
            return Reply({})
        if isinstance(params, m.ClaimParams):
            self._check(session, Action.CLAIM, params.index, (params.vector,))
            fd = self.table.claim(session, _index(params.index), params.vector)
            return Reply({"vectors": [params.vector]}, [fd])
        if isinstance(params, m.UnclaimParams):
            self.table.unclaim(session, _index(params.index), params.vector)
            return Reply({})
        if isinstance(params, m.StatsParams):
            self._check(session, Action.STATS)
            return Reply(self.stats())
        if isinstance(params, m.SimEventfdsParams):
            # Writable eventfds let their holder raise interrupts: trigger's right.
            self._check(session, Action.TRIGGER, params.index, params.vectors)
            return self.sim_eventfds(_index(params.index), params.vectors)
        if isinstance(params, m.DeviceRegionsParams):
            return Reply(self.broker.regions())
        if isinstance(params, m.DeviceOpenParams):
            self._check(session, Action.DRIVE)
            result, fd = self.broker.open_device(session)
            return Reply(result, [fd])
        if isinstance(params, m.DeviceResetParams):
            self._check(session, Action.DRIVE)
            return Reply(self.broker.reset(session))
        if isinstance(params, m.DmaAllocParams):
            self._check(session, Action.DMA)
            result, fd = self.broker.alloc(session, params, self.limits)
            return Reply(result, [fd])
        if isinstance(params, m.DmaFreeParams):
            self._check(session, Action.DMA)
            self.broker.free(session, params.id)
            return Reply({})
        raise IrqdError(ENOSYS, f"{method} is not implemented by this server")

    def _check(
        self,
        session: Session,
        action: Action,
        index: str | None = None,
        vectors: Sequence[int] = (),
    ) -> None:
        """``AccessDenied`` unless the policy allows ``action`` on every vector."""
        self._check_count(vectors)
        peer, gid = session.peer, self.socket_gid
        reason = self.policy.denial(action, peer, socket_gid=gid)
        for vector in vectors if reason is None else ():
            reason = self.policy.denial(action, peer, socket_gid=gid, index=index, vector=vector)
            if reason is not None:
                break
        if reason is not None:
            raise AccessDenied(action, reason)

    def _check_count(self, vectors: Sequence[int]) -> None:
        limit = self.limits.max_vectors_per_request
        if len(vectors) > limit:
            raise IrqdError(
                EINVAL, f"params[1]: at most {limit} vectors per request, got {len(vectors)}"
            )

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
        assigned = []
        for vector in vectors:
            try:
                fd = self.device.assigned_fd(index, vector)
            except Unsupported as exc:
                raise IrqdError(EINVAL, str(exc)) from None
            if fd is None:
                raise IrqdError(
                    EINVAL,
                    f"{index.wire_name} vector {vector} has no eventfd: subscribe to it first",
                )
            assigned.append(fd)
        reply = Reply({"vectors": list(vectors)})
        try:
            for fd in assigned:
                reply.fds.append(_dup(fd))
        except BaseException:
            reply.close()
            raise
        return reply

    def stats(self) -> dict[str, Any]:
        sessions = self.sessions()
        vectors = [
            {
                "index": v.index.wire_name,
                "vector": v.number,
                "count": self.table.total_of(v),
                "subscribers": len(v.subscribers),
                "claimed_by": None if v.claimed_by is None else v.claimed_by.id,
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
                "claims": [[index.wire_name, number] for index, number in self.table.claims(s)],
                "pending": s.pending_total(),
                "dma_bytes": self.broker.client_bytes(s),
                "delivered": s.delivered,
            }
            for s in sessions
        ]
        return {
            "vectors": vectors,
            "clients": clients,
            "dispatch": self.dispatch_stats(),
            "latency_us": self.latency.as_wire(),
            "host_vectors": self.table.host_vectors(),
            "msix_strategy": str(self.table.msix_strategy),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "dma": self.broker.totals(),
            "lifecycle": self.lifecycle(),
        }


def settings_of(config: ServerConfig) -> tuple[AccessPolicy, ServerLimits]:
    """The access policy and limits ``config`` asks for; ``ConfigError`` if unusable.

    Each may be the parsed object, the raw config-file table, or ``None`` for
    the defaults.
    """
    policy = _parsed(config.access_policy, AccessPolicy, AccessPolicy.from_mapping, "access")
    limits = _parsed(config.server_limits, ServerLimits, ServerLimits.from_mapping, "limits")
    return policy, limits


def _parsed(
    value: object, kind: type[_S], from_mapping: Callable[[Mapping[str, Any]], _S], key: str
) -> _S:
    """``value`` as a ``kind``: already one, a config-file table, or ``None`` for defaults."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        return from_mapping(value)
    raise ConfigError(f"{key}: expected {kind.__name__} or a table, got {value!r:.60}")


def _dup(fd: int) -> int:
    try:
        return os.dup(fd)
    except OSError as exc:
        code = ENOSPC if exc.errno in (errno.EMFILE, errno.ENFILE) else EIO
        raise IrqdError(code, f"cannot pass an eventfd: {exc.strerror}") from exc


def _index(name: str) -> IrqIndex:
    try:
        return IrqIndex.from_wire(name)
    except KeyError:
        raise IrqdError(EINVAL, f"unknown interrupt index {name!r}") from None
