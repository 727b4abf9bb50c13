"""Native journald logging: a real datagram socket stands where journald listens."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from irqd.journal import encode_entry, field_name
from irqd.logsetup import configure_logging


def parse_entry(datagram: bytes) -> dict[str, str]:
    """journald's native format (systemd's docs/JOURNAL_NATIVE_PROTOCOL.md), both field forms."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, sep, after = rest.partition(b"\n")
        assert sep, "every field ends with a newline"
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode()
            rest = after
        else:
            (size,) = struct.unpack("<Q", after[:8])
            value = after[8 : 8 + size]
            assert after[8 + size : 9 + size] == b"\n"
            fields[line.decode()] = value.decode()
            rest = after[9 + size :]
    return fields


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TextIO]:
    """A file that ``$JOURNAL_STREAM`` names, as systemd names a service's stdout."""
    with (tmp_path / "stdout").open("w") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        yield out
    configure_logging("info", "json", stream=io.StringIO())  # lets go of the journal socket


def test_events_become_journal_fields_under_systemd(
    journald: tuple[socket.socket, str], stdout: TextIO, tmp_path: Path
) -> None:
    sock, path = journald
    configure_logging("info", "auto", stream=stdout, journal_socket=path)
    structlog.get_logger("t").info("daemon.ready", clients=3, device="0000:00:06.0")
    structlog.get_logger("t").warning("multi", detail="two\nlines")
    first = parse_entry(sock.recv(65536))
    assert first["EVENT"] == "daemon.ready"
    assert (first["CLIENTS"], first["DEVICE"], first["LEVEL"]) == ("3", "0000:00:06.0", "info")
    assert first["PRIORITY"] == "6" and first["SYSLOG_IDENTIFIER"] == "vfio-irqd"
    assert json.loads(first["MESSAGE"])["clients"] == 3  # the JSON line, as on the stream
    second = parse_entry(sock.recv(65536))
    assert (second["DETAIL"], second["PRIORITY"]) == ("two\nlines", "4")
    assert (tmp_path / "stdout").read_text() == ""  # nothing doubled on the stream


def test_without_journald_the_stream_gets_the_line(stdout: TextIO, tmp_path: Path) -> None:
    configure_logging("info", "auto", stream=stdout, journal_socket=str(tmp_path / "absent"))
    structlog.get_logger("t").info("daemon.ready", clients=1)
    stdout.flush()
    (line,) = (tmp_path / "stdout").read_text().splitlines()
    assert json.loads(line)["event"] == "daemon.ready"


def test_another_stream_is_not_the_journal(
    journald: tuple[socket.socket, str], stdout: TextIO, tmp_path: Path
) -> None:
    sock, path = journald
    other = (tmp_path / "other").open("w")
    configure_logging("info", "auto", stream=other, journal_socket=path)
    structlog.get_logger("t").info("daemon.ready")
    other.close()
    assert json.loads((tmp_path / "other").read_text())["event"] == "daemon.ready"
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(65536)


def test_field_names_follow_journald_rules() -> None:
    assert field_name("event") == "EVENT"
    assert field_name("host-vectors") == "HOST_VECTORS"
    assert field_name("_private") == "PRIVATE"
    assert field_name("9lives") is None
    assert field_name("message") == "IRQD_MESSAGE"  # never overwrites MESSAGE
    assert len(field_name("x" * 100) or "") == 64
    assert encode_entry({"A": "1"}) == b"A=1\n"
