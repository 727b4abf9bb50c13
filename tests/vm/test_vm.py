"""The real kernel's VFIO path, under QEMU: one guest per Debian kernel.

Each test boots one kernel (vmkit.py says how), which runs the device
conformance suite against the real vfio-pci device and then the real daemon
with three real clients (guest/main.py), and checks what the guest reported.
The guests run one after another (2 cores).

Without root, apt-get or Debian's mirror the tests skip, saying what is
missing; with ``VFIO_IRQD_CI=1`` (set by .ci/run) they fail instead, so CI
always runs them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from . import vmkit

CI = os.environ.get("VFIO_IRQD_CI") == "1"

#: The guest-side checks every kernel must pass (guest/main.py's step names).
STEPS = (
    "bind",
    "conformance",
    "daemon_start",
    "info",
    "subscribe",
    "doorbell",
    "host_fire",
    "trigger",
    "grow",
    "handover",
    "unbind",
)


def _unavailable(why: str) -> None:
    message = f"VM stage cannot run here: {why}"
    if CI:
        pytest.fail(message + " (VFIO_IRQD_CI=1: the VM stage is required)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def prerequisites() -> None:
    try:
        vmkit.check_prerequisites()
    except vmkit.Missing as exc:
        _unavailable(str(exc))


def run(label: str) -> vmkit.GuestResult:
    try:
        kernel = vmkit.ensure_kernel(vmkit.KERNELS[label])
    except vmkit.Missing as exc:
        _unavailable(str(exc))
        raise  # not reached
    return vmkit.run_guest(kernel)


def report(result: vmkit.GuestResult) -> str:
    """What to print when a guest fails: its steps, the daemon's log, the console."""
    steps: dict[str, Any] = dict(result.results.get("steps", {}))  # type: ignore[call-overload]
    return (
        f"qemu exit {result.returncode} after {result.seconds:.1f}s\n"
        f"steps: {json.dumps(steps, indent=1)[:8000]}\n"
        f"daemon log: {str(result.results.get('daemon_log', ''))[-2000:]}\n"
        f"console: {result.console[-3000:]}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(vmkit.KERNELS))
def test_kernel(prerequisites: None, label: str) -> None:
    spec = vmkit.KERNELS[label]
    result = run(label)
    steps: dict[str, dict[str, Any]] = result.results.get("steps", {})  # type: ignore[assignment]
    failed = [name for name in STEPS if not steps.get(name, {}).get("ok")]
    assert not failed, f"guest steps failed: {failed}\n{report(result)}"
    assert result.returncode == 0, report(result)
    assert str(result.results["kernel"]).startswith(label + "."), result.results["kernel"]
    # The kernel's own word on NORESIZE, and the strategy the daemon chose for it.
    assert steps["info"]["msix"]["noresize"] is spec.noresize
    assert steps["subscribe"]["how"][0] == ("prearm" if spec.noresize else "dynamic")
    assert steps["grow"]["how"] == ("resize" if spec.noresize else "dynamic")
    # Exact counts at every subscriber: doorbell-raised, then host-raised.
    rounds = steps["doorbell"]["raised_per_vector"]
    for counts in steps["doorbell"]["counts"]:
        assert set(counts.values()) == {rounds}, counts
    assert steps["host_fire"]["exact"]
    assert 1 <= steps["host_fire"]["burst_seen"] <= steps["host_fire"]["burst_written"]
    written = result.host_fire["written"]
    assert isinstance(written, dict) and written, "the host wrote no peer eventfd"
    # Restart through the fd store (guest/main.py plays systemd): the real
    # device adopted from its fds, interrupts raised before, during, while no
    # daemon ran and after, all delivered exactly, on the same connections.
    handover = steps["handover"]
    assert handover["old_exit"] == 75
    assert handover["exact"], handover
    assert all(n > 0 for n in handover["raised_per_vector"].values()), handover
    assert handover["clients_after"] == handover["clients_before"]
    assert handover["stored"]["device-"] == ["device-container", "device-device", "device-group"]
    assert "event-req" in handover["stored"]["event-"]
    assert len(handover["stored"]["client-"]) == 3
    assert handover["stored_last"] == "state"
    assert not handover["adopt_failed_log"], handover
    assert [e["vectors_reassigned"] for e in handover["adopted_log"]] == [[]], handover
    # Unbinding while subscribed (the adopted daemon, on its adopted REQ
    # eventfd): prompt, and every client told.
    assert steps["unbind"]["unbind_seconds"] < 10
    assert steps["unbind"]["daemon_exit"] == 0
    assert all(r in ("request", "removed") for r in steps["unbind"]["reasons"])
    assert len(steps["unbind"]["reasons"]) == 3
