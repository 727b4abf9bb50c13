"""The core is sans-IO: it imports with trio and socket blocked."""

from __future__ import annotations

import subprocess
import sys

CORE_MODULES = [
    "irqproto",
    "irqproto.codec",
    "irqproto.connection",
    "irqproto.errors",
    "irqproto.limits",
    "irqproto.messages",
    "irqproto.methods",
    "irqproto.notifications",
    "irqproto.testing",
    "irqproto._client",
]

BLOCKED = """
import importlib, sys
sys.modules["trio"] = None  # any import of it now raises ImportError
sys.modules["socket"] = None
for name in sys.argv[1:]:
    importlib.import_module(name)
import irqproto
conn = irqproto.Connection()
conn.receive_data(conn.send_notification("x", []))
assert isinstance(conn.next_event(), irqproto.Notification)
try:
    importlib.import_module("irqproto.blocking")
except ImportError:
    pass
else:
    raise SystemExit("socket was not blocked")
print("ok")
"""


def test_core_imports_without_trio_or_socket() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, *CORE_MODULES],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"
