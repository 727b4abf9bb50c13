"""Telling ``systemctl restart`` from ``systemctl stop`` by the job systemd runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from irqd.process.restartjob import own_unit, parse_job_types, restart_pending

UNIT = "vfio-irqd@0000:00:06.0.service"


def test_own_unit_from_a_cgroup_v2_path(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(f"0::/system.slice/system-vfio\\x2dirqd.slice/{UNIT}\n")
    assert own_unit(cgroup) == UNIT


def test_own_unit_from_a_hybrid_hierarchy(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(
        "4:memory:/system.slice/other.service\n"
        f"1:name=systemd:/system.slice/system-vfio\\x2dirqd.slice/{UNIT}\n0::/\n"
    )
    assert own_unit(cgroup) == UNIT


def test_no_unit_outside_a_service(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/user.slice/user-1000.slice/session-3.scope\n")
    assert own_unit(cgroup) is None
    assert own_unit(tmp_path / "absent") is None


def test_job_types_of_the_unit_only() -> None:
    listing = f"412 {UNIT} restart running\n413 vfio-irqd@0000:00:07.0.service stop waiting\n"
    assert parse_job_types(listing, UNIT) == {"restart"}
    assert parse_job_types("", UNIT) == set()


async def test_a_restart_job_means_hand_over(tmp_path: Path) -> None:
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f"#!/bin/sh\necho '412 {UNIT} restart running'\n")
    systemctl.chmod(0o755)
    assert await restart_pending(UNIT, str(systemctl))
    systemctl.write_text(f"#!/bin/sh\necho '412 {UNIT} stop running'\n")
    assert not await restart_pending(UNIT, str(systemctl))


async def test_any_failure_means_stop(tmp_path: Path) -> None:
    assert not await restart_pending(UNIT, str(tmp_path / "absent"))
    failing = tmp_path / "systemctl"
    failing.write_text(f"#!/bin/sh\necho '412 {UNIT} restart running'; exit 1\n")
    failing.chmod(0o755)
    assert not await restart_pending(UNIT, str(failing))


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed")
async def test_the_real_systemctl_without_a_running_systemd_means_stop() -> None:
    # No restart job for this unit exists here (where PID 1 is not systemd, systemctl
    # fails): either way that must read as "stop".
    assert not await restart_pending(UNIT)
