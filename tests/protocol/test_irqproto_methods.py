"""parse_params: each method's valid forms, and every error naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from irqproto import (
    EINVAL,
    ENOSYS,
    INDEX_NAMES,
    MAX_VECTOR,
    MAX_VECTORS_PER_REQUEST,
    ClaimParams,
    DeviceInfoParams,
    HelloParams,
    Params,
    RequestError,
    SimEventfdsParams,
    StatsParams,
    SubscribeParams,
    TriggerParams,
    UnclaimParams,
    UnmaskParams,
    UnsubscribeParams,
    parse_params,
)
from irqproto.methods import METHODS


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("hello", [{"client": "x", "protocol": 1}], HelloParams("x", 1)),
        ("hello", [{"client": "x", "protocol": 1, "later": True}], HelloParams("x", 1)),
        ("device.info", [], DeviceInfoParams()),
        ("subscribe", ["msix", [0, 2047]], SubscribeParams("msix", (0, 2047), {})),
        ("subscribe", ["msi", [3], {}], SubscribeParams("msi", (3,), {})),
        ("subscribe", ["intx", [0], {"k": 1}], SubscribeParams("intx", (0,), {"k": 1})),
        ("unsubscribe", ["msix", [5, 1]], UnsubscribeParams("msix", (5, 1))),
        ("trigger", ["err", [0]], TriggerParams("err", (0,))),
        ("unmask", ["intx"], UnmaskParams("intx")),
        ("unmask", ["msix"], UnmaskParams("msix")),  # the server decides what applies
        ("claim", ["req", 0], ClaimParams("req", 0)),
        ("unclaim", ["msix", 7], UnclaimParams("msix", 7)),
        ("stats", [], StatsParams()),
        ("sim.eventfds", ["msix", [1, 2]], SimEventfdsParams("msix", (1, 2))),
    ],
)
def test_valid_params(method: str, params: list[Any], expected: Params) -> None:
    parsed = parse_params(method, params)
    assert parsed == expected
    # to_params is the inverse, up to ignored keys and the optional opts.
    assert parse_params(method, parsed.to_params()) == expected


def test_every_method_and_index_is_listed() -> None:
    assert set(METHODS) == {
        "hello", "device.info", "subscribe", "unsubscribe", "trigger",
        "unmask", "claim", "unclaim", "stats", "sim.eventfds",
        "device.regions", "device.open", "device.reset", "dma.alloc", "dma.free",
    }  # fmt: skip
    assert INDEX_NAMES == ("intx", "msi", "msix", "err", "req")


def test_a_whole_table_is_the_most_one_request_may_name() -> None:
    every = list(range(MAX_VECTORS_PER_REQUEST))
    assert parse_params("trigger", ["msix", every]) == TriggerParams("msix", tuple(every))


def test_unknown_method_is_enosys() -> None:
    with pytest.raises(RequestError) as info:
        parse_params("reboot", [])
    assert (info.value.code, info.value.field) == (ENOSYS, "method")


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("hello", [], "params"),
        ("hello", [{"client": "x", "protocol": 1}, 2], "params"),
        ("hello", ["x"], "params[0]"),
        ("hello", [{"protocol": 1}], "params[0].client"),
        ("hello", [{"client": 5, "protocol": 1}], "params[0].client"),
        ("hello", [{"client": "x"}], "params[0].protocol"),
        ("hello", [{"client": "x", "protocol": 2}], "params[0].protocol"),
        ("hello", [{"client": "x", "protocol": "1"}], "params[0].protocol"),
        ("hello", [{"client": "x", "protocol": True}], "params[0].protocol"),
        ("device.info", [1], "params"),
        ("stats", [{}], "params"),
        ("subscribe", ["msix"], "params"),
        ("subscribe", ["msix", [0], {}, 4], "params"),
        ("subscribe", [2, [0]], "params[0]"),
        ("subscribe", ["MSIX", [0]], "params[0]"),
        ("subscribe", ["msix", 0], "params[1]"),
        ("subscribe", ["msix", []], "params[1]"),
        ("subscribe", ["msix", [0, 1, 2, 3, "4"]], "params[1][4]"),
        ("subscribe", ["msix", [0, True]], "params[1][1]"),
        ("subscribe", ["msix", [0, 1.0]], "params[1][1]"),
        ("subscribe", ["msix", [-1]], "params[1][0]"),
        ("subscribe", ["msix", [0, MAX_VECTOR + 1]], "params[1][1]"),
        ("subscribe", ["msix", [4, 5, 4]], "params[1][2]"),
        ("subscribe", ["msix", [*range(MAX_VECTORS_PER_REQUEST), 0]], "params[1]"),
        ("subscribe", ["msix", [0], []], "params[2]"),
        ("subscribe", ["msix", [0], {1: True}], "params[2]"),
        ("unsubscribe", ["msix"], "params"),
        ("unsubscribe", ["nope", [0]], "params[0]"),
        ("unsubscribe", ["msix", [0, 0]], "params[1][1]"),
        ("trigger", ["msix", [False]], "params[1][0]"),
        ("trigger", ["msix", None], "params[1]"),
        ("unmask", [], "params"),
        ("unmask", ["pci"], "params[0]"),
        ("claim", ["msix"], "params"),
        ("claim", ["msix", [0]], "params[1]"),
        ("claim", ["msix", 2048], "params[1]"),
        ("claim", [None, 0], "params[0]"),
        ("sim.eventfds", ["msix", [0, 9999]], "params[1][1]"),
        ("sim.eventfds", [], "params"),
    ],
)
def test_every_error_names_its_field(method: str, params: list[Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_params(method, params)
    assert info.value.code == EINVAL
    assert info.value.field == field
    assert info.value.message.startswith(f"{field}: ")
