"""A brief run of the decoder fuzz target (fuzz_decoder.py); `make fuzz` runs it long."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fuzz_decoder import check, seeds

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["hello", "subscribe", "claim", "msix", "intx", "client", "protocol"])
)
_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
_envelopes = st.one_of(
    st.tuples(
        st.just(0),
        st.integers(-2, 2**33),
        st.sampled_from(["hello", "subscribe", "claim", "stats", "trigger", "x"]),
        st.lists(_values, max_size=4),
    ).map(list),
    st.tuples(st.integers(0, 3), _values, _values).map(list),
    _values,
)


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in flips:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf[:cut] if cut is not None else buf)


@st.composite
def byte_streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Random bytes, random msgpack, or valid requests with bytes changed or cut off."""
    kind = draw(st.sampled_from(["raw", "msgpack", "mutated"]))
    if kind == "raw":
        data = draw(st.binary(max_size=200))
    else:
        messages = draw(st.lists(_envelopes, min_size=1, max_size=5))
        data = b"".join(msgpack.packb(m) for m in messages)
        if kind == "mutated":
            data = draw(st.sampled_from(seeds())) + data
            flips = draw(
                st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3)
            )
            cut = draw(st.none() | st.integers(0, len(data)))
            data = _mutate(data, flips, cut)
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=4))
    return data, cuts


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(byte_streams())
def test_any_bytes_give_events_or_a_protocol_error_whatever_the_reads(
    case: tuple[bytes, list[int]],
) -> None:
    check(*case)


def test_the_seeds_are_valid_and_answered() -> None:
    for seed in seeds():
        check(seed, [1, 3])
