"""The real kernel's VFIO path, under QEMU: one guest per Debian kernel.

Each test boots one kernel (vmkit.py says how), which runs the device
conformance suite against the real vfio-pci device, then the real daemon
with three real clients (guest/main.py), then the userspace NVMe example
(examples/nvme) over a second daemon serving QEMU's NVMe controller
(guest/nvme_steps.py), then MSI, INTx, DMA, ``--wait`` and removal on QEMU's
edu and AER errors on a virtio-rng behind a root port (guest/device_steps.py,
checked by device_checks.py), and checks what the guest reported and what the
NVMe backing file holds afterwards. The guests run one after another (2 cores).

Without root, apt-get or Debian's mirror the tests skip, saying what is
missing; with ``VFIO_IRQD_CI=1`` (set by .ci/run) they fail instead, so CI
always runs them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from . import device_checks, vmkit

CI = os.environ.get("VFIO_IRQD_CI") == "1"

# One boot per test (a kernel fetched from Debian's mirror the first time): far
# beyond the suite's 120 s. Deselect locally with -m "not vm".
pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

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
    "nvme_bind",
    "nvme_daemon",
    "nvme_io",
    "nvme_reset",
    "nvme_sigkill",
    "nvme_grow",
    "nvme_unbind",
    *device_checks.DEVICE_STEPS,
)

#: Steps only a NORESIZE kernel runs: ``--msix-strategy grow`` is its resize path.
NORESIZE_ONLY = ("nvme_grow",)


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
        f"NVMe daemon log: {str(result.results.get('nvme_daemon_log', ''))[-2000:]}\n"
        f"NVMe image: {result.nvme_image}\n"
        f"console: {result.console[-3000:]}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(vmkit.KERNELS))
def test_kernel(prerequisites: None, label: str) -> None:
    spec = vmkit.KERNELS[label]
    result = run(label)
    steps: dict[str, dict[str, Any]] = result.results.get("steps", {})  # type: ignore[assignment]
    wanted = [name for name in STEPS if spec.noresize or name not in NORESIZE_ONLY]
    failed = [name for name in wanted if not steps.get(name, {}).get("ok")]
    timings = ", ".join(f"{name} {steps.get(name, {}).get('seconds')}s" for name in wanted)
    print(f"VM {label}: QEMU {result.seconds:.1f}s; {timings}")
    print(nvme_figures(label, steps, result.nvme_image))
    print(device_checks.device_figures(label, steps, result.results))
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
    check_nvme(spec, steps, result)
    device_checks.check_conformance(label, steps)
    device_checks.check_devices(steps, result.results)


def check_nvme(
    spec: vmkit.KernelSpec, steps: dict[str, dict[str, Any]], result: vmkit.GuestResult
) -> None:
    """The NVMe example's figures, as the guest reported them, and the backing file."""
    io = steps["nvme_io"]
    assert io["identify"]["serial"] == vmkit.NVME_SERIAL
    assert io["identify"]["model"] == "QEMU NVMe Ctrl"
    assert io["identify"]["ns_bytes"] == vmkit.NVME_IMAGE_BYTES
    # Queues 2..8 were created while queue 1 ran; every new vector the kernel's way.
    added = {v: how for v, how in io["vectors"].items() if v != "0"}
    assert set(added.values()) == {"prearm" if spec.noresize else "dynamic"}, io["vectors"]
    assert len(added) == 8 and io["resized"] == [] and io["q1_completions_while_creating"] > 0
    assert io["blocks_verified"] > 0 and not io["errors"]
    assert len(io["per_queue"]) == 8 and all(n > 0 for n in io["per_queue"].values())
    # DMA: what the driver allocated, while it ran; nothing after it left or was killed.
    assert io["daemon_dma"]["bytes"] == io["dma_allocated"] > 0
    assert io["dma_after"]["bytes"] == 0 and io["dma_after"]["mappings"] == 0
    kill = steps["nvme_sigkill"]
    assert kill["dma_before_kill"]["bytes"] == kill["driver_said"]["bytes"] > 0
    assert kill["dma_after_kill"]["bytes"] == 0
    assert steps["nvme_reset"]["run_after_reset"]["interrupts"] > 0
    if spec.noresize:
        grow = steps["nvme_grow"]
        assert set(v for k, v in grow["vectors"].items() if k != "0") == {"resize"}
        assert grow["resized"] and all(r["possible_loss"] for r in grow["resized"])
        assert not grow["errors"] and all(n > 0 for n in grow["per_queue"].values())
    unbind = steps["nvme_unbind"]
    assert unbind["driver_exit"] == 3 and unbind["daemon_exit"] == 0
    # After the guest is gone: every block where the finished runs left it,
    # every block nobody wrote still the host's pattern.
    image = result.nvme_image
    assert image, "the guest reported nothing about the NVMe image"
    assert image["bad"] == [], image
    assert image["written_checked"] > 0, image


def nvme_figures(label: str, steps: dict[str, dict[str, Any]], image: dict[str, Any]) -> str:
    """One line per kernel for the log: what the NVMe steps measured."""
    io, grow = steps.get("nvme_io", {}), steps.get("nvme_grow", {})
    kill, reset = steps.get("nvme_sigkill", {}), steps.get("nvme_reset", {})
    return (
        f"NVMe {label}: {io.get('ios')} I/Os ({io.get('blocks_verified')} blocks verified, "
        f"{image.get('written_checked')} written blocks checked on the host) at "
        f"{io.get('iops')} IOPS, {io.get('completions_per_interrupt')} completions/interrupt, "
        f"longest posted-to-interrupt wait {io.get('signal_delay_ms')} ms; "
        f"vectors {io.get('vectors')}; grow: resized {len(grow.get('resized', []))}, "
        f"recovered {grow.get('recovered')}; DMA {io.get('daemon_dma')} -> {io.get('dma_after')} "
        f"(SIGKILL {kill.get('dma_before_kill')} -> {kill.get('dma_after_kill')}); reset: "
        f"{reset.get('before')} -> {reset.get('after')}, told {reset.get('told')}"
    )
