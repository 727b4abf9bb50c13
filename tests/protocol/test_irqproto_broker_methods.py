"""The device broker's methods: params of device.* and dma.*, and their fds on the client side."""

from __future__ import annotations

import os
from typing import Any

import pytest

from irqproto import EINVAL, RequestError, parse_params
from irqproto._client import ClientCore
from irqproto.codec import encode
from irqproto.errors import RemoteProtocolError
from irqproto.methods import (
    MAX_DMA_NAME,
    DeviceOpenParams,
    DeviceRegionsParams,
    DeviceResetParams,
    DmaAllocParams,
    DmaFreeParams,
    Params,
)


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("device.regions", [], DeviceRegionsParams()),
        ("device.open", [], DeviceOpenParams()),
        ("device.reset", [], DeviceResetParams()),
        ("dma.alloc", [4096], DmaAllocParams(4096)),
        ("dma.alloc", [4096, {}], DmaAllocParams(4096)),
        (
            "dma.alloc",
            [1 << 21, {"iova": 1 << 30, "name": "sq", "hugepages": True, "iova_max": 2**28 - 1}],
            DmaAllocParams(1 << 21, 1 << 30, "sq", True, 2**28 - 1),
        ),
        ("dma.alloc", [0], DmaAllocParams(0)),  # refused by the server, with the page size
        ("dma.free", [7], DmaFreeParams(7)),
    ],
)
def test_valid_params(method: str, params: list[Any], expected: Params) -> None:
    parsed = parse_params(method, params)
    assert parsed == expected
    assert parse_params(method, parsed.to_params()) == expected


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("device.open", [1], "params"),
        ("device.regions", [{}], "params"),
        ("device.reset", ["now"], "params"),
        ("dma.alloc", [], "params"),
        ("dma.alloc", [-4096], "params[0]"),
        ("dma.alloc", [2**64], "params[0]"),
        ("dma.alloc", [4096.0], "params[0]"),
        ("dma.alloc", [True], "params[0]"),
        ("dma.alloc", [4096, []], "params[1]"),
        ("dma.alloc", [4096, {"iova": "0x1000"}], "params[1].iova"),
        ("dma.alloc", [4096, {"iova": -1}], "params[1].iova"),
        ("dma.alloc", [4096, {"iova_max": None, "hugepages": 1}], "params[1].hugepages"),
        ("dma.alloc", [4096, {"name": 5}], "params[1].name"),
        ("dma.alloc", [4096, {"name": "x" * (MAX_DMA_NAME + 1)}], "params[1].name"),
        ("dma.alloc", [4096, {"align": 4096}], "params[1].align"),
        ("dma.alloc", [4096, {}, {}], "params"),
        ("dma.free", [], "params"),
        ("dma.free", ["1"], "params[0]"),
    ],
)
def test_bad_params_name_their_field(method: str, params: list[Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_params(method, params)
    assert (info.value.code, info.value.field) == (EINVAL, field)


@pytest.mark.parametrize("method", ["device.open", "dma.alloc"])
def test_one_fd_per_broker_response(method: str) -> None:
    core = ClientCore()
    msgid, _ = core.start_call(method, [])
    r, w = os.pipe()
    try:
        # Two fds arrive with the response: it takes one, the other waits for the next.
        core.receive(encode([1, msgid, None, {"regions": [], "id": 1}]), [r, w])
        outcome = core.take(msgid)
        assert outcome is not None
        assert outcome.fds == (r,)
        assert list(core.fds) == [w]
    finally:
        core.close()  # closes w
        os.close(r)


def test_a_broker_response_without_its_fd_breaks_the_connection() -> None:
    core = ClientCore()
    msgid, _ = core.start_call("device.open", [])
    core.receive(encode([1, msgid, None, {"regions": []}]), [])
    with pytest.raises(RemoteProtocolError):
        core.take(msgid)


def test_an_error_response_takes_no_fd() -> None:
    core = ClientCore()
    msgid, _ = core.start_call("dma.alloc", [4096])
    core.receive(encode([1, msgid, ["E2BIG", "over the limit"], None]), [])
    outcome = core.take(msgid)
    assert outcome is not None
    assert outcome.fds == ()
