"""Connection: two in-memory peers, the envelope rules, and broken-stays-broken."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irqproto import (
    E2BIG,
    EINVAL,
    EPROTO,
    NEED_DATA,
    Connection,
    ConnectionClosed,
    ErrorCode,
    ErrorInfo,
    LocalProtocolError,
    Message,
    Notification,
    RemoteProtocolError,
    Request,
    Response,
)
from irqproto.messages import MAX_MSGID
from irqproto.testing import CLIENT, SERVER, ConnectionPair, Role

ROLES: list[Role] = [CLIENT, SERVER]


def events_of(conn: Connection, data: bytes) -> list[Any]:
    conn.receive_data(data)
    events: list[Any] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


@pytest.mark.parametrize("role", ROLES)
def test_every_message_type_in_both_directions(role: Role) -> None:
    pair = ConnectionPair()
    peer = pair.other(role)
    request = Request(7, "subscribe", ("msix", [0, 1], {}))
    assert pair.send(role, request) == [request]
    ok = Response(7, None, {"vectors": [0, 1], "enabled": [0, 1], "how": "dynamic"})
    assert pair.send(peer, ok) == [ok]
    note = Notification("irq", ("msix", [0, 3, 1, 1]))
    assert pair.send(role, note) == [note]
    msgid, data = pair.conn[role].send_request("stats", [])
    [received] = pair.deliver(peer, data)
    assert received == Request(msgid, "stats", ())
    failed = Response(msgid, ErrorInfo("ENODEV", "gone"), None)
    assert pair.send(peer, failed) == [failed]
    assert pair.deliver(role, b"") == [ConnectionClosed()]
    assert pair.conn[role].outstanding == frozenset()
    assert pair.conn[peer].unanswered == frozenset()


def test_plain_msgpack_from_another_implementation_is_understood() -> None:
    conn = Connection()
    data = msgpack.packb([0, 1, "hello", [{"client": "x", "protocol": 1}]])
    assert events_of(conn, data) == [Request(1, "hello", ({"client": "x", "protocol": 1},))]
    reply = conn.respond(1, {"protocol": 1})
    assert msgpack.unpackb(reply) == [1, 1, None, {"protocol": 1}]


def test_respond_error_wire_form() -> None:
    conn = Connection()
    [request] = events_of(conn, msgpack.packb([0, 5, "nope", []]))
    assert isinstance(request, Request)
    data = conn.respond_error(request, "ENOSYS", "unknown method 'nope'")
    assert msgpack.unpackb(data) == [1, 5, ["ENOSYS", "unknown method 'nope'"], None]


def test_msgids_count_up_wrap_at_2_32_and_skip_ids_in_flight() -> None:
    conn = Connection()
    assert [conn.send_request("stats", [])[0] for _ in range(3)] == [0, 1, 2]
    conn._next_msgid = MAX_MSGID  # jump to the end instead of sending 2**32 requests
    assert conn.send_request("stats", [])[0] == MAX_MSGID
    # 0, 1 and 2 are still awaiting responses, so the counter skips them.
    assert conn.send_request("stats", [])[0] == 3


def test_response_to_unknown_id_is_the_peers_fault_and_breaks_for_good() -> None:
    conn = Connection()
    with pytest.raises(RemoteProtocolError) as info:
        events_of(conn, msgpack.packb([1, 9, None, {}]))
    assert info.value.code == EPROTO
    conn.receive_data(msgpack.packb([2, "irq", ["msix", [0, 1]]]))
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="broken"):
            conn.next_event()


def test_peer_reusing_an_id_in_flight_is_a_remote_error() -> None:
    conn = Connection()
    events_of(conn, msgpack.packb([0, 1, "stats", []]))
    with pytest.raises(RemoteProtocolError):
        events_of(conn, msgpack.packb([0, 1, "stats", []]))


def test_answering_twice_or_never_asked_is_a_local_error() -> None:
    conn = Connection()
    with pytest.raises(LocalProtocolError):
        conn.respond(3, {})
    events_of(conn, msgpack.packb([0, 3, "stats", []]))
    conn.respond(3, {})
    with pytest.raises(LocalProtocolError):
        conn.respond(3, {})
    conn.send_request("stats", [])
    with pytest.raises(LocalProtocolError):
        conn.send(Request(0, "stats", ()))  # id 0 is already in flight


@pytest.mark.parametrize(
    "msg",
    [
        Request(-1, "x", ()),
        Request(MAX_MSGID + 1, "x", ()),
        Request(True, "x", ()),
        Request(1, 5, ()),  # type: ignore[arg-type]
        Notification("x", "not a list"),  # type: ignore[arg-type]
        Response(1, ErrorInfo(1, "x"), None),  # type: ignore[arg-type]
    ],
)
def test_sending_what_no_peer_could_decode_is_a_local_error(msg: Message) -> None:
    with pytest.raises(LocalProtocolError):
        Connection().send(msg)


def test_unencodable_result_is_a_local_error_and_keeps_the_request_open() -> None:
    conn = Connection()
    events_of(conn, msgpack.packb([0, 1, "stats", []]))
    with pytest.raises(LocalProtocolError):
        conn.respond(1, {"x": object()})
    assert conn.unanswered == {1}
    conn.respond(1, {})


@pytest.mark.parametrize(
    "obj",
    [
        5,
        "x",
        [],
        {"a": 1},
        [3, 1, "x", []],  # unknown type tag
        [True, 1, "x", []],  # bool is not a type tag
        [0, 1, "x"],  # request too short
        [0, 1, "x", [], 5],  # request too long
        [0, "1", "x", []],  # msgid not an int
        [0, -1, "x", []],
        [0, 2**32, "x", []],  # msgid range
        [0, 1, 5, []],  # method neither str nor bin (bin and lone params: test_interop.py)
        [1, 1, None],  # response too short
        [1, 1, "EINVAL", None],  # error not [code, message]
        [1, 1, ["EINVAL"], None],
        [1, 1, ["EINVAL", 5], None],
        [2, "x"],  # notification too short
        [2, 5, []],
    ],
)
def test_bad_shapes_are_remote_errors(obj: Any) -> None:
    conn = Connection()
    conn.send_request("x", [])  # so that a response to id 1 is not rejected for its id
    conn.send_request("x", [])
    with pytest.raises(RemoteProtocolError) as info:
        events_of(conn, msgpack.packb(obj, use_bin_type=True))
    assert info.value.code == EPROTO


def test_eof_on_a_boundary_closes_cleanly_and_mid_message_does_not() -> None:
    data = msgpack.packb([2, "irq", ["msix", [0, 1]]])
    conn = Connection()
    assert events_of(conn, data) == [Notification("irq", ("msix", [0, 1]))]
    assert events_of(conn, b"") == [ConnectionClosed()]
    assert conn.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")

    conn = Connection()
    conn.receive_data(data[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        conn.next_event()


def test_limits_reach_the_connection() -> None:
    conn = Connection()
    huge = msgpack.packb([2, "x", ["a" * 70_000]])
    with pytest.raises(RemoteProtocolError) as info:
        events_of(conn, huge)
    assert info.value.code == E2BIG


def test_every_error_class_takes_the_code_first() -> None:
    local = LocalProtocolError(ErrorCode.EINVAL, "x")
    remote = RemoteProtocolError(ErrorCode.E2BIG, "y")
    assert (local.code, local.message) == (EINVAL, "x")
    assert (remote.code, remote.message) == (ErrorCode.E2BIG, "y")
    assert str(remote) == "E2BIG: y"


def test_error_codes_are_their_wire_strings() -> None:
    # The enum must not change the wire: each member encodes as the plain string.
    for code in ErrorCode:
        assert code == code.name and msgpack.unpackb(msgpack.packb(code)) == code.name
    assert EINVAL is ErrorCode.EINVAL


# -- hypothesis: chunking and garbage ------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
values = st.recursive(
    scalars | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
params = st.lists(values, max_size=4).map(tuple)
msgids = st.integers(0, MAX_MSGID)
requests = st.builds(Request, msgids, st.text(max_size=12), params)
notifications = st.builds(Notification, st.text(max_size=12), params)


@settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
@given(st.lists(requests | notifications, max_size=8), st.data())
def test_any_chunking_of_a_valid_stream_yields_the_same_messages(
    drawn: list[Request | Notification], data: st.DataObject
) -> None:
    # Requests in flight need distinct ids, or the receiver rightly objects.
    messages = [replace(m, msgid=i) if isinstance(m, Request) else m for i, m in enumerate(drawn)]
    sender = Connection()
    stream = b"".join(sender.send(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    conn = Connection()
    received: list[Any] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        received += events_of(conn, stream[start:end]) if end > start else []
    received += events_of(conn, b"")
    assert received == [*messages, ConnectionClosed()]


def check_only_remote_errors(stream: bytes, chunk: int) -> None:
    conn = Connection()
    conn.send_request("x", [])  # let some responses be valid
    try:
        for i in range(0, len(stream), chunk):
            events_of(conn, stream[i : i + chunk])
        events_of(conn, b"")
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            conn.next_event()


@settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
@given(st.binary(max_size=300), st.integers(1, 64))
def test_random_bytes_only_ever_raise_remote_protocol_error(stream: bytes, chunk: int) -> None:
    check_only_remote_errors(stream, chunk)


@settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
@given(
    st.lists(requests | notifications, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(1, 64),
)
def test_mutated_streams_only_ever_raise_remote_protocol_error(
    messages: list[Message], mutations: list[tuple[int, int]], chunk: int
) -> None:
    stream = bytearray(b"".join(Connection().send(m) for m in messages))
    for pos, byte in mutations:
        stream[pos % len(stream)] = byte
    check_only_remote_errors(bytes(stream), chunk)
