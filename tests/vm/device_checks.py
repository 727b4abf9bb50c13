"""Host-side checks of guest/device_steps.py's figures (edu, AER, uevents, host vectors,
the conformance count); called by test_vm.py for each kernel. Not collected itself."""

from __future__ import annotations

from typing import Any

#: Steps of guest/device_steps.py, in the order they run (after the NVMe steps).
DEVICE_STEPS = (
    "edu_wait",
    "edu_msi",
    "edu_dma",
    "edu_intx",
    "aer_nonfatal",
    "aer_fatal",
    "edu_remove",
)

#: The conformance run (tests/device on the ivshmem doorbell) must pass at least this
#: many tests per kernel: a run that collects or passes fewer fails the stage.
CONFORMANCE_MIN_PASSED = {"6.1": 112, "6.12": 113}


def check_conformance(label: str, steps: dict[str, dict[str, Any]]) -> None:
    """Counted and every skip explained (device_steps.judge_conformance)."""
    conf = steps["conformance"]
    assert conf["failed"] == 0 and not conf["unexpected_skips"], conf
    assert conf["passed"] + conf["skipped"] == conf["collected"], conf
    assert conf["passed"] >= CONFORMANCE_MIN_PASSED[label], conf


def check_devices(steps: dict[str, dict[str, Any]], results: dict[str, Any]) -> None:
    """edu's MSI, INTx and DMA, the AER errors, the bind wait and the removal, and the
    host-vector comparison after every step."""
    wait = steps["edu_wait"]
    assert wait["uevent"] and '"uevent": "bind"' in wait["uevent"], wait
    assert wait["bind_wait_seconds"] < 10, wait
    msi = steps["edu_msi"]
    assert msi["received"] == [msi["raised"]] * 2 and msi["kernel_counted"] == msi["raised"]
    assert steps["edu_dma"]["copied"] and int(steps["edu_dma"]["iova"], 16) < 1 << 28
    intx = steps["edu_intx"]
    assert intx["held_while_masked"], intx
    assert intx["received"] == intx["raised"] == intx["kernel_counted"] + 1, intx
    assert intx["second_subscriber"] == "EBUSY", intx
    assert steps["aer_nonfatal"]["err_counts"] == [1, 1, 1], steps["aer_nonfatal"]
    assert steps["aer_fatal"]["err_counts"] == [1, 1, 1], steps["aer_fatal"]
    remove = steps["edu_remove"]
    assert remove["daemon_exit"] == 0 and len(remove["reasons"]) == 2, remove
    rows = results.get("host_vectors", [])
    wrong = [row for row in rows if row["ok"] is False]
    assert not wrong, wrong
    compared = {row["step"] for row in rows if row["ok"] is True}
    # Compared with a serving daemon, or found empty where the device was let go of.
    for name in (
        "subscribe",
        "grow",
        "handover",
        "unbind",
        "edu_msi",
        "edu_intx",
        "aer_nonfatal",
        "aer_fatal",
        "edu_remove",
    ):
        assert name in compared, (name, sorted(compared))


def device_figures(label: str, steps: dict[str, dict[str, Any]], results: dict[str, Any]) -> str:
    """The log lines: what each device step asserted, and the host-vector table."""
    lines = [f"devices {label}:"]
    for name in ("conformance", *DEVICE_STEPS):
        lines.append(f"  {name}: {steps.get(name, {}).get('figures')}")
    lines.append(f"  {'after step':<14} {'device':<13} {'daemon host':<22} {'enabled':<30} kernel")
    for row in results.get("host_vectors", []):
        daemon = row["daemon"] or {}
        lines.append(
            f"  {row['step']:<14} {row['device']:<13} {daemon.get('host', '-')!s:<22} "
            f"{daemon.get('enabled', '-')!s:<30} {row['kernel']} "
            f"{ {True: 'ok', False: 'MISMATCH', None: ''}[row['ok']] }"
        )
    return "\n".join(lines)
