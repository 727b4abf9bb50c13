"""Logging straight into journald: every structlog key becomes a journal field.

Under systemd a service's stdout is a stream to journald, which stores each
line as one ``MESSAGE=`` and nothing else: a JSON line stays a string that
``journalctl`` cannot filter on. journald's native protocol (a datagram of
``KEY=value`` lines on ``/run/systemd/journal/socket``, described in
systemd's ``docs/JOURNAL_NATIVE_PROTOCOL.md``) carries fields instead. So when
``$JOURNAL_STREAM`` says that our output goes to the journal (systemd.exec(5):
it holds the device and inode of that stream), each event is sent natively:

- ``MESSAGE`` is the same JSON line the stream would have carried, so
  ``journalctl -o cat`` still shows one JSON object per event;
- ``PRIORITY`` is the syslog level of the event's level;
- ``SYSLOG_IDENTIFIER`` is ``vfio-irqd``;
- every key of the event is a field of its own, upper-cased (``event`` →
  ``EVENT``, ``clients`` → ``CLIENTS``), non-string values as JSON:
  ``journalctl -u vfio-irqd@... EVENT=daemon.ready -o json``.

A datagram journald cannot take (the socket gone, or a message larger than a
datagram) is written to the stream instead, so nothing is lost.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = [
    "JOURNAL_SOCKET",
    "JournalLogger",
    "JournalLoggerFactory",
    "encode_entry",
    "field_name",
    "journal_fields",
    "stream_is_journal",
]

#: Where journald listens for native-protocol datagrams (systemd-journald.service(8)).
JOURNAL_SOCKET = "/run/systemd/journal/socket"

SYSLOG_IDENTIFIER = "vfio-irqd"

#: syslog(3) priorities of structlog's level names.
_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}

#: Fields a client may not set or that this module sets itself. Names starting
#: with "_" are journald's trusted fields and refused (JOURNAL_NATIVE_PROTOCOL.md).
_OWN = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"})

_INVALID = re.compile(r"[^A-Z0-9_]")


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journald stream ``$JOURNAL_STREAM`` names."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        # A stream without a file descriptor (a test's StringIO) is not the journal.
        return False


def field_name(key: str) -> str | None:
    """The journal field for a structlog key, or ``None`` if it cannot be one.

    Field names are upper-case letters, digits and underscores, at most 64
    characters, not starting with an underscore or a digit.
    """
    name = _INVALID.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        return None
    name = name[:64]
    # A key that would overwrite what this module sets keeps its value under another name.
    return f"IRQD_{name}"[:64] if name in _OWN else name


def journal_fields(event_dict: Mapping[str, Any]) -> dict[str, str]:
    """The event's keys as journal fields (values as text; non-strings as JSON)."""
    fields: dict[str, str] = {}
    for key, value in event_dict.items():
        name = field_name(str(key))
        if name is None:
            continue
        fields[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return fields


def encode_entry(fields: Mapping[str, str]) -> bytes:
    """One native-protocol datagram for ``fields``.

    A value with a newline is sent in the binary form (name, newline, 64-bit
    little-endian length, the bytes, newline); others as ``NAME=value``.
    """
    parts: list[bytes] = []
    for name, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class JournalLogger:
    """A structlog logger that sends each event to journald, or writes it to ``stream``.

    The renderer before it (``JournalRenderer`` in irqd.logsetup) passes the
    rendered JSON line and the event's fields.
    """

    def __init__(self, stream: TextIO, address: str = JOURNAL_SOCKET) -> None:
        self._stream = stream
        self._address = address
        self._sock: socket.socket | None = None

    def _send(self, datagram: bytes) -> bool:
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(datagram, self._address)
        except OSError:
            # Too large for a datagram, or journald is not there: the stream takes it.
            return False
        return True

    def msg(self, line: str, fields: Mapping[str, str] | None = None, level: str = "info") -> None:
        """Send one event; ``line`` is its JSON rendering."""
        entry = {
            "MESSAGE": line,
            "PRIORITY": str(_PRIORITY.get(level, 6)),
            "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
            **(fields or {}),
        }
        if not self._send(encode_entry(entry)):
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        """Close the socket to journald."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # structlog calls the method named after the level; every one is ``msg``.
    log = debug = info = warning = warn = error = exception = critical = fatal = msg


class JournalLoggerFactory:
    """structlog logger factory: one :class:`JournalLogger` shared by every logger."""

    def __init__(self, stream: TextIO, address: str = JOURNAL_SOCKET) -> None:
        self._logger = JournalLogger(stream, address)

    def __call__(self, *args: Any) -> JournalLogger:
        return self._logger

    def close(self) -> None:
        """Close the shared logger's socket."""
        self._logger.close()
