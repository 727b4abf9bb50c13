"""The installed daemon under Debian's systemd as PID 1, one guest per kernel.

``make install PREFIX=/usr DESTDIR=<stage>`` runs on the host (cached by a hash
of what it reads, vmkit.ensure_stage); each guest boots the host's systemd
(guest/init-systemd), copies the stage over its root, runs sysusers, tmpfiles
and daemon-reload as a package's postinst would, and drives the installed,
unchanged units (guest/systemd_main.py): socket activation, the device checks
inside the unit's sandbox, ``systemd-analyze security``, reload, the watchdog,
``systemctl restart`` and SIGUSR2 hand-overs and a SIGKILL while the host
fires and the NVMe example runs I/O, the journal's fields, and a removal.

The two kernels' guests run at the same time (each TCG guest is one thread,
the machine has two cores). Skips and CI as in test_vm.py.
``VFIO_IRQD_VM_ONLY=step,...`` runs only those steps (and install, bind,
activate) and checks only them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from . import vmkit
from .guest.systemd_plan import NEEDS, STEPS
from .test_vm import _unavailable

# The first test carries the boots (and a fresh install stage): beyond the
# guests' own bound (vmkit.SYSTEMD_GUEST_TIMEOUT).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]

UNITS = Path(__file__).resolve().parent / "guest" / "systemd"
ONLY = [s for s in os.environ.get("VFIO_IRQD_VM_ONLY", "").split(",") if s]


@pytest.fixture(scope="module")
def guests() -> dict[str, vmkit.GuestResult]:
    """Both kernels' systemd guests, booted at the same time; what each reported."""
    try:
        vmkit.check_prerequisites()
        kernels = {label: vmkit.ensure_kernel(spec) for label, spec in vmkit.KERNELS.items()}
    except vmkit.Missing as exc:
        _unavailable(str(exc))
        raise  # not reached
    vmkit.precompile()
    stage = vmkit.ensure_stage()
    append = f"irqd_stage={stage}"
    if ONLY:
        append += " systemd.setenv=IRQD_VM_ONLY=" + ",".join(ONLY)
    results = {}
    with tempfile.TemporaryDirectory(prefix="vfio-irqd-systemd-") as tmp:
        started = {}
        t0 = time.monotonic()
        for label, kernel in kernels.items():
            work = Path(tmp) / label
            work.mkdir()
            started[label] = (
                kernel,
                work,
                vmkit.start_systemd_guest(kernel, work, UNITS, "irqd-vm.target", append=append),
            )
        for label, (kernel, work, handle) in started.items():
            results[label] = vmkit.finish_guest(kernel, work, handle, t0)
    return results


def report(result: vmkit.GuestResult) -> str:
    steps: dict[str, Any] = dict(result.results.get("steps", {}))  # type: ignore[call-overload]
    logs = {k: v for k, v in result.results.items() if k.startswith("log:")}
    return (
        f"qemu exit {result.returncode} after {result.seconds:.1f}s\n"
        f"steps: {json.dumps(steps, indent=1, default=str)[:12000]}\n"
        f"logs: {json.dumps(logs, indent=1)[:6000]}\n"
        f"console: {result.console[-3000:]}"
    )


def figures(label: str, steps: dict[str, dict[str, Any]], seconds: float) -> str:
    """One block per kernel for the log (``-s``): the figures the issue asks for."""
    lines = [f"systemd {label}: guest {seconds:.0f}s (boot to power-off)"]
    for name in STEPS:
        step = steps.get(name)
        if step is not None:
            verdict = "ok" if step.get("ok") else "FAILED"
            lines.append(f"  {name}: {verdict} {step.get('seconds')}s {step.get('figures', '')}")
    return "\n".join(lines)


def failures(steps: dict[str, dict[str, Any]], failed: list[str]) -> str:
    """The failed steps whole, first: a long report is cut in the middle when shown."""
    return "\n".join(
        f"{name}: {json.dumps(steps.get(name, 'missing'), indent=1, default=str)[:6000]}"
        for name in failed
    )


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(vmkit.KERNELS))
def test_systemd(guests: dict[str, vmkit.GuestResult], label: str) -> None:
    result = guests[label]
    steps: dict[str, dict[str, Any]] = result.results.get("steps", {})  # type: ignore[assignment]
    print(figures(label, steps, result.seconds))
    wanted = [s for s in STEPS if not ONLY or s in ONLY or s in NEEDS]
    failed = [name for name in wanted if not steps.get(name, {}).get("ok")]
    assert not failed, (
        f"guest steps failed or missing: {failed}\n{failures(steps, failed)}\n{report(result)}"
    )
    assert result.returncode == 0, report(result)
    assert str(result.results["kernel"]).startswith(label + "."), result.results["kernel"]
    # The floors behind the verdicts the guest gave.
    if "security" in wanted:
        assert steps["security"]["exposure"] <= 1.5
    for name in ("restart", "sigusr2"):
        if name in wanted:
            step = steps[name]
            assert step["exact"] and all(step["clients_stayed"]), step
            assert all(n == step["fired"] for n in step["received"]), step
            assert step["vectors_after"] == step["vectors_before"], step
    if "sigkill" in wanted:
        kill = steps["sigkill"]
        assert all(kill["clients_stayed"]) and not kill["resets"], kill
        assert kill["nvme_driver_exit"] == 0 and kill["driver_running_at_kill"], kill
        assert kill["nvme_summary"]["stopped"], kill  # ended by its SIGTERM, not its own count
        assert kill["csts"] is None or kill["csts"] & 1, kill
