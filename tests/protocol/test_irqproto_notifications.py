"""Typed notifications: round trips, bad ones, unknown ones."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from irqproto import (
    DeviceLostNotification,
    ErrNotification,
    IrqNotification,
    Notification,
    RemoteProtocolError,
    ResizedNotification,
    ShutdownNotification,
    TypedNotification,
    encode_irq,
    parse_notification,
)
from irqproto.testing import SERVER, ConnectionPair

TYPED: list[TypedNotification] = [
    IrqNotification("msix", ((0, 3), (7, 1))),
    ResizedNotification("msix", (0, 1, 5), possible_loss=True),
    DeviceLostNotification("removed"),
    ShutdownNotification("SIGTERM"),
    ErrNotification(2),
]


@pytest.mark.parametrize("typed", TYPED)
def test_round_trip_over_a_connection(typed: TypedNotification) -> None:
    [received] = ConnectionPair().send(SERVER, typed.to_message())
    assert isinstance(received, Notification)
    assert parse_notification(received) == typed


def test_wire_forms() -> None:
    assert TYPED[0].to_params() == ["msix", [0, 3, 7, 1]]
    assert TYPED[1].to_params() == ["msix", {"vectors": [0, 1, 5], "possible_loss": True}]
    assert TYPED[2].to_params() == [{"reason": "removed"}]
    assert TYPED[3].to_params() == [{"reason": "SIGTERM"}]


def test_encode_irq_is_the_plain_notification() -> None:
    data = encode_irq("msix", [4, 2, 9, 1])
    assert msgpack.unpackb(data) == [2, "irq", ["msix", [4, 2, 9, 1]]]
    irq = parse_notification(Notification("irq", ("msix", [4, 2, 9, 1])))
    assert isinstance(irq, IrqNotification)
    assert irq.as_dict() == {4: 2, 9: 1}


def test_unknown_names_and_keys_are_tolerated() -> None:
    future = Notification("rebalanced", ({"x": 1},))
    assert parse_notification(future) is future
    extra = Notification("resized", ("msi", {"vectors": [0], "possible_loss": False, "new": 1}))
    assert parse_notification(extra) == ResizedNotification("msi", (0,), possible_loss=False)
    assert parse_notification(Notification("device_lost", ({"reason": "fire"},))) == (
        DeviceLostNotification("fire")
    )


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("irq", ["msix"]),
        ("irq", ["bogus", [0, 1]]),
        ("irq", ["msix", []]),
        ("irq", ["msix", [0]]),
        ("irq", ["msix", [0, 0]]),  # counts are >= 1
        ("irq", ["msix", [0, True]]),
        ("irq", ["msix", [2048, 1]]),
        ("irq", ["msix", [1, 1, 1, 2]]),  # a vector twice
        ("irq", ["msix", {"0": 1}]),
        ("resized", ["msix", {"vectors": [0]}]),
        ("resized", ["msix", {"vectors": 0, "possible_loss": True}]),
        ("resized", ["msix", {"vectors": [0], "possible_loss": 1}]),
        ("resized", ["msix"]),
        ("device_lost", []),
        ("device_lost", [{"reason": 1}]),
        ("shutdown", ["bye"]),
    ],
)
def test_bad_known_notifications_are_remote_errors(method: str, params: list[Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_notification(Notification(method, tuple(params)))
