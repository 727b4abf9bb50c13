"""Is this SIGTERM a ``systemctl restart``? Then hand over instead of stopping.

systemd stops a service the same way for ``systemctl stop`` and for the stop
half of ``systemctl restart``: SIGTERM, nothing else. A stop must disable the
device and tell clients ``shutdown``; a restart should keep everything, as the
SIGUSR2 hand-over does, since systemd keeps the fd store of a unit that has a
start queued (``service_will_restart`` in systemd's ``src/core/service.c``)
and hands it to the new process.

The job systemd runs for the unit says which it is: ``systemctl list-jobs``
shows it with its type (``restart`` for ``systemctl restart``, ``stop`` for
``systemctl stop``). ``systemctl`` run as root talks to systemd's private
socket (``/run/systemd/private``), so this needs neither D-Bus nor a
capability. Anything that goes wrong answers "no restart": stopping is the
safe side, it never leaves a device armed behind a daemon that is not coming
back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import structlog
import trio

__all__ = ["RESTART_JOB_TYPES", "own_unit", "parse_job_types", "restart_pending"]

log = structlog.get_logger("irqd.process.restartjob")

#: Job types (systemd's ``job_type_to_string``) after which the unit runs again.
RESTART_JOB_TYPES = frozenset({"restart", "try-restart"})

#: How long to wait for ``systemctl``: it must not hold up a stop.
LOOKUP_TIMEOUT_SECONDS = 5.0

_UNIT = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.service$")


def own_unit(cgroup_file: Path = Path("/proc/self/cgroup")) -> str | None:
    """The service unit this process runs in, from its cgroup path; ``None`` outside one."""
    try:
        text = cgroup_file.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        # "0::/system.slice/..." (cgroup v2) or "1:name=systemd:/..." (v1).
        _, _, path = line.partition(":")
        controllers, _, path = path.partition(":")
        if controllers not in ("", "name=systemd"):
            continue
        for part in reversed(path.split("/")):
            if _UNIT.match(part):
                return part
    return None


def parse_job_types(listing: str, unit: str) -> set[str]:
    """The job types ``systemctl list-jobs --no-legend --plain`` shows for ``unit``."""
    types: set[str] = set()
    for line in listing.splitlines():
        fields = line.split()
        # JOB UNIT TYPE STATE
        if len(fields) >= 4 and fields[1] == unit:
            types.add(fields[2])
    return types


async def restart_pending(unit: str | None = None, systemctl: str = "systemctl") -> bool:
    """Whether systemd is restarting ``unit`` (by default this process's own unit)."""
    unit = unit if unit is not None else own_unit()
    if unit is None:
        return False
    # systemctl refuses to talk to systemd when it believes it runs in a chroot,
    # which it cannot tell under ProtectProc=invisible (PID 1 is hidden).
    env = {**os.environ, "SYSTEMD_IGNORE_CHROOT": "1", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    argv = [systemctl, "list-jobs", "--no-legend", "--plain", "--no-pager", unit]
    try:
        with trio.fail_after(LOOKUP_TIMEOUT_SECONDS):
            done = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, env=env, check=False
            )
    except (OSError, trio.TooSlowError) as exc:
        log.warning("restart.lookup_failed", unit=unit, error=str(exc), note="stopping")
        return False
    if done.returncode != 0:
        log.warning(
            "restart.lookup_failed",
            unit=unit,
            status=done.returncode,
            error=done.stderr.decode(errors="replace").strip()[:200],
            note="stopping",
        )
        return False
    types = parse_job_types(done.stdout.decode(errors="replace"), unit)
    log.info("restart.job", unit=unit, jobs=sorted(types))
    return bool(types & RESTART_JOB_TYPES)
