"""What the daemon accepts beyond the letter of msgpack-RPC (docs/protocol.md,
"What the daemon accepts"), and that it stays strict in what it sends: the
rules, sans-IO, on :class:`irqproto.Connection`. The same rules against a real
daemon, spoken with raw msgpack, are in tests/security/test_accepts.py.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from irqproto import (
    EINVAL,
    ENOSYS,
    Connection,
    LocalProtocolError,
    Notification,
    Request,
    RequestError,
    parse_params,
)
from irqproto.messages import MAX_MSGID, undecodable

NOT_UTF8 = b"\xff\xfehello"


def events_of(*messages: Any) -> list[Request | Notification]:
    """The requests and notifications a server-side Connection reads from ``messages``."""
    conn = Connection()
    conn.receive_data(b"".join(msgpack.packb(m, use_bin_type=True) for m in messages))
    out: list[Request | Notification] = []
    while isinstance(event := conn.next_event(), Request | Notification):
        out.append(event)
    return out


# -- the rules, sans-IO -------------------------------------------------------------


def test_a_bin_method_that_is_utf8_is_that_method() -> None:
    assert events_of([0, 1, b"stats", []], [2, b"nvim_set_client_info", ["x"]]) == [
        Request(1, "stats", ()),
        Notification("nvim_set_client_info", ("x",)),
    ]
    assert events_of([0, 2, "ünïcode".encode(), []]) == [Request(2, "ünïcode", ())]


def test_a_bin_method_that_is_not_utf8_is_einval_and_the_stream_goes_on() -> None:
    first, second = events_of([0, 1, NOT_UTF8, []], [0, 2, "stats", []])
    assert isinstance(first, Request) and undecodable(first.method)
    assert second == Request(2, "stats", ())
    with pytest.raises(RequestError) as info:
        parse_params(first.method, first.params)
    assert (info.value.code, info.value.field) == (EINVAL, "method")
    assert "\\xff\\xfe" in info.value.message  # the bytes as received, escaped
    # A str from msgpack can never be undecodable; an unknown one is still ENOSYS.
    assert not undecodable("stats") and not undecodable("ünïcode")
    with pytest.raises(RequestError) as unknown:
        parse_params("reboot", [])
    assert unknown.value.code == ENOSYS


@pytest.mark.parametrize(
    ("params", "read_as"),
    [
        ({"client": "x", "protocol": 1}, ({"client": "x", "protocol": 1},)),
        ("intx", ("intx",)),
        (5, (5,)),
        (None, (None,)),
        (b"raw", (b"raw",)),
        ([], ()),  # an array is the params, never wrapped
        ([["msix", [0]]], (["msix", [0]],)),
    ],
)
def test_params_that_are_not_an_array_are_one_param(params: Any, read_as: tuple[Any, ...]) -> None:
    assert events_of([0, 1, "m", params], [2, "n", params]) == [
        Request(1, "m", read_as),
        Notification("n", read_as),
    ]


def test_a_lone_value_then_meets_the_methods_own_arity() -> None:
    (hello,) = events_of([0, 1, "hello", {"client": "x", "protocol": 1}])
    assert isinstance(hello, Request)
    assert parse_params(hello.method, hello.params).client == "x"  # type: ignore[union-attr]
    (stats,) = events_of([0, 2, "stats", None])
    assert isinstance(stats, Request)
    with pytest.raises(RequestError) as info:
        parse_params(stats.method, stats.params)
    assert (info.value.code, info.value.field) == (EINVAL, "params")


@pytest.mark.parametrize("msgid", [0, 1, 2**31, MAX_MSGID - 1, MAX_MSGID])
def test_every_uint32_request_id_is_answered_with_it(msgid: int) -> None:
    server = Connection()
    server.receive_data(msgpack.packb([0, msgid, "stats", []]))
    request = server.next_event()
    assert request == Request(msgid, "stats", ())
    assert msgpack.unpackb(server.respond(request, {})) == [1, msgid, None, {}]


def test_what_we_send_has_str_methods_and_array_params() -> None:
    conn = Connection()
    _, data = conn.send_request("stats", ())
    sent = msgpack.unpackb(data, raw=True)  # raw: a str would come back as bytes too
    assert sent == [0, 0, b"stats", []]
    assert data[3] == 0xA5  # fixstr of 5 bytes, not bin (0xc4)
    note = conn.send_notification("irq", ("msix", [0, 1]))
    assert note[2] == 0xA3 and msgpack.unpackb(note) == [2, "irq", ["msix", [0, 1]]]
    # Never bin, and never an undecodable name passed through.
    with pytest.raises(LocalProtocolError):
        conn.send(Request(9, b"stats", ()))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        conn.send(Notification(NOT_UTF8.decode("utf-8", "surrogateescape"), ()))
