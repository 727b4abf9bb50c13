"""The guest side of the VM tests: runs inside the QEMU guest, as root.

Started by the guest's /init (tests/vm/guest/init) with the repository's own
virtualenv Python, seen through a read-only 9p mount of the host's root. It
binds the ivshmem-doorbell device to vfio-pci, runs the device conformance
suite against it, then the real daemon with real clients, then the NVMe
example driver over a second daemon (nvme_steps.py), and writes everything it
found to ``--results``/results.json for the host.

Each step is recorded as ``{"ok": bool, ...}``; a step that raises records the
traceback and the rest still run, so one failure shows all the others.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from irqproto.blocking import Client
from irqproto.driver import PCI_COMMAND, PCI_COMMAND_MASTER, Bar, DeviceAccess
from irqproto.messages import Notification
from irqproto.notifications import (
    DeviceLostNotification,
    IrqNotification,
    ResizedNotification,
    TypedNotification,
)

if TYPE_CHECKING:
    from tests.vm.guest import device_steps, nvme_steps
else:  # run as a script from this folder
    import device_steps
    import nvme_steps

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
BDF = "0000:00:05.0"  # vmkit.IVSHMEM_BDF: the slot QEMU was told
SOCKET = "/tmp/irqd.sock"
DAEMON_LOG = Path("/tmp/irqd.log")
#: The log of the daemon process started by the hand-over (handover step).
NEW_DAEMON_LOG = Path("/tmp/irqd-new.log")
NOTIFY_SOCKET = "/tmp/notify"
#: Doorbell rounds per vector before the hand-over, after SIGUSR2 until the old
#: process exits (at least), while no daemon runs, and after the new one is ready.
HANDOVER_ROUNDS = {"before": 40, "during": 10, "gap": 40, "after": 40}
#: The vectors every client subscribes to (inside the pre-armed range on 6.1).
VECTORS = [0, 1, 2, 3]
#: The vector the grow check adds (beyond ``--msix-prearm 4`` on 6.1).
GROW_VECTOR = 6
DOORBELL_ROUNDS = 200
HOST_ROUNDS = 200
HOST_BURST = 50


def bind_vfio(bdf: str) -> dict[str, Any]:
    """driver_override + drivers_probe (docs/real-device.md); /dev/vfio/N appears."""
    dev = Path("/sys/bus/pci/devices") / bdf
    (dev / "driver_override").write_text("vfio-pci")
    if (dev / "driver").exists():
        (dev / "driver" / "unbind").write_text(bdf)
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    group = (dev / "iommu_group").resolve().name
    return {"ok": Path(f"/dev/vfio/{group}").exists(), "group": group}


def conformance(bdf: str) -> dict[str, Any]:
    """``pytest tests/device`` with the vfio backend; only that directory."""
    env = {
        **os.environ,
        "IRQD_DEVICE_BACKEND": "vfio",
        "IRQD_VFIO_BDF": bdf,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            "--no-header",
            "--junitxml=/tmp/conformance.xml",
            str(REPO / "tests" / "device"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    # Counted, with every skip's reason checked (device_steps.judge_conformance).
    judged = device_steps.judge_conformance(Path("/tmp/conformance.xml"), proc.returncode)
    return {
        **judged,
        "summary": lines[-1] if lines else "",
        "output": proc.stdout[-6000:] if proc.returncode else "",
        "skips": [line for line in lines if line.startswith("SKIPPED")],
    }


# -- the real daemon, real clients --------------------------------------------------------


class Tally:
    """One client and what it has received: counts per msix vector, other notifications."""

    def __init__(self, name: str, sock: str = SOCKET, timeout: float = 10.0) -> None:
        self.client = Client(sock, client_name=name, timeout=timeout)
        self.counts: dict[int, int] = {}
        self.resized: list[ResizedNotification] = []
        self.lost: list[DeviceLostNotification] = []
        self.closed = False

    def take(self, note: TypedNotification | Notification) -> None:
        if isinstance(note, IrqNotification) and note.index == "msix":
            for vector, count in note.counts:
                self.counts[vector] = self.counts.get(vector, 0) + count
        elif isinstance(note, ResizedNotification):
            self.resized.append(note)
        elif isinstance(note, DeviceLostNotification):
            self.lost.append(note)

    def wait_for(self, done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        """Read notifications until ``done()``; AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.client.client_name}: timed out waiting for {what}")
            try:
                self.take(self.client.next_notification(timeout=left))
            except TimeoutError:
                continue

    def wait_counts(self, expected: dict[int, int]) -> None:
        def reached() -> bool:
            over = {v: n for v, n in self.counts.items() if n > expected.get(v, 0)}
            assert not over, f"more than raised: {over} > {expected}"
            return all(self.counts.get(v, 0) >= n for v, n in expected.items())

        self.wait_for(reached, f"counts {expected} (have {self.counts})")


class Doorbell:
    """BAR0 of the ivshmem device, through the daemon's ``device.open`` (32-bit stores)."""

    def __init__(self, bar: Bar) -> None:
        self.bar = bar
        self.own_id = bar.read32(8)  # IVPOSITION, BAR0 + 8

    def ring(self, vector: int) -> None:
        self.bar.write32(12, self.own_id << 16 | vector)  # DOORBELL, BAR0 + 12


class Interrupts:
    """The kernel's own count of each vfio-msix vector's interrupts (/proc/interrupts).

    vfio-pci's handler signals the vector's eventfd once per interrupt, whether
    or not a daemon runs, so this is what the daemon must eventually deliver.
    """

    def __init__(self, bdf: str) -> None:
        self.pattern = re.compile(r"^\s*\d+:((?:\s+\d+)+)\s.*vfio-msix\[(\d+)\]\(" + re.escape(bdf))

    def counts(self) -> dict[int, int]:
        found: dict[int, int] = {}
        for line in Path("/proc/interrupts").read_text().splitlines():
            match = self.pattern.match(line)
            if match:
                found[int(match[2])] = sum(int(n) for n in match[1].split())
        return found

    def ring_and_wait(self, bell: Doorbell, vector: int, timeout: float = 5.0) -> None:
        """One doorbell, then wait for its interrupt: paced so that none coalesce
        (QEMU reads the doorbell's eventfd as a sum; the APIC merges a pending vector)."""
        before = self.counts().get(vector, 0)
        bell.ring(vector)
        deadline = time.monotonic() + timeout
        while self.counts().get(vector, 0) == before:
            if time.monotonic() > deadline:
                raise AssertionError(f"doorbell {vector}: no interrupt within {timeout}s")
            time.sleep(0.0002)


class FakeSystemd:
    """systemd's side of sd_notify, blocking, in a thread: keeps FDSTORE=1 fds by name.

    The bookkeeping is tests/process/fakesystemd.py's ``NotifyState``, the one
    the sim's hand-over test uses; only the reading differs (a thread here).
    """

    def __init__(self, path: str) -> None:
        module = fakesystemd()
        self.state = module.NotifyState()
        self.sock = module.open_notify_socket(Path(path))
        self.anc: int = module.ANCILLARY_SIZE
        self.lock = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def messages(self) -> list[dict[str, str]]:
        messages: list[dict[str, str]] = self.state.messages
        return messages

    def _run(self) -> None:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, self.anc)
            except OSError:
                return
            with self.lock:
                self.state.handle(data, ancdata)
                self.lock.notify_all()

    def wait_for(self, key: str, value: str, since: int, timeout: float) -> None:
        with self.lock:
            ok = self.lock.wait_for(
                lambda: any(m.get(key) == value for m in self.messages[since:]), timeout
            )
        assert ok, f"no {key}={value} within {timeout}s"

    def take_store(self) -> list[tuple[str, int]]:
        with self.lock:
            store: list[tuple[str, int]] = self.state.take_store()
        return store

    def close(self) -> None:
        with self.lock:
            self.state.close_store()
        self.sock.close()


def fakesystemd() -> Any:
    """tests/process/fakesystemd.py, loaded by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "fakesystemd", REPO / "tests" / "process" / "fakesystemd.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launcher() -> str:
    """tests/process/fakesystemd.py's LAUNCHER: fds at 3.. and ``$LISTEN_FDS``, then exec."""
    return str(fakesystemd().LAUNCHER)


class Control(device_steps.Control):
    """The line to the host (ttyS1): ``fire V,...`` and ``burst V N``, answered ``ok``."""

    def ask(self, line: str) -> str:
        answer = super().ask(line)
        assert answer == "ok", answer
        return answer


class DaemonRun:
    """The daemon under test (``python -m irqd serve --device``) and its clients."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.noresize = label == "6.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: list[Tally] = []
        self.systemd: FakeSystemd | None = None
        #: The device through the daemon (``device.open``): BAR0 and config space.
        self.access: DeviceAccess | None = None
        self.argv: list[str] = []
        self.env: dict[str, str] = {}

    def start(self) -> dict[str, Any]:
        argv = ["-m", "irqd", "serve", "--device", BDF, "--socket", SOCKET]
        if self.noresize:
            argv += ["--msix-prearm", "4"]  # so GROW_VECTOR takes the grow path
        argv += ["--log-format", "json"]
        self.argv = argv
        # Under a (fake) service manager from the start: the handover step needs
        # its fd store; nothing else changes.
        self.systemd = FakeSystemd(NOTIFY_SOCKET)
        self.env = {**os.environ, "NOTIFY_SOCKET": NOTIFY_SOCKET, "PYTHONUNBUFFERED": "1"}
        log = DAEMON_LOG.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, cwd="/tmp", env=self.env
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} before listening")
            try:
                Client(SOCKET, client_name="probe", timeout=5.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.clients = [Tally(f"client-{i}") for i in range(3)]
        # vfio-pci left bus mastering off when the daemon opened the device; the
        # device fd from device.open sets it, no sysfs needed.
        self.access = DeviceAccess.open(self.clients[0].client)
        before = self.access.config_read(PCI_COMMAND, 2)
        self.access.enable_bus_master()
        command = self.access.config_read(PCI_COMMAND, 2)
        bar0 = self.access.bar("bar0")
        return {
            "ok": bool(command & PCI_COMMAND_MASTER),
            "command_before": hex(before),
            "command": hex(command),
            "bar0_mapped": bar0.mapped,
            "argv": argv[3:],
        }

    def doorbell(self) -> Doorbell:
        assert self.access is not None
        return Doorbell(self.access.bar("bar0"))

    def check_info(self) -> dict[str, Any]:
        info = self.clients[0].client.device_info()
        msix = info["msix"]
        ok = info["backend"] == "vfio" and msix["noresize"] is self.noresize and msix["count"] == 8
        return {"ok": ok, "backend": info["backend"], "msix": msix, "req": info.get("req")}

    def check_subscribe(self) -> dict[str, Any]:
        hows = [t.client.subscribe("msix", VECTORS)["how"] for t in self.clients]
        first = hows[0]
        wanted = ("prearm", "resize") if self.noresize else ("dynamic",)
        ok = first in wanted and all(h == "already" for h in hows[1:])
        return {"ok": ok, "how": hows}

    def expected(self, per_vector: int) -> dict[int, int]:
        return {v: per_vector for v in VECTORS}

    def wait_all(self, expected: dict[int, int]) -> None:
        for tally in self.clients:
            tally.wait_counts(expected)

    def check_doorbell(self) -> dict[str, Any]:
        """Raised by the device itself: one doorbell per vector, read, then again."""
        bell = self.doorbell()
        base = {v: self.clients[0].counts.get(v, 0) for v in VECTORS}
        started = time.monotonic()
        for n in range(1, DOORBELL_ROUNDS + 1):
            for v in VECTORS:
                bell.ring(v)
            self.wait_all({v: base[v] + n for v in VECTORS})
        seconds = time.monotonic() - started
        counts = [dict(t.counts) for t in self.clients]
        exact = all(c == {v: base[v] + DOORBELL_ROUNDS for v in VECTORS} for c in counts)
        return {
            "ok": exact,
            "raised_per_vector": DOORBELL_ROUNDS,
            "clients": len(self.clients),
            "counts": counts,
            "rounds_per_second": round(DOORBELL_ROUNDS / seconds, 1),
        }

    def check_host_fire(self) -> dict[str, Any]:
        """Raised from outside the guest: the host writes the ivshmem peer eventfds."""
        ctl = Control()
        base = {v: self.clients[0].counts.get(v, 0) for v in VECTORS}
        vectors = ",".join(str(v) for v in VECTORS)
        for n in range(1, HOST_ROUNDS + 1):
            ctl.ask(f"fire {vectors}")
            # Each vector is written again only after every client read it.
            self.wait_all({v: base[v] + n for v in VECTORS})
        exact = all(t.counts == {v: base[v] + HOST_ROUNDS for v in VECTORS} for t in self.clients)
        # A burst coalesces (QEMU reads the summed counter; the APIC merges a
        # pending vector): 1 <= seen <= written, nothing invented.
        before = self.clients[0].counts.get(0, 0)
        ctl.ask(f"burst 0 {HOST_BURST}")
        self.clients[0].wait_for(
            lambda: self.clients[0].counts.get(0, 0) > before, "the burst's first interrupt"
        )
        # A fence: one more on another vector, after the burst, and its arrival.
        fence = self.clients[0].counts.get(1, 0)
        ctl.ask("fire 1")
        self.clients[0].wait_for(lambda: self.clients[0].counts.get(1, 0) > fence, "the fence")
        seen = self.clients[0].counts.get(0, 0) - before
        return {
            "ok": exact and 1 <= seen <= HOST_BURST,
            "rounds": HOST_ROUNDS,
            "exact": exact,
            "burst_written": HOST_BURST,
            "burst_seen": seen,
        }

    def check_trigger(self) -> dict[str, Any]:
        """The kernel's loopback (``trigger``) reaches every subscriber once."""
        base = dict(self.clients[0].counts)
        self.clients[1].client.trigger("msix", VECTORS)
        self.wait_all({v: base.get(v, 0) + 1 for v in VECTORS})
        ok = all(t.counts == {v: base.get(v, 0) + 1 for v in VECTORS} for t in self.clients)
        return {"ok": ok}

    def check_grow(self) -> dict[str, Any]:
        """A vector beyond the enabled range: grow (resized) on 6.1, dynamic on 6.12."""
        grower = self.clients[2]
        before = {v: grower.counts.get(v, 0) for v in VECTORS}
        how = grower.client.subscribe("msix", [GROW_VECTOR])["how"]
        result: dict[str, Any] = {"how": how}
        if self.noresize:
            for tally in self.clients:
                tally.wait_for(lambda tally=tally: bool(tally.resized), "resized")  # type: ignore[misc]
            notes = [t.resized[0] for t in self.clients]
            result["resized"] = [
                {"vectors": list(n.vectors), "possible_loss": n.possible_loss} for n in notes
            ]
            ok = how == "resize" and all(n.possible_loss and 0 in n.vectors for n in notes)
            # The loopback after a resize wakes each old vector once.
            grower.wait_counts({v: before[v] + 1 for v in VECTORS})
        else:
            ok = how == "dynamic" and not any(t.resized for t in self.clients)
        # The old vectors and the new one all deliver afterwards.
        base = {v: grower.counts.get(v, 0) for v in [*VECTORS, GROW_VECTOR]}
        bell = self.doorbell()
        for v in [*VECTORS, GROW_VECTOR]:
            bell.ring(v)
            grower.wait_counts({**{k: base[k] for k in base}, v: base[v] + 1})
            base[v] += 1
        result["ok"] = ok
        return result

    def check_handover(self) -> dict[str, Any]:
        """Restart through the fd store while the device keeps interrupting.

        Doorbells before SIGUSR2, while the old process hands over, while no
        daemon runs (the kernel keeps MSI-X enabled and the eventfds assigned:
        they wait there) and after the new process is ready; each paced by the
        kernel's own count. Every client must get exactly what was raised, on
        the connection it had.
        """
        assert self.proc is not None and self.systemd is not None
        grower = self.clients[2]
        # Settle: every client has all of VECTORS as the grower, who waited for them.
        settled = {v: grower.counts.get(v, 0) for v in VECTORS}
        # The grower also has GROW_VECTOR, which nobody rings here: it must stay.
        others = {t: {v: n for v, n in t.counts.items() if v not in VECTORS} for t in self.clients}
        for tally in self.clients:
            tally.wait_counts({**settled, **others[tally]})
        ids_before = {c["name"]: c["id"] for c in self.clients[0].client.stats()["clients"]}
        bell, irqs = self.doorbell(), Interrupts(BDF)
        raised = dict.fromkeys(HANDOVER_ROUNDS, 0)

        def rounds(phase: str, n: int) -> None:
            for _ in range(n):
                for v in VECTORS:
                    irqs.ring_and_wait(bell, v)
                raised[phase] += 1

        rounds("before", HANDOVER_ROUNDS["before"])
        started = time.monotonic()
        self.proc.send_signal(signal.SIGUSR2)
        # While the old process parks clients and stores its fds, and until it is gone.
        rounds("during", HANDOVER_ROUNDS["during"])
        while self.proc.poll() is None:
            rounds("during", 1)
            assert time.monotonic() - started < 15, "the old daemon did not hand over"
        old_exit = self.proc.returncode
        stored = self.systemd.take_store()
        names = [name for name, _ in stored]
        rounds("gap", HANDOVER_ROUNDS["gap"])
        fds = [fd for _, fd in stored]
        mark = len(self.systemd.messages)
        env = {
            **self.env,
            "HANDOVER_FDS": ",".join(map(str, fds)),
            "LISTEN_FDNAMES": ":".join(names),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launcher(), *self.argv],
            stdout=NEW_DAEMON_LOG.open("wb"),
            stderr=subprocess.STDOUT,
            cwd="/tmp",
            env=env,
            pass_fds=fds,
        )
        # The store's copies are the new process's now; ours would keep client
        # sockets and the device open after the daemon lets go of them.
        for fd in fds:
            os.close(fd)
        self.systemd.wait_for("READY", "1", since=mark, timeout=30)
        pause = time.monotonic() - started
        rounds("after", HANDOVER_ROUNDS["after"])
        total = sum(raised.values())
        expected = {v: settled[v] + total for v in VECTORS}
        for tally in self.clients:
            tally.wait_counts({**expected, **others[tally]})
        counts = [dict(t.counts) for t in self.clients]
        exact = all(t.counts == {**expected, **others[t]} for t in self.clients)
        ids_after = {c["name"]: c["id"] for c in self.clients[0].client.stats()["clients"]}
        # The new process's word: adopted, no vector assigned afresh, nothing refused.
        logged = [json.loads(line) for line in NEW_DAEMON_LOG.read_text().splitlines() if line]
        adopted = [e for e in logged if e.get("event") == "handover.adopted"]
        refused = [e for e in logged if e.get("event") == "handover.adopt_failed"]
        prefixes = ("device-", "event-", "vector-", "client-")
        return {
            "ok": exact
            and old_exit == 75
            and ids_after == ids_before
            and len(adopted) == 1
            and adopted[0].get("vectors_reassigned") == []
            and not refused,
            "adopted_log": adopted,
            "adopt_failed_log": refused,
            "exact": exact,
            "old_exit": old_exit,
            "raised_per_vector": raised,
            "expected": expected,
            "counts": counts,
            "clients_before": ids_before,
            "clients_after": ids_after,
            "stored": {p: sorted(n for n in names if n.startswith(p)) for p in prefixes},
            "stored_last": names[-1] if names else None,
            "pause_seconds": round(pause, 2),
        }

    def check_unbind(self) -> dict[str, Any]:
        """driver/unbind while clients are subscribed: REQ → device_lost → exit 0."""
        assert self.proc is not None
        unbind = Path("/sys/bus/pci/devices") / BDF / "driver" / "unbind"
        # Our dup of the device fd would hold the unbind up, as any driver's would.
        if self.access is not None:
            self.access.close()
        started = time.monotonic()
        # The write blocks until the daemon let go of the device: run it aside.
        writer = subprocess.Popen(["/bin/sh", "-c", f"echo {BDF} > {unbind}"])
        writer.wait(timeout=30)
        unbind_seconds = time.monotonic() - started
        for tally in self.clients:
            tally.wait_for(lambda tally=tally: bool(tally.lost), "device_lost")  # type: ignore[misc]
        code = self.proc.wait(timeout=30)
        reasons = [t.lost[0].reason for t in self.clients]
        bound = (Path("/sys/bus/pci/devices") / BDF / "driver").exists()
        return {
            "ok": writer.returncode == 0 and code == 0 and not bound and unbind_seconds < 10,
            "unbind_seconds": round(unbind_seconds, 2),
            "daemon_exit": code,
            "reasons": reasons,
        }

    def stop(self) -> None:
        if self.access is not None:
            self.access.close()
        for tally in self.clients:
            tally.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.systemd is not None:
            self.systemd.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True)
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    results: dict[str, Any] = {"label": args.label, "kernel": os.uname().release, "steps": {}}
    out = args.results / "results.json"

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        started = time.monotonic()
        try:
            result = fn()
        except Exception:
            result = {"ok": False, "error": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.monotonic() - started, 2)
        results["steps"][name] = result
        device_steps.after_step(name, results)
        verdict = "ok" if result.get("ok") else "FAILED"
        figures = f" ({result['figures']})" if result.get("figures") else ""
        print(f"IRQD-VM: step {name}: {verdict} in {result['seconds']}s{figures}", flush=True)
        # Written after every step: a guest that dies still leaves what it had.
        out.write_text(json.dumps(results, indent=1))

    step("bind", lambda: bind_vfio(BDF))
    step("nvme_bind", nvme_steps.bind)
    step("conformance", lambda: conformance(BDF))
    run = DaemonRun(args.label)
    device_steps.watch_ivshmem(run)
    try:
        step("daemon_start", run.start)
        if results["steps"]["daemon_start"]["ok"]:
            step("info", run.check_info)
            step("subscribe", run.check_subscribe)
            step("doorbell", run.check_doorbell)
            step("host_fire", run.check_host_fire)
            step("trigger", run.check_trigger)
            step("grow", run.check_grow)
            step("handover", run.check_handover)
            step("unbind", run.check_unbind)
    finally:
        run.stop()
    nvme = nvme_steps.NvmeRun(args.label)
    try:
        if results["steps"]["nvme_bind"]["ok"]:
            step("nvme_daemon", nvme.start_daemon)
        if results["steps"].get("nvme_daemon", {}).get("ok"):
            step("nvme_io", nvme.check_io)
            step("nvme_reset", nvme.check_reset)
            step("nvme_sigkill", nvme.check_sigkill)
            if nvme.noresize:
                step("nvme_grow", nvme.check_grow)
            step("nvme_unbind", nvme.check_unbind)
    finally:
        nvme.close()
        results["nvme_image"] = nvme.image_report()
        log = nvme_steps.DAEMON_LOG
        results["nvme_daemon_log"] = log.read_text()[-3000:] if log.exists() else ""
        results["daemon_log"] = DAEMON_LOG.read_text()[-3000:] if DAEMON_LOG.exists() else ""
        if NEW_DAEMON_LOG.exists():
            results["daemon_log"] += "\n--- after the hand-over ---\n"
            results["daemon_log"] += NEW_DAEMON_LOG.read_text()[-3000:]
        out.write_text(json.dumps(results, indent=1))
    # edu (MSI, INTx, DMA, bind uevent, removal) and AER errors: device_steps.py.
    device_steps.run_all(step, results)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
