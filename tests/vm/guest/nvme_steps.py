"""The NVMe steps of the VM tests: examples/nvme's driver over a second daemon.

QEMU's emulated NVMe controller (tests/vm/vmkit.py: serial ``deadbeef``, a raw
backing file of ``NS_BYTES`` filled with the example's data pattern) is bound
to vfio-pci; a second ``vfio-irqd serve --device`` serves it on its own socket,
and the example driver (examples/nvme/irqd_nvme.py) runs against it as a
separate process, as a user would run it. Each step returns ``{"ok": bool,
...figures}`` like guest/main.py's.

Every driver run gets its own range of logical blocks, so the host can check
the backing file afterwards: the ranges of runs that finished are reported
with their final generations (``image_report``), those of killed runs as
uncertain.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from irqproto.blocking import Client
from irqproto.driver import PCI_COMMAND, DeviceAccess
from irqproto.notifications import IrqNotification, ResizedNotification

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
DRIVER = REPO / "examples" / "nvme" / "irqd_nvme.py"
BDF = "0000:00:06.0"  # vmkit.NVME_BDF
SERIAL = "deadbeef"  # vmkit.NVME_SERIAL
MODEL = "QEMU NVMe Ctrl"  # QEMU hw/nvme/ctrl.c: the default model number
NS_BYTES = 32 << 20  # vmkit.NVME_IMAGE_BYTES
SOCKET = "/tmp/nvme.sock"
DAEMON_LOG = Path("/tmp/nvme-irqd.log")
#: Logical blocks per driver run; run k uses [k * RUN_BLOCKS, (k + 1) * RUN_BLOCKS).
RUN_BLOCKS = 4096
#: The I/O queues created while queue 1 runs, and the I/Os of a full run once
#: they all are (queue 1's I/Os while they are created come on top).
QUEUES = 8
DEPTH = 4
IOS = 400
#: A queue that waits longer than this for an interrupt fails the run (lost
#: interrupt): the driver's default. Its ``signal_delay_ms`` figures stay
#: under 0.2 s since it takes its notifications in batches
#: (docs/real-device.md, "A driver slower than its interrupts").
STALL = 5.0

# -- raw VFIO, before any daemon: is the plumbing right? --------------------------------
# include/uapi/linux/vfio.h: _IO(VFIO_TYPE=';', VFIO_BASE=100 + n).
_VFIO = (ord(";") << 8) | 100
VFIO_SET_IOMMU = _VFIO + 2
VFIO_GROUP_SET_CONTAINER = _VFIO + 4
VFIO_GROUP_GET_DEVICE_FD = _VFIO + 6
VFIO_DEVICE_GET_REGION_INFO = _VFIO + 8
VFIO_DEVICE_GET_IRQ_INFO = _VFIO + 9
VFIO_TYPE1V2_IOMMU = 3
VFIO_PCI_MSIX_IRQ_INDEX = 2
_REGION_INFO = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
_IRQ_INFO = struct.Struct("=IIII")  # argsz, flags, index, count


def bind(bdf: str = BDF) -> dict[str, Any]:
    """Bind the controller to vfio-pci, then read it through raw VFIO ioctls.

    Checks the QEMU plumbing without the daemon: its IOMMU group, BAR0 (NVMe
    CAP and VS), its MSI-X table size and the NORESIZE flag.
    """
    dev = Path("/sys/bus/pci/devices") / bdf
    (dev / "driver_override").write_text("vfio-pci")
    if (dev / "driver").exists():
        (dev / "driver" / "unbind").write_text(bdf)
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    group = (dev / "iommu_group").resolve().name
    ids = f"{(dev / 'vendor').read_text().strip()}:{(dev / 'device').read_text().strip()}"
    container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
    group_fd = os.open(f"/dev/vfio/{group}", os.O_RDWR | os.O_CLOEXEC)
    device = -1
    try:
        fcntl.ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, array.array("i", [container]))
        fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU)
        device = fcntl.ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0"))
        raw = bytearray(_REGION_INFO.pack(_REGION_INFO.size, 0, 0, 0, 0, 0))
        fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, raw, True)
        _, flags, _, _, size, offset = _REGION_INFO.unpack(raw)
        cap_lo, cap_hi, vs = struct.unpack("<III", os.pread(device, 12, offset))
        irq = bytearray(_IRQ_INFO.pack(_IRQ_INFO.size, 0, VFIO_PCI_MSIX_IRQ_INDEX, 0))
        fcntl.ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, irq, True)
        _, irq_flags, _, msix_count = _IRQ_INFO.unpack(irq)
    finally:
        for fd in (device, group_fd, container):
            if fd >= 0:
                os.close(fd)
    return {
        "ok": ids == "0x1b36:0x0010" and size >= 0x2000 and msix_count > QUEUES,
        "figures": f"{ids}, BAR0 {size} bytes, NVMe {vs >> 16}.{vs >> 8 & 0xFF}, "
        f"{msix_count} MSI-X vectors, flags {irq_flags:#x}",
        "group": group,
        "ids": ids,
        "bar0_size": size,
        "bar0_flags": hex(flags),
        "cap": hex(cap_hi << 32 | cap_lo),
        "doorbell_stride": 4 << (cap_hi & 0xF),
        "version": f"{vs >> 16}.{vs >> 8 & 0xFF}",
        "msix_count": msix_count,
        "msix_flags": hex(irq_flags),
    }


# -- the daemon and the driver -----------------------------------------------------------


def msix_control(access: DeviceAccess) -> int | None:
    """The MSI-X Message Control word (enable bit 15, function mask bit 14), or None.

    Walks the capability list (include/uapi/linux/pci_regs.h: PCI_CAPABILITY_LIST
    0x34, PCI_CAP_ID_MSIX 0x11, PCI_MSIX_FLAGS at +2).
    """
    pointer = access.config_read(0x34, 1) & 0xFC
    for _ in range(48):
        if not pointer:
            return None
        if access.config_read(pointer, 1) == 0x11:
            return access.config_read(pointer + 2, 2)
        pointer = access.config_read(pointer + 1, 1) & 0xFC
    return None


class NvmeRun:
    """The second daemon (serving the NVMe controller) and the driver runs against it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.noresize = label == "6.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.strategy = "auto"
        self.runs = 0
        #: For the host: ``[lba, gen]`` of finished runs, ranges of killed ones.
        self.written: dict[int, int] = {}
        self.uncertain: list[list[int]] = []
        #: The driver the reset step leaves running, for the SIGKILL step.
        self.running: tuple[subprocess.Popen[bytes], dict[str, int]] | None = None
        #: The daemon's socket: this module's own daemon, or a systemd unit's.
        self.socket = SOCKET

    def image_report(self) -> dict[str, Any]:
        """What the host should find in the backing file."""
        return {
            "written": sorted([k, v] for k, v in self.written.items()),
            "uncertain": self.uncertain,
        }

    # -- the daemon ------------------------------------------------------------------

    def start_daemon(self, strategy: str = "auto") -> dict[str, Any]:
        """``vfio-irqd serve --device BDF`` (``--msix-strategy`` unless auto); wait for it."""
        self.stop_daemon()
        argv = [sys.executable, "-m", "irqd", "serve", "--device", BDF, "--socket", SOCKET]
        if strategy != "auto":
            argv += ["--msix-strategy", strategy]
        argv += ["--log-format", "json"]
        self.strategy = strategy
        with DAEMON_LOG.open("ab") as log:
            log.write(f"--- {' '.join(argv[3:])}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/tmp",
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        # A Python process start under TCG on a busy host: it has taken 36 s.
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the NVMe daemon exited {self.proc.returncode}")
            try:
                with Client(SOCKET, client_name="probe", timeout=5.0) as probe:
                    info = probe.device_info()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        msix = info["msix"]
        return {
            "ok": info["backend"] == "vfio" and msix["noresize"] is self.noresize,
            "figures": f"msix strategy {strategy}, noresize {msix['noresize']}",
            "strategy": strategy,
            "msix": msix,
        }

    def close(self) -> None:
        """Kill a driver a failed step left running, then stop the daemon."""
        if self.running is not None:
            proc, _ = self.running
            proc.kill()
            proc.wait()
            self.running = None
        self.stop_daemon()

    def stop_daemon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def dma(self) -> dict[str, Any]:
        """The daemon's ``stats["dma"]``."""
        with Client(self.socket, client_name="dma-probe", timeout=10.0) as probe:
            # Through a plain dict: the typed result may not name ``dma`` yet.
            stats: dict[str, Any] = dict(probe.stats())
        dma: dict[str, Any] = stats["dma"]
        return dma

    def dma_after(self, what: str, timeout: float = 10.0) -> dict[str, Any]:
        """``stats["dma"]`` once the daemon has freed everything (it does so when
        it sees the connection close, which this process cannot wait for directly)."""
        deadline = time.monotonic() + timeout
        while (dma := self.dma())["bytes"] or dma["mappings"]:
            if time.monotonic() > deadline:
                raise AssertionError(f"after {what}: the daemon still holds {dma}")
            time.sleep(0.02)
        return dma

    # -- driver runs -----------------------------------------------------------------

    def _driver_argv(self, *, queues: int, ios: int) -> list[str]:
        first = self.runs * RUN_BLOCKS
        self.runs += 1
        return [
            sys.executable,
            str(DRIVER),
            "--socket",
            self.socket,
            "--queues",
            str(queues),
            "--depth",
            str(DEPTH),
            "--ios",
            str(ios),
            "--first-lba",
            str(first),
            "--lba-count",
            str(RUN_BLOCKS),
            "--stall",
            str(STALL),
            "--json",
        ]

    def drive(self, *, queues: int = QUEUES, ios: int = IOS) -> dict[str, Any]:
        """Run the driver to the end; its JSON summary (plus exit status and stderr)."""
        argv = self._driver_argv(queues=queues, ios=ios)
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, check=False, timeout=120, cwd="/tmp")
        out = _summary(proc.stdout)
        out["wall_seconds"] = round(time.monotonic() - started, 2)
        out["stderr"] = proc.stderr.decode(errors="replace")[-1500:]
        out["returncode"] = proc.returncode
        if proc.returncode == 0:
            self.written.update({int(lba): int(gen) for lba, gen in out.get("written", [])})
        else:
            self.uncertain.append([int(argv[argv.index("--first-lba") + 1]), RUN_BLOCKS])
        return out

    def start_driver(
        self, *, queues: int, ios: int = 10**9, stall: float = STALL
    ) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
        """Start a driver (that would run for ever by default); return once its I/O runs
        on every queue, with the DMA it says it holds. Its blocks are uncertain from now on."""
        argv = self._driver_argv(queues=queues, ios=ios)
        argv[argv.index("--stall") + 1] = str(stall)
        self.uncertain.append([int(argv[argv.index("--first-lba") + 1]), RUN_BLOCKS])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/tmp")
        assert proc.stderr is not None
        deadline = time.monotonic() + 90
        seen = b""
        while b"I/O running" not in seen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stderr], [], [], max(left, 0))
            chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
            if not chunk:
                proc.kill()
                raise AssertionError(f"the driver did not start its I/O: {seen[-1500:]!r}")
            seen += chunk
        line = seen.split(b"I/O running", 1)[1].split(b"\n", 1)[0].decode()
        # "on Q queues (dma N bytes in M mappings, I interrupts so far)"
        words = line.replace("(", " ").replace(")", " ").replace(",", " ").split()
        held = {
            "bytes": int(words[words.index("bytes") - 1]),
            "mappings": int(words[words.index("mappings") - 1]),
            "interrupts": int(words[words.index("interrupts") - 1]),
        }
        return proc, held

    # -- steps -----------------------------------------------------------------------

    def check_io(self) -> dict[str, Any]:
        """Identify, then queue 1 under I/O while queues 2..8 are created; every I/O
        checked; the daemon's DMA figures while running and after the disconnect."""
        out = self.drive()
        ident = out.get("identify") or {}
        wanted = "prearm" if self.noresize else "dynamic"
        added = {v: how for v, how in out.get("vectors", {}).items() if v != "0"}
        dma_after = self.dma_after("the driver disconnected")
        checks = {
            "exit_0": out.get("returncode") == 0 and out.get("ok"),
            "serial": ident.get("serial") == SERIAL,
            "model": ident.get("model") == MODEL,
            "ns_bytes": ident.get("ns_bytes") == NS_BYTES,
            "all_ios": out.get("ios", 0) >= IOS
            and not out.get("errors")
            and sorted(out.get("per_queue", {})) == [str(q) for q in range(1, QUEUES + 1)]
            and all(n > 0 for n in out.get("per_queue", {}).values()),
            "every_vector_" + wanted: sorted(added) == [str(q) for q in range(1, QUEUES + 1)]
            and set(added.values()) == {wanted},
            "no_resized": out.get("resized") == [],
            "q1_ran_while_creating": out.get("q1_completions_while_creating", 0) > 0,
            "daemon_dma_equals_driver": out.get("daemon_dma", {}).get("bytes")
            == out.get("dma_allocated")
            and out.get("daemon_dma", {}).get("mappings") == out.get("dma_mappings"),
            "dma_zero_after_disconnect": dma_after == {**dma_after, "bytes": 0, "mappings": 0},
        }
        figures = (
            f"{out.get('ios')} I/Os, {out.get('blocks_verified')} blocks verified, "
            f"{out.get('iops')} IOPS, {out.get('completions_per_interrupt')} completions/interrupt,"
            f" vectors 1-{QUEUES} {sorted(set(added.values()))}, "
            f"{out.get('q1_completions_while_creating')} queue-1 completions while creating, "
            f"longest posted-to-interrupt wait per queue (ms) {out.get('signal_delay_ms')}, "
            f"DMA {out.get('daemon_dma')} -> {dma_after}"
        )
        return {
            "ok": all(checks.values()),
            "figures": figures,
            "checks": checks,
            "dma_after": dma_after,
            **out,
        }

    def check_reset(self) -> dict[str, Any]:
        """``device.reset`` with vectors armed (a subscriber holds 0..2), then a run.

        Records what the reset did: the MSI-X enable bit and COMMAND before and
        after, and what the subscriber was told; then the loopback on the armed
        vectors must still deliver, and a new driver must get its controller up
        and I/O going on two queues (every admin and I/O command before that
        completed on an interrupt). That driver is left running for check_sigkill.
        """
        with Client(SOCKET, client_name="reset-watch", timeout=10.0) as watch:
            armed = [0, 1, 2]
            how = watch.subscribe("msix", armed)["how"]
            with DeviceAccess.open(watch) as access:
                before = {"command": hex(access.config_read(PCI_COMMAND, 2))}
                before["msix_control"] = hex(msix_control(access) or 0)
                watch.device_reset()
                after = {"command": hex(access.config_read(PCI_COMMAND, 2))}
                after["msix_control"] = hex(msix_control(access) or 0)
            # Everything the reset made the daemon say, up to a loopback fence.
            watch.trigger("msix", armed)
            told: list[dict[str, Any]] = []
            counts: dict[int, int] = {}
            deadline = time.monotonic() + 10
            while set(counts) != set(armed):
                note = watch.next_notification(timeout=max(deadline - time.monotonic(), 0.001))
                if isinstance(note, IrqNotification):
                    for v, n in note.counts:
                        counts[v] = counts.get(v, 0) + n
                elif isinstance(note, ResizedNotification):
                    told.append(
                        {"vectors": list(note.vectors), "possible_loss": note.possible_loss}
                    )
                else:
                    told.append({"notification": repr(note)[:200]})
        self.running = self.start_driver(queues=2)
        _, held = self.running
        return {
            "ok": set(counts) == set(armed) and held["interrupts"] > 0,
            "figures": f"COMMAND {before['command']} -> {after['command']}, MSI-X control "
            f"{before['msix_control']} -> {after['msix_control']}, told {told}, loopback "
            f"{counts}, next driver up with {held['interrupts']} interrupts",
            "subscribed": how,
            "before": before,
            "after": after,
            "told": told,
            "loopback_after_reset": counts,
            "run_after_reset": held,
        }

    def check_sigkill(self) -> dict[str, Any]:
        """SIGKILL the driver mid-I/O: the daemon frees every mapping it held."""
        proc, held = self.running or self.start_driver(queues=2)
        self.running = None
        during = self.dma()
        proc.kill()
        proc.wait(timeout=10)
        after = self.dma_after("SIGKILL")
        return {
            "ok": during["bytes"] == held["bytes"] > 0
            and during["mappings"] == held["mappings"]
            and after["bytes"] == 0,
            "figures": f"DMA {during} -> {after}",
            "driver_said": held,
            "dma_before_kill": during,
            "dma_after_kill": after,
        }

    def check_grow(self) -> dict[str, Any]:
        """``--msix-strategy grow`` (NORESIZE): every new vector resizes, subscribers are
        told ``possible_loss``, and the rescan plus the kick still complete every I/O."""
        started = self.start_daemon("grow")
        out = self.drive()
        resized = out.get("resized", [])
        added = {v: how for v, how in out.get("vectors", {}).items() if v != "0"}
        checks = {
            "daemon": started["ok"],
            "exit_0": out.get("returncode") == 0 and out.get("ok"),
            "all_ios": out.get("ios", 0) >= IOS
            and not out.get("errors")
            and sorted(out.get("per_queue", {})) == [str(q) for q in range(1, QUEUES + 1)]
            and all(n > 0 for n in out.get("per_queue", {}).values()),
            "every_vector_resize": set(added.values()) == {"resize"} and len(added) == QUEUES,
            # One per vector added, fewer when the daemon merged some that the
            # driver had not read yet; the last one names every vector before the last.
            "resized_possible_loss": bool(resized)
            and all(r["possible_loss"] for r in resized)
            and set(resized[-1]["vectors"]) >= set(range(QUEUES)),
        }
        return {
            "ok": all(checks.values()),
            "figures": f"{out.get('ios')} I/Os, {len(resized)} resized, "
            f"{out.get('recovered_on_resize')} completions found by the rescan on resized, "
            f"{out.get('recovered_after_kick')} at the kick",
            "checks": checks,
            "recovered": out.get("recovered_on_resize", 0) + out.get("recovered_after_kick", 0),
            **out,
        }

    def check_unbind(self) -> dict[str, Any]:
        """Unbind mid-I/O: the driver gets ``device_lost`` and exits 3 at once, the
        daemon lets go (the unbind returns), exits 0, and had freed the driver's DMA."""
        assert self.proc is not None
        proc, held = self.start_driver(queues=2)
        mark = len(DAEMON_LOG.read_bytes().splitlines())
        unbind = Path("/sys/bus/pci/devices") / BDF / "driver" / "unbind"
        started = time.monotonic()
        writer = subprocess.Popen(["/bin/sh", "-c", f"echo {BDF} > {unbind}"])
        writer.wait(timeout=30)
        unbind_seconds = time.monotonic() - started
        stdout, stderr = proc.communicate(timeout=30)
        out = _summary(stdout)
        daemon_exit = self.proc.wait(timeout=30)
        # The daemon's word on the driver's memory: released when its connection
        # closed, or unmapped one by one as the daemon let go of the device.
        events = _events(DAEMON_LOG.read_text(errors="replace").splitlines()[mark:])
        released = sum(int(e.get("bytes", 0)) for e in events if e["event"] == "dma.released")
        unmapped = sum(int(e.get("size", 0)) for e in events if e["event"] == "dma.unmapped")
        return {
            "ok": writer.returncode == 0
            and unbind_seconds < 10
            and proc.returncode == 3
            and "device lost" in str(out.get("error"))
            and daemon_exit == 0
            and held["bytes"] in (released, unmapped),
            "figures": f"unbind {unbind_seconds:.2f}s, driver exit {proc.returncode} after "
            f"{out.get('ios')} I/Os, daemon exit {daemon_exit}, of the driver's {held['bytes']} "
            f"DMA bytes the daemon logged {released} released, {unmapped} unmapped",
            "unbind_seconds": round(unbind_seconds, 2),
            "driver_exit": proc.returncode,
            "driver_error": out.get("error"),
            "driver_ios_before": out.get("ios"),
            "driver_held": held,
            "daemon_exit": daemon_exit,
            "daemon_dma_released": released,
            "daemon_dma_unmapped": unmapped,
            "driver_stderr": stderr.decode(errors="replace")[-800:],
        }


def _events(lines: list[str]) -> list[dict[str, Any]]:
    """The daemon's JSON log lines that are events (others are skipped)."""
    events = []
    for line in lines:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and "event" in event:
                events.append(event)
    return events


def _summary(stdout: bytes) -> dict[str, Any]:
    """The driver's JSON summary (its last stdout line), or what went wrong."""
    lines = stdout.decode(errors="replace").strip().splitlines()
    with contextlib.suppress(ValueError, IndexError):
        summary: dict[str, Any] = json.loads(lines[-1])
        return summary
    return {"unparsed_stdout": "\n".join(lines)[-1500:]}
