"""The decoder fuzz target: what the daemon does with any bytes a client sends.

``check(data, cuts)`` feeds ``data`` to a server-side ``irqproto.Connection``
(split at ``cuts``, then EOF), validates every request's params as the daemon
does, and checks:

* the only exception is ``RemoteProtocolError`` (then the connection stays
  broken), and ``parse_params`` raises only ``RequestError``;
* the outcome does not depend on how the bytes were split into reads;
* the stream ends in ``ConnectionClosed`` or that error, nothing else.

``make test`` runs it briefly through hypothesis (tests/security/test_fuzz_decoder.py);
``make fuzz`` runs it for longer: with atheris (coverage-guided, libFuzzer) when
it is installed, else with hypothesis at scale. Run directly::

    python -m tests.security.fuzz_decoder [-max_total_time=60]      # atheris
    python -m tests.security.fuzz_decoder --hypothesis -max_total_time=60
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from irqproto.connection import Connection
from irqproto.errors import RemoteProtocolError, RequestError
from irqproto.messages import ConnectionClosed, NeedData, Request
from irqproto.methods import parse_params


def outcome(data: bytes, cuts: Sequence[int] = ()) -> list[Any]:
    """What a server connection makes of ``data`` read in pieces split at ``cuts``."""
    conn = Connection()
    events: list[Any] = []
    bounds = sorted({c for c in cuts if 0 < c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    for piece in [*pieces, b""]:
        if piece:
            conn.receive_data(piece)
        else:
            conn.receive_data(b"")  # EOF
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                events.append(("error", exc.code))
                try:
                    conn.next_event()
                except RemoteProtocolError:
                    pass
                else:
                    raise AssertionError("a broken connection produced an event")
                return events
            if isinstance(event, NeedData):
                break
            if isinstance(event, ConnectionClosed):
                events.append(("closed",))
                return events
            if isinstance(event, Request):
                try:
                    parsed: Any = parse_params(event.method, event.params)
                except RequestError as exc:
                    parsed = ("invalid", exc.code, exc.field)
                events.append(("request", event.msgid, event.method, repr(parsed)))
                conn.respond(event, None)
            else:
                events.append(("message", repr(event)))
    raise AssertionError("EOF did not end the stream")


def check(data: bytes, cuts: Sequence[int] = ()) -> None:
    """The fuzz property: see the module docstring."""
    whole = outcome(data)
    assert whole[-1][0] in ("closed", "error"), whole
    if cuts:
        assert outcome(data, cuts) == whole, (data, cuts)


def _atheris_target(data: bytes) -> None:
    # The first byte picks a split point, so chunking is fuzzed too.
    if not data:
        return
    cut = data[0] % max(len(data), 1)
    check(data[1:], [cut])


def seeds() -> list[bytes]:
    """Valid and nearly valid messages to start from."""
    return [
        msgpack.packb([0, 1, "hello", [{"client": "x", "protocol": 1}]]),
        msgpack.packb([0, 2, "subscribe", ["msix", [0, 1, 2]]]),
        msgpack.packb([0, 3, "claim", ["msix", 7]]),
        msgpack.packb([2, "irq", ["msix", [0, 1]]]),
        msgpack.packb([0, 4, "trigger", ["msix", [2**64 - 1]]]),
    ]


def main(argv: list[str]) -> int:
    """Entry point for ``make fuzz``; libFuzzer flags (``-max_total_time=N``) pass through."""
    seconds = 60.0
    for arg in argv:
        if arg.startswith("-max_total_time="):
            seconds = float(arg.partition("=")[2])
    if "--hypothesis" in argv:
        return _hypothesis(seconds)
    try:
        atheris: Any = importlib.import_module("atheris")
    except ImportError:
        print("atheris is not installed; running hypothesis instead")
        return _hypothesis(seconds)
    # Under .hypothesis/: ignored by git and removed by `make clean`.
    corpus = Path(".hypothesis/fuzz-corpus/decoder")
    if not corpus.exists():
        corpus.mkdir(parents=True)
        for i, seed in enumerate(seeds()):
            (corpus / f"seed{i}").write_bytes(b"\x03" + seed)
    # irqproto is imported already: instrument what is loaded, not new imports.
    atheris.instrument_all()
    atheris.Setup(
        [argv[0], *[a for a in argv[1:] if a != "--hypothesis"], str(corpus)], _atheris_target
    )
    atheris.Fuzz()
    return 0


def _hypothesis(seconds: float) -> int:
    """Hypothesis batches of 2000 examples until ``seconds`` have passed."""
    from hypothesis import HealthCheck, given, settings  # noqa: PLC0415  only when run

    from .test_fuzz_decoder import byte_streams  # noqa: PLC0415

    @settings(
        max_examples=2000,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(byte_streams())
    def run(case: tuple[bytes, list[int]]) -> None:
        check(*case)

    deadline = time.monotonic() + seconds
    batches = 0
    while time.monotonic() < deadline:
        run()
        batches += 1
    print(f"decoder fuzz: {batches * 2000} hypothesis examples, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
