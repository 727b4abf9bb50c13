"""The unit files verify, and the daemon runs socket-activated by systemd's own tool."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from irqproto.notifications import ShutdownNotification
from irqproto.trio_client import open_client

from .fakesystemd import FakeManager

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
INSTALL = ROOT / "scripts" / "install-test-tools"
DEADLINE = 15


def systemd_tool(name: str) -> str:
    """The tool's path; skips only off CI and without root (scripts/install-test-tools)."""
    path = shutil.which(name)
    if path is not None:
        return path
    if os.environ.get("VFIO_IRQD_CI") == "1":
        pytest.fail(f"{name} is missing in CI: `make test` runs {INSTALL} first")
    if os.geteuid() != 0:
        pytest.skip(f"{name} is missing; as root, {INSTALL} installs Debian's systemd package")
    pytest.fail(f"{name} is missing: run {INSTALL} (make test does)")


def test_the_unit_files_verify(tmp_path: Path) -> None:
    analyze = systemd_tool("systemd-analyze")
    daemon = shutil.which("vfio-irqd") or str(Path(sys.executable).parent / "vfio-irqd")
    for unit in UNITS.glob("*.s*"):
        # As installed: ExecStart= must name an executable that exists.
        text = unit.read_text().replace("/usr/bin/vfio-irqd", daemon)
        (tmp_path / unit.name).write_text(text)
    # An instance whose name needs no escaping in a path (verify splits at ':').
    names = ["vfio-irqd@0000_03_00.0.service", "vfio-irqd@0000_03_00.0.socket"]
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(f"./{n}" for n in names), "./vfio-irqd-sim.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    # verify exits 0 on an unknown key; any message at all is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_service_has_what_the_issue_asks_for() -> None:
    service = (UNITS / "vfio-irqd@.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartForceExitStatus=75",
        "RuntimeDirectory=vfio-irqd",
        "FileDescriptorStoreMax=",
        "LimitNOFILE=",
        "DevicePolicy=closed",
        "DeviceAllow=char-vfio rw",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateNetwork=yes",
    ):
        assert f"\n{line}" in service, line
    socket_unit = (UNITS / "vfio-irqd@.socket").read_text()
    for line in (
        "ListenStream=/run/vfio-irqd/%i.sock",
        "SocketMode=0660",
        "SocketGroup=vfio-irqd",
    ):
        assert f"\n{line}" in socket_unit, line
    # A name without the instance's colons: $LISTEN_FDNAMES is colon-separated,
    # and the fd store's names follow the socket's.
    names = [
        ln.split("=", 1)[1]
        for ln in socket_unit.splitlines()
        if ln.startswith("FileDescriptorName=")
    ]
    assert len(names) == 1 and names[0] and ":" not in names[0], names


def test_the_service_allows_only_the_device_nodes_the_daemon_opens() -> None:
    """The legacy container and group nodes (irqd.device.vfio_open), nothing else.

    Neither the cdev/iommufd nodes nor a capability for no-IOMMU mode, which
    the daemon refuses: the unit and docs/operations.md say so alike.
    """
    service = (UNITS / "vfio-irqd@.service").read_text()
    allowed = [line for line in service.splitlines() if line.startswith("DeviceAllow=")]
    assert allowed == ["DeviceAllow=/dev/vfio/vfio rw", "DeviceAllow=char-vfio rw"]
    assert "\nCapabilityBoundingSet=\n" in service
    operations = (ROOT / "docs" / "operations.md").read_text()
    for text in (service, operations):
        assert "CAP_SYS_RAWIO" not in text
        assert "char-vfio-dev" not in text


async def kill_if_failed(proc: trio.Process) -> None:
    """Kills ``proc`` when cancelled before it ended (a failed test leaves nothing behind)."""
    try:
        await trio.sleep_forever()
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_socket_activated_by_systemd_socket_activate_with_readiness_and_stop(
    tmp_path: Path,
) -> None:
    activate = systemd_tool("systemd-socket-activate")
    manager = FakeManager(tmp_path / "notify")
    sock = tmp_path / "activated.sock"
    unused = tmp_path / "never-bound.sock"
    out = (tmp_path / "out.log").open("wb")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [activate, "-l", str(sock), "-E", f"NOTIFY_SOCKET={manager.path}"]
    argv += [sys.executable, "-m", "irqd", "serve", "--sim", "--socket", str(unused)]
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as background:
            background.start_soon(manager.run)
            proc = await trio.lowlevel.open_process(argv, env=env, stdout=out, stderr=out)
            background.start_soon(kill_if_failed, proc)
            # Bound by systemd-socket-activate (another process) before it waits:
            # nothing to wait on but the file.
            while not sock.exists():  # noqa: ASYNC110
                await trio.sleep(0.01)
            # The tool execs the daemon on the first connection.
            async with open_client(str(sock), client_name="watcher") as client:
                ready = await manager.wait_for("READY", "1")
                assert ready["STATUS"].startswith("sim: ")
                await client.subscribe("msix", [0])
                proc.send_signal(signal.SIGTERM)
                stopping = await manager.wait_for("STOPPING", "1")
                assert "SIGTERM" in stopping["STATUS"]
                note = await client.next_notification()
                assert isinstance(note, ShutdownNotification)
                assert await proc.wait() == 0
            background.cancel_scope.cancel()
    manager.close()
    out.close()
    # The inherited socket was used; the configured path never was.
    assert not unused.exists()
    # systemd owns an activated socket's file: the daemon leaves it alone.
    assert sock.exists()
