"""The decoder's limits, msgpack's own failure modes, and encode."""

from __future__ import annotations

from typing import Any

import msgpack
import msgpack.fallback
import pytest

from irqproto import (
    E2BIG,
    EPROTO,
    MAX_VECTOR,
    NEED_DATA,
    Connection,
    Decoder,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    encode,
    encode_irq,
)

UNPACKERS = [
    pytest.param(msgpack.Unpacker, id="c"),
    pytest.param(msgpack.fallback.Unpacker, id="fallback"),
]


def decode_all(
    data: bytes, limits: Limits | None = None, unpacker: Any = msgpack.Unpacker
) -> list[Any]:
    decoder = Decoder(limits, unpacker_class=unpacker)
    decoder.feed(data)
    out: list[Any] = []
    while (obj := decoder.next()) is not NEED_DATA:
        out.append(obj)
    return out


def expect_error(
    data: bytes, code: str, limits: Limits | None = None, unpacker: Any = msgpack.Unpacker
) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(data, limits, unpacker)
    assert info.value.code == code, info.value
    return info.value


def test_default_limits_are_documented_values() -> None:
    assert Limits() == Limits(
        max_message_size=64 * 1024,
        max_array_len=4096,
        max_map_len=64,
        max_str_len=4096,
        max_bin_len=64 * 1024,
        max_depth=8,
    )
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)


def test_an_irq_for_every_vector_with_huge_counts_fits_the_default_limits() -> None:
    flat = [n for v in range(MAX_VECTOR + 1) for n in (v, 2**64 - 1)]
    data = encode_irq("msix", flat)
    assert len(flat) == Limits().max_array_len
    assert decode_all(data) == [[2, "irq", ["msix", flat]]]
    assert data == Connection().send_notification("irq", ["msix", flat])


@pytest.mark.parametrize("unpacker", UNPACKERS)
def test_many_small_messages_in_one_read_never_trip_the_size_limit(unpacker: Any) -> None:
    one = msgpack.packb([2, "irq", ["msix", [1, 1]]])
    data = one * (3 * Limits().max_message_size // len(one))
    assert len(decode_all(data, unpacker=unpacker)) == len(data) // len(one)


@pytest.mark.parametrize("unpacker", UNPACKERS)
def test_message_size_limit_is_exact(unpacker: Any) -> None:
    limits = Limits(max_message_size=100, max_str_len=1000)
    header = len(msgpack.packb([2, "x", [""]])) + 1  # str8 header adds a byte
    fits = msgpack.packb([2, "x", ["a" * (100 - header)]])
    assert len(fits) == 100
    assert decode_all(fits + fits, limits, unpacker) == [msgpack.unpackb(fits)] * 2
    too_big = msgpack.packb([2, "x", ["a" * (101 - header)]])
    expect_error(too_big, E2BIG, limits, unpacker)


def test_an_oversized_message_fails_before_it_has_all_arrived() -> None:
    decoder = Decoder(Limits(max_message_size=100, max_str_len=1000))
    decoder.feed(msgpack.packb([2, "x", ["a" * 500]])[:150])
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next()
    assert info.value.code == E2BIG


@pytest.mark.parametrize("unpacker", UNPACKERS)
@pytest.mark.parametrize(
    ("limits", "ok", "too_big"),
    [
        (Limits(max_array_len=3), [1, 2, 3], [1, 2, 3, 4]),
        (Limits(max_map_len=2), {"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}),
        (Limits(max_str_len=5), "abcde", "abcdef"),
        (Limits(max_str_len=5), {"abcde": 1}, {"abcdef": 1}),  # map keys count too
        (Limits(max_bin_len=5), b"abcde", b"abcdef"),
    ],
    ids=["array", "map", "str", "key", "bin"],
)
def test_length_limits(limits: Limits, ok: Any, too_big: Any, unpacker: Any) -> None:
    # Wrapped in a 1-item array, as a real message always is.
    assert decode_all(encode([ok]), limits, unpacker) == [[ok]]
    err = expect_error(encode([too_big]), E2BIG, limits, unpacker)
    assert "exceeds" in err.message


def nested(depth: int) -> list[Any]:
    obj: list[Any] = []
    for _ in range(depth - 1):
        obj = [obj]
    return obj


@pytest.mark.parametrize("unpacker", UNPACKERS)
def test_depth_limit(unpacker: Any) -> None:
    assert decode_all(encode(nested(8)), unpacker=unpacker) == [nested(8)]
    expect_error(encode(nested(9)), E2BIG, unpacker=unpacker)
    expect_error(encode([{"a": {"b": [[[[[[1]]]]]]}}]), E2BIG, unpacker=unpacker)


@pytest.mark.parametrize("unpacker", UNPACKERS)
@pytest.mark.parametrize("depth", [1025, 60_000])
def test_very_deep_input_is_a_protocol_error_not_a_crash(unpacker: Any, depth: int) -> None:
    # msgpack stops at depth 1024 with StackError; the fallback could recurse.
    data = b"\x91" * depth + b"\xc0"
    expect_error(data, E2BIG, Limits(max_message_size=100_000), unpacker)


@pytest.mark.parametrize("unpacker", UNPACKERS)
@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # the one reserved byte
        b"\x91\xa1\xff",  # invalid UTF-8 in a str
        b"\x91\x81\x90\x00",  # an array as a map key
        b"\x91\xd4\x01\x00",  # fixext 1
        b"\x91\xd6\xff\x00\x00\x00\x01",  # a timestamp (ext -1)
    ],
    ids=["c1", "utf8", "key", "ext", "timestamp"],
)
def test_bad_msgpack_is_eproto_and_the_decoder_stays_broken(data: bytes, unpacker: Any) -> None:
    decoder = Decoder(unpacker_class=unpacker)
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next()
    assert info.value.code == EPROTO
    assert decoder.broken is info.value
    decoder.feed(encode([2, "x", []]))
    with pytest.raises(RemoteProtocolError, match="broken"):
        decoder.next()


def test_int_map_keys_are_accepted() -> None:
    assert decode_all(encode([{1: "a"}])) == [[{1: "a"}]]


def test_encode_uses_str_and_bin_types() -> None:
    assert encode(["a", b"a"]) == b"\x92\xa1a\xc4\x01a"
    with pytest.raises(LocalProtocolError):
        encode(object())
    with pytest.raises(LocalProtocolError):
        encode(2**64)


@pytest.mark.parametrize("unpacker", UNPACKERS)
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_release_when_idle_decodes_the_same_stream_and_keeps_no_unpacker_between_messages(
    unpacker: Any, chunk: int
) -> None:
    limits = Limits(max_message_size=200)
    messages = [[0, n, "subscribe", ["msix", list(range(n))]] for n in range(12)]
    data = b"".join(encode(m) for m in messages)
    decoder = Decoder(limits, unpacker_class=unpacker, release_when_idle=True)
    got: list[Any] = []
    idle_between = []
    for start in range(0, len(data), chunk):
        decoder.feed(data[start : start + chunk])
        while (obj := decoder.next()) is not NEED_DATA:
            got.append(obj)
        idle_between.append(decoder._unpacker is None or decoder.in_message)
    assert got == messages
    # At every read boundary: either mid-message, or holding no unpacker.
    assert all(idle_between)
    assert decoder._unpacker is None and not decoder.in_message
    # The size limit still counts from the start of the message.
    decoder.feed(encode([2, "x", ["a" * 300]]))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next()
    assert info.value.code == E2BIG
