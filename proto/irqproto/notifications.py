"""Server-to-client notifications: typed forms, parsing, and the ``irq`` fast path.

Every typed notification has ``to_params()`` and ``to_message()``;
:func:`parse_notification` goes the other way and raises
:class:`RemoteProtocolError` for a known notification with bad params. Unknown
notification names come back as the raw :class:`Notification`, so an older
client keeps working when the server learns new ones. Unknown map keys are
ignored for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import msgpack

from .errors import ErrorCode, RemoteProtocolError
from .limits import MAX_VECTOR
from .messages import NOTIFICATION, Notification
from .methods import INDEX_NAMES

__all__ = [
    "DEVICE_LOST",
    "DEVICE_LOST_REASONS",
    "ERR",
    "IRQ",
    "RESIZED",
    "SHUTDOWN",
    "DeviceLostNotification",
    "ErrNotification",
    "IrqNotification",
    "ResizedNotification",
    "ShutdownNotification",
    "TypedNotification",
    "encode_irq",
    "parse_notification",
]

IRQ: Final = "irq"
RESIZED: Final = "resized"
DEVICE_LOST: Final = "device_lost"
SHUTDOWN: Final = "shutdown"
#: Extension (not in the original notification table): the device reported an error (AER).
ERR: Final = "err"

#: The reasons the server gives for ``device_lost`` today; clients must accept others.
DEVICE_LOST_REASONS: Final = ("request", "removed", "error")


def encode_irq(index: str, flat_counts: list[int]) -> bytes:
    """The bytes of ``[2, "irq", [index, [v1, n1, v2, n2, ...]]]``, for the hot path.

    No validation: the daemon builds ``flat_counts`` itself.
    """
    return msgpack.packb([NOTIFICATION, IRQ, [index, flat_counts]], use_bin_type=True)


@dataclass(frozen=True, slots=True)
class IrqNotification:
    """Interrupts since the last ``irq`` for this index: ``(vector, count)`` pairs.

    Every count is at least 1; a vector appears at most once per notification.
    """

    index: str
    counts: tuple[tuple[int, int], ...]

    def as_dict(self) -> dict[int, int]:
        """``{vector: count}``."""
        return dict(self.counts)

    def flat(self) -> list[int]:
        """The wire form of ``counts``: ``[v1, n1, v2, n2, ...]``."""
        return [n for pair in self.counts for n in pair]

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.index, self.flat()]

    def to_message(self) -> Notification:
        """The notification message."""
        return Notification(IRQ, tuple(self.to_params()))


@dataclass(frozen=True, slots=True)
class ResizedNotification:
    """The index was re-enabled with a new vector set; ``possible_loss`` if it was
    disabled in between (a NORESIZE kernel), so interrupts may have been lost."""

    index: str
    vectors: tuple[int, ...]
    possible_loss: bool

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.index, {"vectors": list(self.vectors), "possible_loss": self.possible_loss}]

    def to_message(self) -> Notification:
        """The notification message."""
        return Notification(RESIZED, tuple(self.to_params()))


@dataclass(frozen=True, slots=True)
class DeviceLostNotification:
    """The device is gone (see :data:`DEVICE_LOST_REASONS`); the server closes next."""

    reason: str

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [{"reason": self.reason}]

    def to_message(self) -> Notification:
        """The notification message."""
        return Notification(DEVICE_LOST, tuple(self.to_params()))


@dataclass(frozen=True, slots=True)
class ShutdownNotification:
    """The server is stopping; ``reason`` is human text."""

    reason: str

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [{"reason": self.reason}]

    def to_message(self) -> Notification:
        """The notification message."""
        return Notification(SHUTDOWN, tuple(self.to_params()))


@dataclass(frozen=True, slots=True)
class ErrNotification:
    """The device signalled its ERR index (a PCIe AER error) ``count`` times since
    the last ``err``; sent to every client. The device may need a reset."""

    count: int

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [{"count": self.count}]

    def to_message(self) -> Notification:
        """The notification message."""
        return Notification(ERR, tuple(self.to_params()))


TypedNotification: TypeAlias = (
    IrqNotification
    | ResizedNotification
    | DeviceLostNotification
    | ShutdownNotification
    | ErrNotification
)


def parse_notification(msg: Notification) -> TypedNotification | Notification:
    """The typed form of ``msg``; unknown names are returned unchanged.

    Raises :class:`RemoteProtocolError` if a known notification is malformed.
    """
    if msg.method == IRQ:
        return _irq(msg.params)
    if msg.method == RESIZED:
        return _resized(msg.params)
    if msg.method == DEVICE_LOST:
        return DeviceLostNotification(_reason(msg.params, DEVICE_LOST))
    if msg.method == SHUTDOWN:
        return ShutdownNotification(_reason(msg.params, SHUTDOWN))
    if msg.method == ERR:
        return _err(msg.params)
    return msg


def _bad(name: str, detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.EPROTO, f"bad {name} notification: {detail}")


def _index(value: object, name: str) -> str:
    if not isinstance(value, str) or value not in INDEX_NAMES:
        raise _bad(name, f"unknown index {value!r:.40}")
    return value


def _vector(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_VECTOR:
        raise _bad(name, f"bad vector {value!r:.40}")
    return value


def _irq(params: Sequence[Any]) -> IrqNotification:
    if len(params) != 2:
        raise _bad(IRQ, f"expected 2 params, got {len(params)}")
    index = _index(params[0], IRQ)
    flat = params[1]
    if not isinstance(flat, list) or not flat or len(flat) % 2:
        raise _bad(IRQ, "counts must be a non-empty array of vector, count pairs")
    vectors = [_vector(v, IRQ) for v in flat[0::2]]
    counts = flat[1::2]
    for count in counts:
        if type(count) is not int or count < 1:
            raise _bad(IRQ, f"count must be an int >= 1, got {count!r:.40}")
    if len(set(vectors)) != len(vectors):
        raise _bad(IRQ, "a vector appears twice")
    return IrqNotification(index, tuple(zip(vectors, counts, strict=True)))


def _resized(params: Sequence[Any]) -> ResizedNotification:
    if len(params) != 2 or not isinstance(params[1], dict):
        raise _bad(RESIZED, "expected [index, {vectors, possible_loss}]")
    index = _index(params[0], RESIZED)
    body = params[1]
    vectors = body.get("vectors")
    possible_loss = body.get("possible_loss")
    if not isinstance(vectors, list):
        raise _bad(RESIZED, "vectors must be an array")
    if not isinstance(possible_loss, bool):
        raise _bad(RESIZED, "possible_loss must be a bool")
    return ResizedNotification(index, tuple(_vector(v, RESIZED) for v in vectors), possible_loss)


def _err(params: Sequence[Any]) -> ErrNotification:
    if len(params) != 1 or not isinstance(params[0], dict):
        raise _bad(ERR, "expected [{count}]")
    count = params[0].get("count")
    if type(count) is not int or count < 1:
        raise _bad(ERR, f"count must be an int >= 1, got {count!r:.40}")
    return ErrNotification(count)


def _reason(params: Sequence[Any], name: str) -> str:
    if len(params) != 1 or not isinstance(params[0], dict):
        raise _bad(name, "expected [{reason}]")
    reason = params[0].get("reason")
    if not isinstance(reason, str):
        raise _bad(name, "reason must be a string")
    return reason
