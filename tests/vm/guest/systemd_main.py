"""The guest side of the systemd boots: the installed daemon under Debian's systemd as PID 1.

Started by ``irqd-vm.service`` (tests/vm/guest/systemd/) in a guest whose PID 1
is the host's systemd (tests/vm/guest/init-systemd). It installs the project as
a package would (the host's ``make install PREFIX=/usr DESTDIR=STAGE``, copied
over the root, then sysusers, tmpfiles and ``daemon-reload``), and drives the
installed, unchanged units: socket activation, the checks of guest/main.py
inside the unit's sandbox, reload, the watchdog, restart and SIGUSR2 hand-overs
and a SIGKILL while the host fires and the NVMe example runs I/O, the journal,
and a removal last. Each step is recorded as in guest/main.py (``{"ok": bool,
"figures": str, ...}``) in ``--results``/results.json.

``--only STEP,...`` runs those steps (and what they need) alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from irqproto.blocking import Client
from irqproto.driver import PCI_COMMAND, PCI_COMMAND_MASTER, DeviceAccess, dma_alloc

if TYPE_CHECKING:
    from tests.vm.guest import device_steps, main, nvme_steps
    from tests.vm.guest.systemd_plan import NEEDS, STEPS
else:  # run as a script from this folder
    import device_steps
    import main
    import nvme_steps
    from systemd_plan import NEEDS, STEPS

BDF = main.BDF  # the ivshmem-doorbell: host-fired interrupts
NVME = nvme_steps.BDF
SOCK = f"/run/vfio-irqd/{BDF}.sock"
NVME_SOCK = f"/run/vfio-irqd/{NVME}.sock"
UNIT = f"vfio-irqd@{BDF}.service"
NVME_UNIT = f"vfio-irqd@{NVME}.service"
CONFIG = Path(f"/etc/vfio-irqd/{BDF}.toml")
VECTORS = main.VECTORS
#: Host-fired rounds (every vector of VECTORS once) before and after each
#: restart; rounds continue while the daemon is away.
ROUNDS = 20
#: Every start of the daemon is a Python start under TCG: seconds, more when
#: the host is busy (guest/main.py saw 16 to 36 s).
START_TIMEOUT = 150.0
#: NVMe: the driver runs until SIGTERM (so the SIGKILL surely lands mid-I/O) and
#: waits this long for an interrupt before calling it lost (the daemon's
#: restart is in there); it is stopped once the restarted daemon has delivered
#: this many more interrupts on its I/O queues' vectors.
KILL_STALL = 120.0
IRQS_AFTER_KILL = 100
#: CSTS (NVMe base specification, controller registers): RDY is bit 0.
NVME_CSTS = 0x1C


def sh(*argv: str, check: bool = True, timeout: float = 120) -> str:
    """Run a command; its stdout (stderr added when it fails)."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return proc.stdout


def show(unit: str, *props: str) -> dict[str, str]:
    """``systemctl show -p ...``: the unit's properties by name."""
    out = sh("systemctl", "show", "-p", ",".join(props), unit)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main_pid(unit: str) -> int:
    return int(show(unit, "MainPID")["MainPID"])


def running_pid(unit: str, old: int) -> int:
    """The unit's MainPID when it is a new process that reported READY=1, else 0.

    ``Type=notify``: the unit is ``activating``/``start`` until READY=1, then
    ``active``/``running``.
    """
    state = show(unit, "MainPID", "ActiveState", "SubState")
    pid = int(state["MainPID"])
    ready = (state["ActiveState"], state["SubState"]) == ("active", "running")
    return pid if ready and pid not in (0, old) else 0


def restarts(unit: str) -> int:
    return int(show(unit, "NRestarts")["NRestarts"])


def wait_running(unit: str, old: int, timeout: float = START_TIMEOUT) -> int:
    """The new main process once it is ready; AssertionError at the deadline, or as soon
    as systemd has restarted a failing daemon once more (a restart loop never ends)."""
    deadline = time.monotonic() + timeout
    first = restarts(unit)
    while not (pid := running_pid(unit, old)):
        late = time.monotonic() > deadline
        if late or restarts(unit) > first + 1:
            state = show(unit, "MainPID", "ActiveState", "SubState", "Result", "NRestarts")
            why = f"within {timeout}s" if late else "(it restarts in a loop)"
            raise AssertionError(f"{unit}: no new ready main process {why}: {state}")
        time.sleep(0.1)
    return pid


def journal(unit: str, since: str = "") -> list[dict[str, Any]]:
    """``journalctl -u UNIT -o json``, each record with ``event`` read from its fields.

    The daemon's structured fields are journal fields (``EVENT``, ``LEVEL``, one
    per key) when it logs to journald natively; a JSON line on stdout is only
    ``MESSAGE``. Both are read, and ``native`` says which it was.
    """
    argv = ["journalctl", "--no-pager", "-o", "json", "-u", unit]
    if since:
        argv += ["--after-cursor", since]
    records = []
    for line in sh(*argv, check=False).splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "EVENT" in rec:
            rec["event"], rec["native"] = rec["EVENT"], True
        else:
            try:
                msg = json.loads(rec.get("MESSAGE") or "")
            except (ValueError, TypeError):
                msg = None
            if isinstance(msg, dict) and "event" in msg:
                rec.update(msg, native=False)
        records.append(rec)
    return records


def cursor(unit: str) -> str:
    out = sh("journalctl", "--no-pager", "-o", "json", "-n", "1", "-u", unit, check=False)
    lines = out.strip().splitlines()
    return str(json.loads(lines[-1]).get("__CURSOR", "")) if lines else ""


def kernel_log() -> list[str]:
    return sh("dmesg", check=False).splitlines()


def reset_lines(lines: list[str], bdf: str) -> list[str]:
    """The kernel's lines about resetting ``bdf`` (vfio-pci resets a device it gets back)."""
    return [ln for ln in lines if bdf in ln and re.search(r"reset", ln, re.IGNORECASE)]


class Scenario:
    """The installed daemon on the ivshmem device (and the NVMe), driven through systemd."""

    def __init__(self, label: str, stage: Path) -> None:
        self.label = label
        self.stage = stage
        self.noresize = label == "6.1"
        self.run = main.DaemonRun(label)
        self.nvme = nvme_steps.NvmeRun(label)
        self.nvme.socket = NVME_SOCK
        self.control: main.Control | None = None

    # -- helpers ---------------------------------------------------------------------

    @property
    def clients(self) -> list[main.Tally]:
        return self.run.clients

    def ctl(self) -> main.Control:
        if self.control is None:
            self.control = main.Control()
        return self.control

    def connect(self) -> None:
        """Three subscribers on VECTORS, and the device's BAR0 through ``device.open``."""
        for tally in self.clients:
            tally.client.close()
        self.run.clients = [main.Tally(f"client-{i}", SOCK, START_TIMEOUT) for i in range(3)]
        for tally in self.clients:
            tally.client.subscribe("msix", VECTORS)

    def reconnect(self) -> None:
        """New subscribers after the daemon lost the old ones, and bus mastering on again
        (a device opened afresh was reset)."""
        self.connect()
        self.reopen()

    def reopen(self) -> None:
        """The device's BAR0 and config space again (``device.open``), bus mastering on."""
        if self.run.access is not None:
            self.run.access.close()
        self.run.access = DeviceAccess.open(self.clients[0].client)
        self.run.access.enable_bus_master()

    def alive(self) -> list[bool]:
        """Which of the clients still have a working connection."""
        out = []
        for tally in self.clients:
            try:
                tally.client.stats()
                out.append(True)
            except Exception:  # any failure: the connection is gone
                out.append(False)
        return out

    def client_ids(self) -> dict[str, int]:
        stats: dict[str, Any] = dict(self.clients[0].client.stats())
        return {str(c["name"]): int(c["id"]) for c in stats["clients"]}

    def settle(self) -> dict[int, int]:
        """Every client has what the first has on VECTORS; those counts."""
        first = self.clients[0]
        # A loopback fence: once it arrived everywhere, nothing older is in flight.
        base = {v: first.counts.get(v, 0) for v in VECTORS}
        first.client.trigger("msix", VECTORS)
        fence = {v: base[v] + 1 for v in VECTORS}
        for tally in self.clients:
            tally.wait_for(
                lambda t=tally: all(t.counts.get(v, 0) >= fence[v] for v in VECTORS),  # type: ignore[misc]
                "the fence",
                timeout=30,
            )
        counts = [{v: t.counts.get(v, 0) for v in VECTORS} for t in self.clients]
        assert all(c == counts[0] for c in counts), counts
        return counts[0]

    def fire_round(self, irqs: main.Interrupts) -> None:
        """The host writes each vector's peer eventfd once; wait for the kernel to take each
        (its own count, whether or not a daemon runs), so that none coalesce."""
        before = irqs.counts()
        self.ctl().ask("fire " + ",".join(str(v) for v in VECTORS))
        deadline = time.monotonic() + 10
        while True:
            now = irqs.counts()
            if all(now.get(v, 0) > before.get(v, 0) for v in VECTORS):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"host fire: the kernel took {before} -> {now}")
            time.sleep(0.0005)

    # -- steps -----------------------------------------------------------------------

    def install(self) -> dict[str, Any]:
        """As a package's unpack and postinst: unpack, sysusers, tmpfiles, daemon-reload."""
        started = time.monotonic()
        sh("tar", "-xf", str(self.stage / "package.tar"), "-C", "/")
        unpack = time.monotonic() - started
        sh("systemd-sysusers", "/usr/lib/sysusers.d/vfio-irqd.conf")
        sh("systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/vfio-irqd.conf")
        sh("systemctl", "daemon-reload")
        CONFIG.parent.mkdir(parents=True, exist_ok=True)
        CONFIG.write_text("[limits]\nmax_clients = 64\n")
        group = sh("getent", "group", "vfio-irqd", check=False).strip()
        execstart = show(f"vfio-irqd@{BDF}.service", "ExecStart")["ExecStart"]
        man = sh("man", "-w", "vfio-irqd", check=False).strip()
        ok = bool(group) and Path("/run/vfio-irqd").is_dir() and "/usr/bin/vfio-irqd" in execstart
        ok = ok and Path("/usr/bin/vfio-irqd").resolve().is_file()
        return {
            "ok": ok,
            "figures": f"unpacked in {unpack:.1f}s, group {group!r}, man {man!r}",
            "group": group,
            "execstart": execstart[:300],
            "man": man,
        }

    def bind(self) -> dict[str, Any]:
        ivshmem = main.bind_vfio(BDF)
        nvme = nvme_steps.bind()
        return {"ok": bool(ivshmem.get("ok", True)) and bool(nvme.get("ok")), "nvme": nvme}

    def activate(self) -> dict[str, Any]:
        """The socket unit listens; the first client's connect starts the service."""
        sh("systemctl", "start", f"vfio-irqd@{BDF}.socket")
        before = show(UNIT, "ActiveState")["ActiveState"]
        started = time.monotonic()
        first = main.Tally("client-0", SOCK, START_TIMEOUT)
        info = first.client.device_info()
        seconds = time.monotonic() - started
        state = show(UNIT, "ActiveState", "SubState", "MainPID", "Type")
        self.run.clients = [first] + [main.Tally(f"client-{i}", SOCK) for i in (1, 2)]
        # The daemon's STATUS= (it changes as clients come): status shows systemd's copy.
        for _ in range(5):
            status = sh("systemctl", "status", "--no-pager", "-l", "-n", "0", UNIT, check=False)
            shown = re.search(r'Status: "([^"]*)"', status)
            text = show(UNIT, "StatusText")["StatusText"]
            if shown and shown.group(1) == text:
                break
        return {
            "ok": before == "inactive"
            and info["backend"] == "vfio"
            and (state["ActiveState"], state["SubState"]) == ("active", "running")
            and text.startswith(f"{BDF}: ")
            and shown is not None
            and shown.group(1) == text,
            "figures": f"connect -> answer {seconds:.1f}s, {state['ActiveState']} "
            f"({state['SubState']}), Status: {text!r}",
            "connect_to_answer_seconds": round(seconds, 2),
            "before": before,
            "state": state,
            "status": status[-1500:],
        }

    def security(self) -> dict[str, Any]:
        out = sh("systemd-analyze", "security", "--no-pager", UNIT, check=False)
        found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        exposure = float(found.group(1)) if found else None
        return {
            "ok": exposure is not None and exposure <= 1.5,
            "figures": f"exposure {exposure}",
            "exposure": exposure,
            "output": out[-3000:] if exposure is None or exposure > 1.5 else "",
        }

    def device_access(self) -> dict[str, Any]:
        """``device.regions``/``device.open`` from inside the sandbox: BAR0 and config space."""
        access = DeviceAccess.open(self.clients[0].client)
        self.run.access = access
        before = access.config_read(PCI_COMMAND, 2)
        access.enable_bus_master()
        command = access.config_read(PCI_COMMAND, 2)
        bell = self.run.doorbell()
        regions = [r.get("name") for r in self.clients[1].client.device_regions()]
        return {
            "ok": bool(command & PCI_COMMAND_MASTER) and "bar0" in regions,
            "figures": f"COMMAND {before:#x} -> {command:#x}, IVPOSITION {bell.own_id}, "
            f"regions {regions}",
            "regions": regions,
        }

    def dma(self) -> dict[str, Any]:
        """``dma.alloc`` inside the sandbox (memfd, VFIO_IOMMU_MAP_DMA under LimitMEMLOCK)."""
        client = self.clients[1].client
        buf = dma_alloc(client, 1 << 20)
        stats: dict[str, Any] = dict(client.stats())
        during = stats["dma"]
        buf.close()
        client.dma_free(buf.id)
        stats = dict(client.stats())
        after = stats["dma"]
        return {
            "ok": during["bytes"] == 1 << 20 and after["bytes"] == 0,
            "figures": f"iova {buf.iova:#x}, stats {during} -> {after}",
        }

    def reload(self) -> dict[str, Any]:
        """A changed file and ``systemctl reload``: the daemon says what it re-read."""
        pid = main_pid(UNIT)
        mark = cursor(UNIT)
        CONFIG.write_text("[limits]\nmax_clients = 65\n")
        sh("systemctl", "reload", UNIT)
        deadline = time.monotonic() + 30
        while not (
            found := [r for r in journal(UNIT, mark) if r.get("event") == "config.reloaded"]
        ):
            assert time.monotonic() < deadline, "no config.reloaded in the journal"
            time.sleep(0.2)
        rec = found[0]
        changed = rec.get("changed") or rec.get("CHANGED")
        return {
            "ok": main_pid(UNIT) == pid and "limits" in str(changed),
            "figures": f"config.reloaded changed={changed}",
            "record": {k: v for k, v in rec.items() if not k.startswith("_")},
        }

    def watchdog(self) -> dict[str, Any]:
        """SIGSTOP the main process: systemd's watchdog kills and restarts it."""
        pid = main_pid(UNIT)
        props = show(UNIT, "WatchdogUSec", "NRestarts")
        # A client's dup of the device fd keeps the device open past the daemon's
        # death; what a restarted daemon does with that is the sigkill step's.
        if self.run.access is not None:
            self.run.access.close()
            self.run.access = None
        started = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        new = wait_running(UNIT, pid, timeout=60 + START_TIMEOUT)
        seconds = time.monotonic() - started
        after = show(UNIT, "NRestarts", "Result")
        stayed = self.alive()
        if all(stayed):
            self.reopen()
        else:
            self.reconnect()
        return {
            "ok": new != pid and int(after["NRestarts"]) > int(props["NRestarts"]),
            "figures": f"SIGSTOP -> new main process ready {seconds:.1f}s "
            f"(WatchdogUSec {props['WatchdogUSec']}); clients stayed {stayed}",
            "stop_to_ready_seconds": round(seconds, 2),
            "clients_stayed": stayed,
        }

    def under_fire(self, what: str, argv: list[str]) -> dict[str, Any]:
        """``argv`` (a systemctl command that replaces the main process) while the host fires.

        Rounds before, while the old process goes and the new one starts, and
        after it is ready; every client must get exactly what the kernel took,
        on its connection, with the device's vectors left as they were.
        """
        settled = self.settle()
        ids_before = self.client_ids()
        vectors_before = device_steps.kernel_vectors(BDF)
        irqs = main.Interrupts(BDF)
        old = main_pid(UNIT)
        fired = 0
        for _ in range(ROUNDS):
            self.fire_round(irqs)
            fired += 1
        started = time.monotonic()
        command = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        first = restarts(UNIT)
        while not (new := running_pid(UNIT, old)):
            self.fire_round(irqs)
            fired += 1
            assert time.monotonic() - started < START_TIMEOUT, f"{what}: no new main process"
            assert restarts(UNIT) <= first + 1, f"{what}: the daemon restarts in a loop"
        seconds = time.monotonic() - started
        command.wait(timeout=60)
        for _ in range(ROUNDS):
            self.fire_round(irqs)
            fired += 1
        expected = {v: settled[v] + fired for v in VECTORS}
        stayed = self.alive()
        error = ""
        try:
            for tally in self.clients:
                tally.wait_counts(expected)
        except AssertionError as exc:
            error = str(exc)
        counts = [{v: t.counts.get(v, 0) for v in VECTORS} for t in self.clients]
        received = [sum(c[v] - settled[v] for v in VECTORS) for c in counts]
        exact = all(c == expected for c in counts)
        ids_after = self.client_ids() if all(stayed) else {}
        vectors_after = device_steps.kernel_vectors(BDF)
        lost = [[n.possible_loss for n in t.resized] for t in self.clients]
        result = {
            "ok": exact
            and all(stayed)
            and ids_after == ids_before
            and vectors_after == vectors_before
            and command.returncode == 0
            and new != old,
            "figures": f"fired {fired * len(VECTORS)}, received {received}, clients stayed "
            f"{stayed}, vectors {vectors_before} -> {vectors_after}, new main process ready "
            f"{seconds:.1f}s",
            "fired": fired * len(VECTORS),
            "received": received,
            "exact": exact,
            "clients_stayed": stayed,
            "clients_before": ids_before,
            "clients_after": ids_after,
            "vectors_before": vectors_before,
            "vectors_after": vectors_after,
            "possible_loss": lost,
            "seconds": round(seconds, 2),
            "error": error,
            "systemctl": (command.stdout.read().decode() if command.stdout else "")[-500:],
        }
        if not all(stayed):
            self.reconnect()
        return result

    def restart(self) -> dict[str, Any]:
        return self.under_fire("restart", ["systemctl", "restart", UNIT])

    def sigusr2(self) -> dict[str, Any]:
        return self.under_fire(
            "SIGUSR2", ["systemctl", "kill", "--kill-whom=main", "-s", "SIGUSR2", UNIT]
        )

    def nvme_csts(self, driver: subprocess.Popen[bytes]) -> int | None:
        """CSTS as the restarted NVMe daemon found the controller, if the driver still runs
        (a driver that finished has disabled it: CC.EN 0, CSTS.RDY 0)."""
        if driver.poll() is not None:
            return None
        with (
            Client(NVME_SOCK, client_name="csts", timeout=30) as probe,
            DeviceAccess.open(probe) as access,
        ):
            csts = access.bar("bar0").read32(NVME_CSTS)
        return csts if driver.poll() is None else None

    def nvme_io_interrupts(self) -> int:
        """Interrupts the NVMe daemon counted on the I/O queues' vectors (MSI-X 1..)."""
        with Client(NVME_SOCK, client_name="nvme-stats", timeout=30) as probe:
            stats = probe.stats()
        return sum(v["count"] for v in stats["vectors"] if v["index"] == "msix" and v["vector"])

    def sigkill(self) -> dict[str, Any]:
        """SIGKILL both daemons: the ivshmem one while the host fires, the NVMe one under I/O.

        Expected (the daemon keeps everything in the fd store at all times):
        neither device is reset, every client stays, the NVMe run completes, and
        at most the counts in flight are lost, reported as ``possible_loss``.
        """
        sh("systemctl", "start", f"vfio-irqd@{NVME}.socket")
        # The first connection starts the service (a Python start under TCG); the
        # driver's own client would give up first.
        with Client(NVME_SOCK, client_name="nvme-probe", timeout=START_TIMEOUT) as probe:
            probe.device_info()
        nvme_log_before = kernel_log()
        proc, held = self.nvme.start_driver(queues=2, ios=0, stall=KILL_STALL)
        nvme_old = main_pid(NVME_UNIT)
        settled = self.settle()
        irqs = main.Interrupts(BDF)
        old = main_pid(UNIT)
        fired = 0
        for _ in range(ROUNDS // 2):
            self.fire_round(irqs)
            fired += 1
        started = time.monotonic()
        driving_at_kill = proc.poll() is None
        for unit in (UNIT, NVME_UNIT):
            sh("systemctl", "kill", "--kill-whom=main", "-s", "SIGKILL", unit)
        new = nvme_new = irqs_at_ready = irqs_after = 0
        seconds = 0.0
        csts: int | None = None
        first = restarts(UNIT), restarts(NVME_UNIT)
        error = ""
        try:
            while not (new and nvme_new):
                self.fire_round(irqs)
                fired += 1
                new = new or running_pid(UNIT, old)
                if not nvme_new and (nvme_new := running_pid(NVME_UNIT, nvme_old)):
                    csts = self.nvme_csts(proc)
                    irqs_at_ready = self.nvme_io_interrupts()
                assert time.monotonic() - started < 2 * START_TIMEOUT, "no new main processes"
                now = restarts(UNIT), restarts(NVME_UNIT)
                assert now[0] <= first[0] + 1 and now[1] <= first[1] + 1, "restarts in a loop"
            for _ in range(ROUNDS):
                self.fire_round(irqs)
                fired += 1
            seconds = time.monotonic() - started
            # The driver's I/O goes on through the restarted daemon, then it stops
            # in order (SIGTERM: what it has in flight completes, is checked).
            deadline = time.monotonic() + KILL_STALL
            while (irqs_after := self.nvme_io_interrupts() - irqs_at_ready) < IRQS_AFTER_KILL:
                assert proc.poll() is None, "the NVMe driver ended before it was stopped"
                assert time.monotonic() < deadline, f"NVMe I/O stalled: {irqs_after} interrupts"
                time.sleep(0.5)
        except Exception as exc:  # the step reports it; the driver must be stopped anyway
            error = f"{type(exc).__name__}: {exc}"
        seconds = seconds or time.monotonic() - started
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        stayed = self.alive()
        received = [0] * len(self.clients)
        with_loss = [False] * len(self.clients)
        if all(stayed) and not error:
            # A loopback on top: exact counts are fired + 1 each; what has not come
            # within the timeout after it was lost (fewer) — more would be invented.
            self.clients[0].client.trigger("msix", VECTORS)
            for tally in self.clients:
                try:
                    tally.wait_counts({v: settled[v] + fired + 1 for v in VECTORS})
                except AssertionError as exc:
                    if "more than raised" in str(exc):
                        error = error or f"{tally.client.client_name}: {exc}"[:300]
            with_loss = [bool(t.resized) for t in self.clients]
            received = [
                sum(t.counts.get(v, 0) - settled[v] - 1 for v in VECTORS) for t in self.clients
            ]
        try:
            out, err = proc.communicate(timeout=5 if error else KILL_STALL + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        summary = nvme_steps._summary(out)  # the module's own reader of the driver's JSON
        nvme_log = kernel_log()[len(nvme_log_before) :]
        resets = reset_lines(nvme_log, NVME) + reset_lines(nvme_log, BDF)
        total = fired * len(VECTORS)
        lost = [total - r for r in received]
        ok = (
            not error
            and all(stayed)
            and all(0 <= n <= len(VECTORS) for n in lost)
            and all(w for w, n in zip(with_loss, lost, strict=True) if n)
            and proc.returncode == 0
            and not summary.get("errors")
            and summary.get("stopped") is True
            and not resets
            and driving_at_kill
            # Read while the driver ran: the controller must still be ready (not reset).
            and (csts is None or csts & 1 == 1)
        )
        if not all(stayed):
            self.reconnect()
        return {
            "ok": ok,
            "figures": f"ivshmem: fired {total}, received {received}, lost {lost}, told "
            f"possible_loss {with_loss}, clients stayed {stayed}; NVMe: driver exit "
            f"{proc.returncode}, {summary.get('ios')} I/Os ({irqs_after} interrupts through the "
            f"restarted daemon before SIGTERM), errors {summary.get('errors')}, CSTS while it "
            f"ran {csts}; resets in the kernel log {len(resets)}; both ready again "
            f"{seconds:.1f}s",
            "fired": total,
            "received": received,
            "lost": lost,
            "possible_loss": with_loss,
            "clients_stayed": stayed,
            "nvme_driver_exit": proc.returncode,
            "nvme_driver_held": held,
            "nvme_summary": {k: summary.get(k) for k in ("ios", "errors", "per_queue", "stopped")},
            "nvme_irqs_after_restart": irqs_after,
            "nvme_stderr": err.decode(errors="replace")[-1500:],
            "csts": csts,
            "driver_running_at_kill": driving_at_kill,
            "resets": resets,
            "seconds": round(seconds, 2),
            "error": error,
        }

    def journal_fields(self) -> dict[str, Any]:
        """The daemon's structured fields are journal fields (``daemon.ready`` has its own)."""
        records = journal(UNIT)
        ready = [r for r in records if r.get("event") == "daemon.ready"]
        native = [r for r in ready if r.get("native")]
        fields = sorted(k for k in (native[-1] if native else {}) if not k.startswith("_"))
        wanted = {"EVENT", "LEVEL", "ADOPTED"}
        return {
            "ok": bool(native) and wanted <= set(fields),
            "figures": f"{len(records)} records, daemon.ready {len(ready)} "
            f"({len(native)} with journal fields): {fields}",
            "ready_fields": fields,
            "sample": [r.get("MESSAGE", "")[:300] for r in records[-5:]],
        }

    def remove(self) -> dict[str, Any]:
        """Unbinding the device from vfio-pci under the running unit: every client told,
        the daemon lets go and exits 0 (the uevent reaches the sandbox)."""
        if self.run.access is not None:
            self.run.access.close()
            self.run.access = None
        unbind = Path("/sys/bus/pci/devices") / BDF / "driver" / "unbind"
        started = time.monotonic()
        writer = subprocess.Popen(["/bin/sh", "-c", f"echo {BDF} > {unbind}"])
        writer.wait(timeout=60)
        seconds = time.monotonic() - started
        for tally in self.clients:
            tally.wait_for(lambda t=tally: bool(t.lost), "device_lost", timeout=30)  # type: ignore[misc]
        deadline = time.monotonic() + 30
        while show(UNIT, "ActiveState")["ActiveState"] not in ("inactive", "failed"):
            assert time.monotonic() < deadline, show(UNIT, "ActiveState", "SubState")
            time.sleep(0.1)
        state = show(UNIT, "ActiveState", "ExecMainStatus", "Result")
        reasons = [t.lost[0].reason for t in self.clients]
        return {
            "ok": writer.returncode == 0
            and state["ExecMainStatus"] == "0"
            and seconds < 10
            and all(r in ("request", "removed") for r in reasons),
            "figures": f"unbind {seconds:.1f}s, reasons {reasons}, unit {state}",
            "reasons": reasons,
            "state": state,
        }

    def recover(self) -> bool:
        """After a failed step: the unit started afresh through its socket if it is not
        running (stop, reset-failed, a new first connection), new clients if the old ones
        are gone. True when something had to be done."""
        running = running_pid(UNIT, 0) != 0
        if running and all(self.alive()):
            return False
        # Our dup of the device fd would keep the group busy for a daemon opening afresh.
        if self.run.access is not None:
            self.run.access.close()
            self.run.access = None
        if not running:
            sh("systemctl", "stop", UNIT, f"vfio-irqd@{BDF}.socket", check=False)
            sh("systemctl", "reset-failed", UNIT, check=False)
            sh("systemctl", "start", f"vfio-irqd@{BDF}.socket")
        self.reconnect()
        return True

    def close(self) -> None:
        if self.run.access is not None:
            self.run.access.close()
        for tally in self.clients:
            tally.client.close()


def main_() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True)
    parser.add_argument("--stage", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--only", default=os.environ.get("IRQD_VM_ONLY", ""))
    args = parser.parse_args()
    results: dict[str, Any] = {"label": args.label, "kernel": os.uname().release, "steps": {}}
    out = args.results / "results.json"
    only = [s for s in args.only.split(",") if s]
    wanted = [s for s in STEPS if not only or s in only or s in NEEDS]
    scenario = Scenario(args.label, args.stage)
    run, ok_so_far = scenario.run, True
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "install": scenario.install,
        "bind": scenario.bind,
        "activate": scenario.activate,
        "security": scenario.security,
        "info": run.check_info,
        "subscribe": run.check_subscribe,
        "host_fire": run.check_host_fire,
        "trigger": run.check_trigger,
        "device_access": scenario.device_access,
        "dma": scenario.dma,
        "reload": scenario.reload,
        "watchdog": scenario.watchdog,
        "restart": scenario.restart,
        "sigusr2": scenario.sigusr2,
        "sigkill": scenario.sigkill,
        "journal": scenario.journal_fields,
        "remove": scenario.remove,
    }
    try:
        for name in wanted:
            if name not in NEEDS and not ok_so_far:
                break
            started = time.monotonic()
            try:
                result = checks[name]()
                if name == "activate" and "subscribe" not in wanted:
                    # --only without those steps: subscribe, and bus mastering on
                    # (device_access), as they would.
                    for tally in scenario.clients:
                        tally.client.subscribe("msix", VECTORS)
                    scenario.reopen()
            except Exception:  # recorded; the other steps still run
                result = {"ok": False, "error": traceback.format_exc()[-4000:]}
            if not result.get("ok"):
                result["journal"] = sh(
                    "journalctl", "--no-pager", "-o", "cat", "-n", "40", "-u", UNIT, check=False
                )
                if name not in NEEDS:
                    # So that the next step still tests what it is about.
                    try:
                        result["recovered"] = scenario.recover()
                    except Exception:  # the next steps will say what is wrong
                        result["recovered"] = traceback.format_exc()[-1500:]
            result["seconds"] = round(time.monotonic() - started, 2)
            results["steps"][name] = result
            if name in NEEDS and not result.get("ok"):
                ok_so_far = False
            verdict = "ok" if result.get("ok") else "FAILED"
            figures = f" ({result['figures']})" if result.get("figures") else ""
            print(f"IRQD-VM: step {name}: {verdict} in {result['seconds']}s{figures}", flush=True)
            out.write_text(json.dumps(results, indent=1, default=str))
    finally:
        scenario.close()
        for unit in (UNIT, NVME_UNIT):
            results[f"log:{unit}"] = sh(
                "journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False
            )[-4000:]
        out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
