"""``status --json`` as scripts use it: the documented keys (docs/cli.md), no self in clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from irqd.tools.cli import main
from irqproto.blocking import Client

from .helpers import cli, running_daemon


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    """A simulated-device daemon's socket."""
    path = tmp_path / "irqd.sock"
    with running_daemon(path):
        yield path


def test_status_json_keys_for_scripts(sock: Path) -> None:
    with Client(str(sock), client_name="script-subscriber") as sub:
        sub.subscribe("msix", [4])
        result = cli("status", "--json", "--socket", str(sock))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert set(report) == {"server", "protocol", "device", "stats"}
    assert report["protocol"] == 1
    assert report["server"].startswith("vfio-irqd ")
    # device.info and stats as the protocol defines them (docs/protocol.md)
    assert {"device", "backend", "msix_strategy", "msix", "intx"} <= set(report["device"])
    assert {"count", "flags", "noresize", "dynamic", "active", "enabled"} <= set(
        report["device"]["msix"]
    )
    stats = report["stats"]
    for key in ("vectors", "clients", "dispatch", "latency_us", "host_vectors", "msix_strategy"):
        assert key in stats
    # Only the daemon's real clients: the status command's own connection is left out.
    assert [c["name"] for c in stats["clients"]] == ["script-subscriber"]
    [client] = stats["clients"]
    assert client["vectors"] == [["msix", 4]]
    assert {"id", "pid", "uid", "pending", "delivered"} <= set(client)


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (["top"], ["--once", "--interval", "--socket", "--device", "q or Ctrl-C", "examples:"]),
        (["ping"], ["--index", "--count", "--timeout", "--json", "VECTOR", "exit status"]),
    ],
)
def test_help(command: list[str], words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert command[0] in capsys.readouterr().out  # listed among the commands
