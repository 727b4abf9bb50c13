"""docs/protocol.md: every byte-level example decodes to the value shown above it."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import msgpack

from irqproto import NEED_DATA, Connection

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
# A fenced block of two lines: the value (JSON-like, with nil), then its hex.
EXAMPLE = re.compile(r"```\n(\[.*\])\n((?:[0-9a-f]{2} ?)+)\n```")


def value(text: str) -> Any:
    return ast.literal_eval(re.sub(r"\bnil\b", "None", text))


def test_hex_examples_match_their_values() -> None:
    examples = EXAMPLE.findall(DOC.read_text())
    assert len(examples) == 5
    for shown, hexdump in examples:
        data = bytes.fromhex(hexdump)
        assert msgpack.packb(value(shown), use_bin_type=True) == data, shown
        conn = Connection()
        conn.send_request("x", [])  # let the responses answer something
        conn.send_request("x", [])
        conn.send_request("x", [])
        conn.receive_data(data)
        assert conn.next_event() is not NEED_DATA
