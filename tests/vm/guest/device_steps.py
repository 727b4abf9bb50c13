"""The interrupt types and device events beyond MSI-X, on the real kernel.

Run by guest/main.py after the ivshmem and NVMe steps, on two more QEMU
devices (tests/vm/vmkit.py puts them in the guest):

* QEMU's ``edu`` (1234:11e8, hw/misc/edu.c): one MSI vector, INTx, a register
  that raises an interrupt and a DMA engine with a 28-bit DMA mask. A daemon
  started with ``serve --device EDU --wait`` before the device is bound opens it
  on the bind uevent; clients then raise MSI and INTx interrupts through
  ``device.open`` and receive them through the daemon, run edu's DMA through
  ``dma.alloc`` memory below 256 MiB, and finally see the device removed
  (``echo 1 > /sys/bus/pci/devices/BDF/remove``).
* ``virtio-rng-pci,aer=on`` behind a ``pcie-root-port``: the host injects
  uncorrectable AER errors through QEMU's monitor (``aer ID NAME`` on the
  control line, vmkit.aer_inject); every client gets ``err``.

After every step of the whole VM run (``after_step``) the daemon's
``host_vectors`` figures are compared with what the guest kernel allocated to
the device: ``/sys/bus/pci/devices/BDF/msi_irqs/`` (every allocated MSI/MSI-X
vector) and ``/proc/interrupts`` (only vectors with a handler, i.e. an eventfd).

Each step returns ``{"ok": bool, "figures": "...", ...}`` like guest/main.py's;
``figures`` says what was asserted.
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from irqproto.blocking import Client
from irqproto.driver import PCI_COMMAND, Bar, DeviceAccess, dma_alloc
from irqproto.messages import Notification
from irqproto.notifications import (
    DeviceLostNotification,
    ErrNotification,
    IrqNotification,
    TypedNotification,
)

EDU_BDF = "0000:00:07.0"  # vmkit.EDU_SLOT
EDU_SOCKET = "/tmp/edu.sock"
EDU_LOG = Path("/tmp/edu-irqd.log")
RNG_BDF = "0000:01:00.0"  # vmkit: the only device behind the root port (bus 1)
RNG_ID = "rng"  # vmkit.AER_DEVICE_ID: QEMU's id, for the monitor
RNG_SOCKET = "/tmp/rng.sock"
RNG_LOG = Path("/tmp/rng-irqd.log")
IVSHMEM = ("0000:00:05.0", "/tmp/irqd.sock")  # guest/main.py's BDF and SOCKET
NVME = ("0000:00:06.0", "/tmp/nvme.sock")  # guest/nvme_steps.py's BDF and SOCKET

# edu's BAR0 registers (QEMU hw/misc/edu.c, edu_mmio_read/edu_mmio_write).
EDU_ID = 0x00  # 0x010000ed: version 1.0, magic 0xed
EDU_LIVENESS = 0x04  # reads back the inverse of what was written
EDU_IRQ_STATUS = 0x24
EDU_IRQ_RAISE = 0x60  # irq_status |= value; MSI: one message per write; else INTx high
EDU_IRQ_ACK = 0x64  # irq_status &= ~value; INTx low once irq_status is 0
EDU_DMA_SRC = 0x80  # a 4-byte write sets the whole 64-bit address (upper half 0)
EDU_DMA_DST = 0x88
EDU_DMA_COUNT = 0x90
EDU_DMA_CMD = 0x98
EDU_DMA_RUN, EDU_DMA_TO_RAM, EDU_DMA_IRQ = 0x1, 0x2, 0x4
EDU_DMA_IRQ_VALUE = 0x100  # DMA_IRQ: what a finished transfer raises
EDU_DMA_BUFFER = 0x40000  # DMA_START: the device's 4 KiB buffer
EDU_DMA_SIZE = 0x1000
#: Bytes per transfer. QEMU 7.2's edu_check_range wants the transfer's end strictly
#: inside the buffer and calls hw_error (QEMU aborts) otherwise, so a transfer of the
#: whole 4 KiB kills the guest; later QEMUs only log it.
EDU_DMA_LEN = 0x800
#: edu's default dma_mask is (1 << 28) - 1: an IOVA above it is clamped.
EDU_IOVA_MAX = (1 << 28) - 1

#: Interrupts raised per kind; the kernel's behaviour, not throughput, is on trial.
MSI_RAISES = 50
INTX_CYCLES = 50
#: How long "nothing arrives while masked" is watched, in seconds.
MASKED_WATCH = 0.3

_PROC_IRQ = re.compile(r"vfio-(msix|msi|intx)(?:\[(\d+)\])?\(([0-9a-f:.]+)\)")


# -- what the kernel holds -------------------------------------------------------------


def kernel_vectors(bdf: str) -> dict[str, int]:
    """``msi_irqs``: MSI/MSI-X vectors allocated to ``bdf`` (sysfs lists each one);
    ``msi``/``msix``/``intx``: its vfio handlers in /proc/interrupts (an eventfd each)."""
    listing = Path("/sys/bus/pci/devices") / bdf / "msi_irqs"
    found = {"msi_irqs": len(os.listdir(listing)) if listing.is_dir() else 0}
    found.update(msi=0, msix=0, intx=0)
    for line in Path("/proc/interrupts").read_text().splitlines():
        for kind, _vector, dev in _PROC_IRQ.findall(line):
            if dev == bdf:
                found[kind] += 1
    return found


def proc_count(bdf: str, kind: str) -> int:
    """The kernel's interrupt count over every vfio ``kind`` handler of ``bdf``."""
    total = 0
    for line in Path("/proc/interrupts").read_text().splitlines():
        if any(dev == bdf and k == kind for k, _v, dev in _PROC_IRQ.findall(line)):
            fields = line.split(":", 1)[1].split()
            total += sum(int(n) for n in fields if n.isdigit())
    return total


class _HasClients(Protocol):
    clients: list[Any]
    proc: subprocess.Popen[bytes] | None


#: guest/main.py's DaemonRun, once made: its first client asks for the figures, so
#: no extra connection shows up in the client lists its steps compare.
_IVSHMEM_RUN: list[_HasClients] = []


def watch_ivshmem(run: _HasClients) -> None:
    """Ask guest/main.py's own client for the ivshmem daemon's figures."""
    _IVSHMEM_RUN[:] = [run]


def _device_of(step: str) -> tuple[str, str]:
    if step.startswith("nvme_"):
        return NVME
    if step.startswith("edu_"):
        return EDU_BDF, EDU_SOCKET
    if step.startswith("aer_"):
        return RNG_BDF, RNG_SOCKET
    return IVSHMEM


def _daemon_figures(step: str, sock: str) -> dict[str, Any] | None:
    """``host_vectors`` and enabled vectors from the daemon, or ``None`` if none serves."""

    def ask(client: Client) -> dict[str, Any]:
        info = client.device_info()
        stats = client.stats()
        return {
            "host": dict(stats["host_vectors"]),
            "enabled": {i: len(info[i]["enabled"]) for i in ("msi", "msix", "intx")},
        }

    run = _IVSHMEM_RUN[0] if _IVSHMEM_RUN and sock == IVSHMEM[1] else None
    if run is not None and run.clients and run.proc is not None and run.proc.poll() is None:
        try:
            return ask(run.clients[0].client)
        except Exception:
            pass
    if not Path(sock).exists():
        return None
    try:
        with Client(sock, client_name=f"hostvec-{step}", timeout=5.0) as probe:
            return ask(probe)
    except Exception:
        return None


#: What guest/main.py's steps assert, from the figures they return (``describe``).
_SAID: dict[str, Callable[[dict[str, Any]], str]] = {
    "bind": lambda r: f"/dev/vfio/{r.get('group')} present: {r.get('ok')}",
    "daemon_start": lambda r: (
        f"COMMAND {r.get('command_before')} -> {r.get('command')} "
        f"(bus master set through device.open), BAR0 mapped {r.get('bar0_mapped')}"
    ),
    "info": lambda r: (
        f"backend {r.get('backend')}, msix {r.get('msix', {}).get('count')} "
        f"vectors, noresize {r.get('msix', {}).get('noresize')}"
    ),
    "subscribe": lambda r: f"how {r.get('how')} (first, then 'already')",
    "doorbell": lambda r: (
        f"{r.get('raised_per_vector')} doorbells per vector to "
        f"{r.get('clients')} clients, exact: {r.get('ok')}"
    ),
    "host_fire": lambda r: (
        f"{r.get('rounds')} host-raised rounds exact: {r.get('exact')}; "
        f"burst {r.get('burst_seen')} seen of {r.get('burst_written')} written"
    ),
    "trigger": lambda r: f"loopback once at every subscriber: {r.get('ok')}",
    "grow": lambda r: f"how {r.get('how')}, resized {r.get('resized', [])}",
    "handover": lambda r: (
        f"exact {r.get('exact')}, old exit {r.get('old_exit')}, raised "
        f"{r.get('raised_per_vector')}, pause {r.get('pause_seconds')}s, same clients "
        f"{r.get('clients_before') == r.get('clients_after')}"
    ),
    "unbind": lambda r: (
        f"unbind took {r.get('unbind_seconds')}s, daemon exit "
        f"{r.get('daemon_exit')}, clients told {r.get('reasons')}"
    ),
}


def describe(step: str, result: dict[str, Any]) -> str:
    """What a step asserted, in one line, for one that did not say it itself: the
    known steps' figures, or else its scalar results."""
    said = _SAID.get(step)
    if said is not None:
        return said(result)
    scalars = [
        f"{k} {v}"
        for k, v in result.items()
        if isinstance(v, int | float | str | bool) and k not in ("ok", "seconds", "error")
    ]
    return ", ".join(scalars[:8])


#: Steps after which no process holds the device's interrupts (before any daemon, after
#: the conformance run, and after each unbind, stop or removal).
RELEASED_AFTER = frozenset(
    {"bind", "nvme_bind", "conformance", "unbind", "nvme_unbind", "aer_fatal", "edu_remove"}
)


def after_step(step: str, results: dict[str, Any]) -> None:
    """Compare the daemon's host-vector figures with the kernel's after ``step``,
    and give the step a ``figures`` line if it has none (``describe``).

    ``host_vectors`` counts what the kernel *allocated* (msi_irqs); the
    vfio handlers in /proc/interrupts are the vectors with an eventfd (the
    daemon's enabled vectors). Without a serving daemon the kernel must hold
    nothing after the steps in ``RELEASED_AFTER``; after others it is only
    recorded (``ok`` None).
    """
    result = results["steps"][step]
    if not result.get("figures") and "error" not in result:
        result["figures"] = describe(step, result)
    bdf, sock = _device_of(step)
    kernel = kernel_vectors(bdf)
    daemon = _daemon_figures(step, sock)
    row: dict[str, Any] = {"step": step, "device": bdf, "kernel": kernel, "daemon": daemon}
    if daemon is None:
        # Where the device was let go of, the kernel must hold nothing for it.
        row["ok"] = not any(kernel.values()) if step in RELEASED_AFTER else None
    else:
        host = daemon["host"].get("msi", 0) + daemon["host"].get("msix", 0)
        enabled = daemon["enabled"]
        row["ok"] = (
            host == kernel["msi_irqs"]
            and enabled["msi"] == kernel["msi"]
            and enabled["msix"] == kernel["msix"]
            and enabled["intx"] == kernel["intx"]
        )
    results.setdefault("host_vectors", []).append(row)
    shown = (
        "no daemon" if daemon is None else f"daemon {daemon['host']} enabled {daemon['enabled']}"
    )
    verdict = {True: "as expected", False: "MISMATCH", None: "kernel only"}[row["ok"]]
    print(f"IRQD-VM: host vectors after {step} ({bdf}): {shown}; kernel {kernel}: {verdict}")


# -- plumbing shared by the edu and AER daemons -------------------------------------------


def bind_vfio(bdf: str) -> Path:
    """driver_override + drivers_probe; returns the /dev/vfio/N the bind made."""
    dev = Path("/sys/bus/pci/devices") / bdf
    (dev / "driver_override").write_text("vfio-pci")
    if (dev / "driver").exists():
        (dev / "driver" / "unbind").write_text(bdf)
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    return Path("/dev/vfio") / (dev / "iommu_group").resolve().name


class Notify:
    """The service manager's end of ``$NOTIFY_SOCKET``: every datagram read at once
    (as systemd does; a daemon keeping its fd store current sends many), kept
    until a ``wait_for`` takes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        with_path = Path(path)
        if with_path.exists():
            with_path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.seen: list[dict[str, str]] = []
        self._pending: list[dict[str, str]] = []
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(1024))
            except OSError:
                return  # closed
            if not data and not ancdata:
                return  # shut down (sd_notify never sends an empty message)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    # Stored fds are not kept: these daemons are never restarted from them.
                    for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                        os.close(fd)
            text = data.decode(errors="replace")
            message = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self._arrived:
                self._pending.append(message)
                self._arrived.notify_all()

    def wait_for(self, test: Callable[[dict[str, str]], bool], timeout: float) -> dict[str, str]:
        """The first message not yet taken that passes ``test`` (those before it are
        taken too); AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                while self._pending:
                    message = self._pending.pop(0)
                    self.seen.append(message)
                    if test(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no such sd_notify message within {timeout}s: {self.seen}"
                    )
                self._arrived.wait(left)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Listener:
    """One client and everything it received, by kind."""

    def __init__(self, sock: str, name: str) -> None:
        self.client = Client(sock, client_name=name, timeout=10.0)
        self.irqs: dict[str, int] = {}
        self.err = 0
        self.err_notes = 0
        self.lost: list[str] = []

    def take(self, note: TypedNotification | Notification) -> None:
        if isinstance(note, IrqNotification):
            self.irqs[note.index] = self.irqs.get(note.index, 0) + sum(n for _, n in note.counts)
        elif isinstance(note, ErrNotification):
            self.err += note.count
            self.err_notes += 1
        elif isinstance(note, DeviceLostNotification):
            self.lost.append(note.reason)

    def wait(self, done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        """Read notifications until ``done()``; AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.client.client_name}: no {what} within {timeout}s")
            try:
                self.take(self.client.next_notification(timeout=left))
            except TimeoutError:
                continue

    def quiet_for(self, seconds: float) -> bool:
        """Whether nothing at all arrives for ``seconds`` (what was read is kept)."""
        before = (dict(self.irqs), self.err, list(self.lost))
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.take(self.client.next_notification(timeout=left))
            except TimeoutError:
                break
        return before == (self.irqs, self.err, self.lost)

    def count(self, index: str) -> int:
        return self.irqs.get(index, 0)


class Daemon:
    """``python -m irqd serve --device BDF`` on its own socket, notify socket and log."""

    def __init__(self, bdf: str, sock: str, log: Path, *extra: str) -> None:
        self.bdf = bdf
        self.sock = sock
        self.log = log
        self.notify = Notify(f"{sock}.notify")
        argv = ["-m", "irqd", "serve", "--device", bdf, "--socket", sock, *extra]
        argv += ["--log-format", "json"]
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.path, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd="/tmp",
            env=env,
        )

    def ready(self, timeout: float = 60.0) -> dict[str, str]:
        """Wait for ``READY=1``."""
        return self.notify.wait_for(lambda m: m.get("READY") == "1", timeout)

    def logged(self, event: str) -> list[str]:
        """The daemon's JSON log lines of ``event``."""
        return [line for line in self.log.read_text().splitlines() if f'"{event}"' in line]

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 15 s); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        return self.proc.returncode


class Control:
    """The line to the host (ttyS1), as guest/main.py's: one line out, ``ok`` back."""

    def __init__(self) -> None:
        import termios  # noqa: PLC0415
        import tty  # noqa: PLC0415

        self.fd = os.open("/dev/ttyS1", os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        termios.tcflush(self.fd, termios.TCIOFLUSH)
        self.buf = b""

    def ask(self, line: str) -> str:
        os.write(self.fd, line.encode() + b"\n")
        while b"\n" not in self.buf:
            self.buf += os.read(self.fd, 256)
        answer, self.buf = self.buf.split(b"\n", 1)
        return answer.decode(errors="replace").strip()

    def close(self) -> None:
        os.close(self.fd)


# -- edu: MSI, INTx, DMA, the bind uevent, removal -----------------------------------------


class EduRun:
    """A daemon on edu, started before the device is bound, and two clients."""

    def __init__(self) -> None:
        self.daemon: Daemon | None = None
        self.listeners: list[Listener] = []
        self.access: DeviceAccess | None = None
        self.bar: Bar | None = None

    def start_waiting(self) -> dict[str, Any]:
        """``serve --wait`` first, bind second: the bind uevent opens the device."""
        driver = Path("/sys/bus/pci/devices") / EDU_BDF / "driver"
        assert not driver.exists(), f"edu is bound already ({os.readlink(driver)})"
        self.daemon = daemon = Daemon(EDU_BDF, EDU_SOCKET, EDU_LOG, "--wait")
        daemon.notify.wait_for(lambda m: "waiting" in m.get("STATUS", ""), 60)
        bound = time.monotonic()
        group = bind_vfio(EDU_BDF)
        daemon.ready(timeout=30)
        bind_wait = time.monotonic() - bound
        waited = daemon.logged("device.waiting")
        opened = daemon.logged("device.bound")
        self.listeners = [Listener(EDU_SOCKET, f"edu-{i}") for i in range(2)]
        self.access = DeviceAccess.open(self.listeners[0].client)
        self.access.enable_bus_master()
        self.bar = bar = self.access.bar("bar0")
        bar.write32(EDU_LIVENESS, 0x12345678)
        alive = bar.read32(EDU_LIVENESS) == (~0x12345678 & 0xFFFFFFFF)
        ident = bar.read32(EDU_ID)
        info = self.listeners[0].client.device_info()
        counts = {i: info[i]["count"] for i in ("intx", "msi", "msix", "err")}
        checks = {
            # Checked once the daemon is ready: devtmpfs makes the node asynchronously.
            "group_node": group.exists(),
            "logged_waiting_once": len(waited) == 1,
            "opened_on_bind_uevent": len(opened) == 1 and '"uevent": "bind"' in opened[0],
            "liveness": alive,
            "edu_id": ident & 0xFF == 0xED,
            "irq_counts": counts == {"intx": 1, "msi": 1, "msix": 0, "err": 0},
        }
        return {
            "ok": all(checks.values()),
            "failed_checks": [name for name, passed in checks.items() if not passed],
            "bind_wait_seconds": round(bind_wait, 3),
            "uevent": opened[0] if opened else None,
            "waiting_log": waited,
            "group": str(group),
            "id": hex(ident),
            "irq_counts": counts,
            "figures": f"{len(waited)} device.waiting, {len(opened)} device.bound "
            f"({'on the bind uevent' if checks['opened_on_bind_uevent'] else 'NOT on bind'}), "
            f"ready {bind_wait * 1000:.0f} ms after the bind; id {ident:#x}, liveness "
            f"{'ok' if alive else 'BAD'}; counts {counts}",
        }

    def _raise(self, value: int) -> None:
        assert self.bar is not None
        self.bar.write32(EDU_IRQ_RAISE, value)

    def _ack(self, value: int) -> None:
        assert self.bar is not None
        self.bar.write32(EDU_IRQ_ACK, value)

    def check_msi(self) -> dict[str, Any]:
        """Both clients subscribe to MSI; each edu raise is one message to each."""
        hows = [lis.client.subscribe("msi", [0])["how"] for lis in self.listeners]
        kernel_before = proc_count(EDU_BDF, "msi")
        for n in range(1, MSI_RAISES + 1):
            self._raise(1)
            for lis in self.listeners:
                lis.wait(lambda lis=lis, n=n: lis.count("msi") >= n, f"MSI {n}")  # type: ignore[misc]
            self._ack(1)
        received = [lis.count("msi") for lis in self.listeners]
        kernel = proc_count(EDU_BDF, "msi") - kernel_before
        ok = (
            hows[0] == "prearm"
            and hows[1] == "already"
            and received == [MSI_RAISES] * 2
            and kernel == MSI_RAISES
        )
        return {
            "ok": ok,
            "how": hows,
            "raised": MSI_RAISES,
            "received": received,
            "kernel_counted": kernel,
            "figures": f"MSI raised {MSI_RAISES}, received {received}, kernel counted {kernel}",
        }

    def check_dma(self) -> dict[str, Any]:
        """edu copies a pattern in from ``dma.alloc`` memory and back out, below 256 MiB."""
        assert self.bar is not None
        lis = self.listeners[0]
        with dma_alloc(lis.client, 2 * EDU_DMA_SIZE, iova_max=EDU_IOVA_MAX) as buf:
            pattern = bytes((i * 7 + 3) & 0xFF for i in range(EDU_DMA_LEN))
            buf.mem[:EDU_DMA_LEN] = pattern
            buf.mem[EDU_DMA_SIZE:] = bytes(EDU_DMA_SIZE)
            below = buf.iova + buf.size - 1 <= EDU_IOVA_MAX
            done = lis.count("msi")
            for src, dst, cmd in (
                (buf.iova, EDU_DMA_BUFFER, EDU_DMA_RUN | EDU_DMA_IRQ),
                (
                    EDU_DMA_BUFFER,
                    buf.iova + EDU_DMA_SIZE,
                    EDU_DMA_RUN | EDU_DMA_TO_RAM | EDU_DMA_IRQ,
                ),
            ):
                self.bar.write32(EDU_DMA_SRC, src)
                self.bar.write32(EDU_DMA_DST, dst)
                self.bar.write32(EDU_DMA_COUNT, EDU_DMA_LEN)
                self.bar.write32(EDU_DMA_CMD, cmd)
                done += 1
                # The engine runs 100 ms of virtual time later and raises 0x100.
                lis.wait(lambda done=done: lis.count("msi") >= done, "DMA completion", 15)  # type: ignore[misc]
                self._ack(EDU_DMA_IRQ_VALUE)
            out = bytes(buf.mem[EDU_DMA_SIZE:])
            # The pattern came back, and edu wrote nothing past the transfer.
            copied = out[:EDU_DMA_LEN] == pattern and not any(out[EDU_DMA_LEN:])
            iova = buf.iova
        # The other client waited for nothing but received the completions too.
        other = self.listeners[1]
        other.wait(lambda: other.count("msi") >= MSI_RAISES + 2, "DMA completions")
        ok = below and copied
        return {
            "ok": ok,
            "iova": hex(iova),
            "copied": copied,
            "figures": f"dma.alloc(iova_max={EDU_IOVA_MAX:#x}) gave IOVA {iova:#x}; "
            f"{EDU_DMA_LEN} bytes in and out through edu's engine: "
            f"{'equal' if copied else 'DIFFERENT'}",
        }

    def check_intx(self) -> dict[str, Any]:
        """MSI released, INTx subscribed: masked after each interrupt until ``unmask``."""
        for lis in self.listeners:
            lis.client.unsubscribe("msi", [0])
        holder, other = self.listeners
        how = holder.client.subscribe("intx", [0])["how"]
        try:
            other.client.subscribe("intx", [0])
            second = "accepted"
        except Exception as exc:
            second = str(getattr(exc, "code", type(exc).__name__))
        command = self.access.config_read(PCI_COMMAND, 2) if self.access else 0
        kernel_before = proc_count(EDU_BDF, "intx")
        # The line goes high: one interrupt, then the kernel masks it.
        self._raise(1)
        holder.wait(lambda: holder.count("intx") >= 1, "the first INTx")
        # Low and high again while masked: nothing until unmask, then exactly one.
        self._ack(1)
        self._raise(1)
        kernel_masked = proc_count(EDU_BDF, "intx")
        quiet = holder.quiet_for(MASKED_WATCH)
        kernel_still = proc_count(EDU_BDF, "intx")
        unmask_started = time.monotonic()
        holder.client.unmask("intx")
        holder.wait(lambda: holder.count("intx") >= 2, "the INTx held back by the mask")
        unmask_latency = time.monotonic() - unmask_started
        self._ack(1)
        holder.client.unmask("intx")
        # raise / receive / ack / unmask, INTX_CYCLES times.
        for n in range(3, INTX_CYCLES + 3):
            self._raise(1)
            holder.wait(lambda n=n: holder.count("intx") >= n, f"INTx {n}")  # type: ignore[misc]
            self._ack(1)
            holder.client.unmask("intx")
        raised = INTX_CYCLES + 2
        # Nothing extra after the last unmask (the line is low).
        trailing_quiet = holder.quiet_for(MASKED_WATCH)
        received = holder.count("intx")
        kernel = proc_count(EDU_BDF, "intx") - kernel_before
        ok = (
            how == "dynamic"
            and second == "EBUSY"
            and quiet
            and kernel_masked == kernel_still
            and received == raised
            # The one held back by the mask is signalled by the unmask itself, not by a
            # new interrupt: vfio_pci_intx_unmask_handler finds the line still asserted
            # (pci_check_and_unmask_intx) and signals the eventfd instead of unmasking.
            and kernel == raised - 1
            and trailing_quiet
            and other.count("intx") == 0
        )
        return {
            "ok": ok,
            "how": how,
            "second_subscriber": second,
            "command": hex(command),
            "raised": raised,
            "received": received,
            "kernel_counted": kernel,
            "held_while_masked": quiet and kernel_masked == kernel_still,
            "unmask_to_delivery_ms": round(unmask_latency * 1000, 1),
            "figures": f"INTx raised {raised}, received {received}, kernel counted {kernel} "
            "(+1 signalled by the unmask); "
            f"raised again while masked: nothing for {MASKED_WATCH}s "
            f"({'held' if quiet else 'DELIVERED'}), delivered "
            f"{unmask_latency * 1000:.1f} ms after unmask; second subscriber {second}",
        }

    def check_remove(self) -> dict[str, Any]:
        """``remove`` in sysfs while a client holds INTx: every client told, the daemon exits 0."""
        assert self.daemon is not None
        if self.access is not None:
            # Our dup of the device fd would hold the removal up, as a driver's would.
            self.access.close()
            self.access = None
        started = time.monotonic()
        remove = Path("/sys/bus/pci/devices") / EDU_BDF / "remove"
        writer = subprocess.Popen(["/bin/sh", "-c", f"echo 1 > {remove}"])
        writer.wait(timeout=60)
        removed = time.monotonic() - started
        for lis in self.listeners:
            lis.wait(lambda lis=lis: bool(lis.lost), "device_lost", 30)  # type: ignore[misc]
        code = self.daemon.proc.wait(timeout=30)
        exited = time.monotonic() - started
        reasons = [lis.lost[0] for lis in self.listeners]
        gone = not (Path("/sys/bus/pci/devices") / EDU_BDF).exists()
        seen = self.daemon.logged("device.gone") + self.daemon.logged("daemon.device_lost")
        ok = (
            writer.returncode == 0
            and gone
            and code == 0
            # vfio-pci asks through REQ first; the daemon waits for the remove
            # uevent before telling its clients (irqd.device.events).
            and reasons == ["removed"] * len(self.listeners)
        )
        return {
            "ok": ok,
            "remove_seconds": round(removed, 3),
            "exit_seconds": round(exited, 3),
            "daemon_exit": code,
            "reasons": reasons,
            "log": seen[-4:],
            "figures": f"remove returned after {removed:.2f}s, daemon exit {code} after "
            f"{exited:.2f}s; clients told {reasons}",
        }

    def close(self) -> None:
        if self.access is not None:
            self.access.close()
        for lis in self.listeners:
            lis.client.close()
        if self.daemon is not None:
            self.daemon.stop()


# -- AER: the error eventfd ---------------------------------------------------------------


class AerRun:
    """virtio-rng-pci with AER behind a root port; errors injected from the host."""

    def __init__(self) -> None:
        self.daemon: Daemon | None = None
        self.listeners: list[Listener] = []
        self.access: DeviceAccess | None = None
        self.ctl: Control | None = None

    def _inject(self, error: str) -> tuple[str, float]:
        """The host's monitor injects ``error``; every client waits for its ``err``."""
        if self.ctl is None:
            self.ctl = Control()
        before = [lis.err for lis in self.listeners]
        started = time.monotonic()
        answer = self.ctl.ask(f"aer {RNG_ID} {error}")
        assert answer == "ok", f"the host could not inject {error}: {answer}"
        for lis, had in zip(self.listeners, before, strict=True):
            lis.wait(lambda lis=lis, had=had: lis.err > had, f"err after {error}", 15)  # type: ignore[misc]
        return answer, time.monotonic() - started

    def spawn(self) -> None:
        """Bind the device and start its daemon, without waiting: a Python process
        takes many seconds to start under TCG, so it starts while edu's steps run."""
        bind_vfio(RNG_BDF)
        self.daemon = Daemon(RNG_BDF, RNG_SOCKET, RNG_LOG)

    def check_nonfatal(self) -> dict[str, Any]:
        """UNSUP (non-fatal): every client gets ``err`` count 1; the device keeps working."""
        if self.daemon is None:
            self.spawn()
        daemon = self.daemon
        assert daemon is not None
        daemon.ready()
        self.listeners = [Listener(RNG_SOCKET, f"aer-{i}") for i in range(3)]
        self.access = DeviceAccess.open(self.listeners[0].client)
        self.access.enable_bus_master()
        info = self.listeners[0].client.device_info()
        vendor = self.access.config_read(0, 2)
        self.listeners[1].client.subscribe("msix", [0])
        _, seconds = self._inject("UNSUP")
        # Exactly one error each: no second notification follows.
        quiet = all(lis.quiet_for(0.2) for lis in self.listeners)
        errs = [lis.err for lis in self.listeners]
        # Still working: config space answers, and a vector still delivers.
        vendor_after = self.access.config_read(0, 2)
        command_after = self.access.config_read(PCI_COMMAND, 2)
        trig = self.listeners[1]
        trig.client.trigger("msix", [0])
        trig.wait(lambda: trig.count("msix") >= 1, "msix loopback after the error")
        ok = (
            info["err"]["count"] == 1
            and errs == [1, 1, 1]
            and quiet
            and vendor == vendor_after == 0x1AF4
            and daemon.proc.poll() is None
        )
        return {
            "ok": ok,
            "err_counts": errs,
            "err_seconds": round(seconds, 3),
            "vendor_after": hex(vendor_after),
            "command_after": hex(command_after),
            "figures": f"UNSUP injected: err counts {errs} after {seconds * 1000:.0f} ms; "
            f"afterwards vendor {vendor_after:#x}, COMMAND {command_after:#x}, "
            "msix loopback delivered, daemon serving",
        }

    def check_fatal(self) -> dict[str, Any]:
        """MALF_TLP (fatal): ``err`` reaches every client; record what is left."""
        before = [lis.err for lis in self.listeners]
        _, seconds = self._inject("MALF_TLP")
        quiet = all(lis.quiet_for(0.5) for lis in self.listeners)
        got = [lis.err - b for lis, b in zip(self.listeners, before, strict=True)]
        assert self.access is not None and self.daemon is not None
        command = self.access.config_read(PCI_COMMAND, 2)
        vendor = self.access.config_read(0, 2)
        serving = self.daemon.proc.poll() is None
        stats: dict[str, Any] = dict(self.listeners[0].client.stats()) if serving else {}
        self.access.close()
        self.access = None
        for lis in self.listeners:
            lis.client.close()
        self.listeners = []
        started = time.monotonic()
        code = self.daemon.stop()
        stop_seconds = time.monotonic() - started
        ok = got == [1, 1, 1] and quiet and serving and code == 0
        return {
            "ok": ok,
            "err_counts": got,
            "err_seconds": round(seconds, 3),
            "command_after": hex(command),
            "vendor_after": hex(vendor),
            "daemon_serving_after": serving,
            "errors_in_stats": {k: v for k, v in stats.items() if "err" in k},
            "daemon_exit": code,
            "stop_seconds": round(stop_seconds, 2),
            "figures": f"MALF_TLP injected: err counts {got} after {seconds * 1000:.0f} ms; "
            f"afterwards COMMAND {command:#x}, vendor {vendor:#x}, daemon serving {serving}, "
            f"SIGTERM exit {code} in {stop_seconds:.2f}s",
        }

    def close(self) -> None:
        if self.access is not None:
            self.access.close()
        for lis in self.listeners:
            lis.client.close()
        self.access = None
        self.listeners = []
        if self.daemon is not None:
            self.daemon.stop()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None


def run_all(
    step: Callable[[str, Callable[[], dict[str, Any]]], None], results: dict[str, Any]
) -> None:
    """Every step of this module, in order; ``step`` is guest/main.py's recorder."""
    edu, aer = EduRun(), AerRun()
    try:
        try:
            aer.spawn()
        except Exception:  # check_nonfatal tries again and reports it
            print(f"IRQD-VM: the AER device's daemon did not start: {sys.exc_info()[1]}")
        step("edu_wait", edu.start_waiting)
        if results["steps"]["edu_wait"].get("ok"):
            step("edu_msi", edu.check_msi)
            step("edu_dma", edu.check_dma)
            step("edu_intx", edu.check_intx)
        try:
            step("aer_nonfatal", aer.check_nonfatal)
            if results["steps"]["aer_nonfatal"].get("ok"):
                step("aer_fatal", aer.check_fatal)
        finally:
            aer.close()
        if edu.daemon is not None:
            step("edu_remove", edu.check_remove)
    finally:
        aer.close()
        edu.close()
        for name, log in (("edu_daemon_log", EDU_LOG), ("rng_daemon_log", RNG_LOG)):
            results[name] = log.read_text()[-3000:] if log.exists() else ""


# -- the conformance run must not pass vacuously ----------------------------------------------

#: Why a conformance test may skip on the ivshmem doorbell (tests/device/vfio_harness.py and
#: tests/device/test_conformance.py); any other skip fails the step.
EXPECTED_SKIPS = (
    re.compile(r"the real device is .*, not "),
    re.compile(r"ivshmem-doorbell raises only MSI-X, not (intx|msi|err|req)"),
    re.compile(r"this kernel (sets|clears) NORESIZE for MSI-X"),
    re.compile(r"the device has no MSI capability"),
    re.compile(r"backend cannot drive INTx"),
    re.compile(r"ERR exists only on PCI Express devices"),
    re.compile(r"backend cannot make the kernel ask for the device"),
)


def judge_conformance(junit: Path, returncode: int) -> dict[str, Any]:
    """Counts from pytest's JUnit XML: every test collected ran, passed or skipped for
    an expected reason. The host compares ``passed`` with its floor per kernel."""
    import xml.etree.ElementTree as ET  # noqa: PLC0415  (only here)

    cases = list(ET.parse(junit).getroot().iter("testcase"))
    passed, failed = 0, 0
    reasons: dict[str, int] = {}
    unexpected: list[str] = []
    for case in cases:
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif skipped is not None:
            reason = skipped.get("message", "")
            reasons[reason] = reasons.get(reason, 0) + 1
            if not any(p.search(reason) for p in EXPECTED_SKIPS):
                unexpected.append(f"{case.get('classname')}.{case.get('name')}: {reason}")
        else:
            passed += 1
    skipped_n = sum(reasons.values())
    return {
        "ok": returncode == 0 and failed == 0 and not unexpected and passed > 0,
        "collected": len(cases),
        "passed": passed,
        "failed": failed,
        "skipped": skipped_n,
        "skip_reasons": reasons,
        "unexpected_skips": unexpected,
        "figures": f"{len(cases)} collected: {passed} passed, {skipped_n} skipped for expected "
        f"reasons, {len(unexpected)} unexpected skips, {failed} failed",
    }
