"""A userspace NVMe driver over vfio-irqd: interrupt-driven I/O with only the public client library.

The daemon owns the VFIO device; this program asks it for everything a driver
needs: the device fd (``device.open``: BAR0 and config space), DMA memory the
controller can reach (``dma.alloc``: queues, PRP lists, data buffers) and the
controller's MSI-X interrupts (``subscribe``). It then:

1. resets and enables the controller (CC, CSTS, AQA, ASQ, ACQ; the doorbell
   stride from CAP.DSTRD), with the admin queue on MSI-X vector 0, subscribed
   *before* CC.EN;
2. identifies the controller and namespace 1;
3. creates I/O queue pairs one by one *while I/O runs*, each on its own vector,
   subscribed right before its completion queue is created;
4. keeps reads and writes in flight on every queue (PRP1, PRP2, or a PRP list),
   checks every block read against what was written (``pattern.py``), and
   learns of completions only from ``irq`` notifications: after each one it
   scans that vector's completion queue by phase bit and rings the CQ head
   doorbell. No timer polling, no busy loop; the only wait with a timeout is
   the stall watchdog (a queue with commands outstanding and no completion
   for ``--stall`` seconds means an interrupt was lost: an error);
5. on ``resized`` with ``possible_loss`` (a NORESIZE kernel grew the MSI-X
   range, so interrupts raised meanwhile are gone) it rescans every queue;
   the daemon's loopback kick that follows arrives as an ``irq`` and is
   scanned like any other. Both are counted: completions found by the rescan
   (some of them may still have had their interrupt on the way: the rescan
   cannot tell) and completions found at the first interrupt of each vector
   after the ``resized`` (the kick, or a real one that came first);
6. disables the controller (stopping its DMA) before it frees its memory and
   disconnects; on ``device_lost`` it stops at once and exits with status 3.
   SIGINT or SIGTERM ends a run early the same orderly way: no new I/O is
   submitted, every I/O in flight completes (through its interrupt) and is
   checked, then the flush and the teardown; ``--ios 0`` runs until then.

The QEMU pitfall this order respects: QEMU's nvme (7.2) registers a completion
queue's MSI-X vector only if MSI-X is enabled when the queue is created, so
the vector is subscribed (which makes the daemon enable MSI-X and assign it)
before CC.EN for the admin queue and before Create I/O CQ for the others.

Register offsets, command opcodes and structure layouts are from the NVM
Express Base Specification 2.0 (sections 3.1 "Controller registers", 4.6
"Completion Queue Entry", 5 "Admin Command Set") and the NVM Command Set
Specification 1.0 (Identify Namespace, Read, Write). Run with ``--help``.
"""

from __future__ import annotations

import argparse
import json
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from irqproto.blocking import Client
from irqproto.driver import DeviceAccess, DmaBuffer, dma_alloc
from irqproto.errors import Disconnected, ProtocolError, RpcError
from irqproto.notifications import (
    DeviceLostNotification,
    IrqNotification,
    ResizedNotification,
)

PAGE = 4096

# -- the data pattern -----------------------------------------------------------------
# Every 512-byte logical block holds its own address and a generation number,
# repeated: generation 0 is what was in the namespace before (the VM test fills
# its backing file so), and each write of the block bumps it. A read that
# returns the wrong block, a stale one or a torn one differs from
# ``block(lba, gen)``. The VM test's host side loads this file to check the
# backing file after the guest is gone.

#: The logical block size the pattern is laid out in (QEMU's nvme default).
BLOCK = 512
_PATTERN_HEADER = struct.Struct("<8sQQ")  # magic, lba, generation


def block(lba: int, gen: int) -> bytes:
    """The 512 bytes that logical block ``lba`` holds at generation ``gen``."""
    header = _PATTERN_HEADER.pack(b"irqdnvme", lba, gen)
    return (header * -(-BLOCK // len(header)))[:BLOCK]


def blocks(lba: int, gens: list[int]) -> bytes:
    """Consecutive blocks from ``lba`` with the given generations."""
    return b"".join(block(lba + i, g) for i, g in enumerate(gens))


def image(size: int) -> bytes:
    """A backing file of ``size`` bytes, every block at generation 0."""
    return b"".join(block(lba, 0) for lba in range(size // BLOCK))


def decode(data: bytes) -> tuple[int, int] | None:
    """``(lba, gen)`` a block claims to be, or None when it is not one of ours."""
    magic, lba, gen = _PATTERN_HEADER.unpack_from(data)
    return (lba, gen) if magic == b"irqdnvme" else None


# -- controller registers (NVMe Base 2.0, 3.1.3) -------------------------------------
REG_CAP = 0x00
REG_VS = 0x08
REG_CC = 0x14
REG_CSTS = 0x1C
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
DOORBELLS = 0x1000

CC_EN = 1 << 0
CC_IOSQES_64 = 6 << 16  # 2**6-byte submission queue entries
CC_IOCQES_16 = 4 << 20  # 2**4-byte completion queue entries
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1

# -- commands ------------------------------------------------------------------------
ADMIN_CREATE_SQ = 0x01
ADMIN_CREATE_CQ = 0x05
ADMIN_IDENTIFY = 0x06
ADMIN_SET_FEATURES = 0x09
FEATURE_NUM_QUEUES = 0x07
CNS_NAMESPACE = 0x00
CNS_CONTROLLER = 0x01
IO_FLUSH = 0x00
IO_WRITE = 0x01
IO_READ = 0x02
QUEUE_PHYS_CONTIG = 1 << 0
CQ_IRQ_ENABLED = 1 << 1

#: A submission queue entry (64 bytes): opcode, flags, command id, nsid,
#: CDW2-3, metadata pointer, PRP1, PRP2, CDW10-15.
SQE = struct.Struct("<BBHIQQQQIIIIII")
#: A completion queue entry (16 bytes): DW0, DW1, SQ head, SQ id, command id, status+phase.
CQE = struct.Struct("<IIHHHH")
assert SQE.size == 64 and CQE.size == 16
#: The status field (bit 0: the phase tag) alone, at its offset in the entry.
CQE_STATUS = struct.Struct("<H")
CQE_STATUS_OFFSET = 14

#: After a notification arrives, what else the socket already holds is taken
#: with polls this short, at most this many: a driver slower than the
#: interrupt rate otherwise answers the notifications the daemon wrote long
#: ago one by one, and a queue's interrupt waits behind all of them.
READY_POLL_S = 0.0005
MAX_BATCH = 256
#: How often an entry whose phase says "new" but whose command id is not in
#: flight is read again before the run fails (see Controller.reap).
MAX_REREADS = 1000

#: Transfer sizes in logical blocks, cycled per slot: one page (PRP1 only), two
#: pages (PRP1 + PRP2) and four pages (PRP1 + a PRP list).
SIZES = (8, 16, 32)
SLOT_BLOCKS = max(SIZES)
SLOT_BYTES = SLOT_BLOCKS * BLOCK

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DEVICE_LOST = 3


class NvmeError(Exception):
    """The controller refused a command, timed out, or returned wrong data."""


class StallError(NvmeError):
    """A queue had commands outstanding and saw no completion for too long: a lost interrupt."""


class DeviceLost(Exception):
    """The daemon said ``device_lost`` (or closed the connection)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Completion:
    """One completion queue entry, decoded."""

    cid: int
    status: int
    dw0: int
    sq_head: int


@dataclass
class Command:
    """A command in flight: what to do when it completes."""

    queue: Queue
    on_done: Callable[[Completion], None]
    submitted: float


@dataclass
class Queue:
    """A submission/completion queue pair in one DMA buffer (SQ first, then CQ)."""

    qid: int
    vector: int
    entries: int
    mem: DmaBuffer
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1
    inflight: dict[int, Command] = field(default_factory=dict)
    next_cid: int = 0
    last_progress: float = 0.0
    completions: int = 0
    #: When a completion was first seen posted (phase new) but not yet signalled.
    posted_seen: float | None = None

    @property
    def sq_iova(self) -> int:
        return self.mem.iova

    @property
    def cq_offset(self) -> int:
        return _round_up(self.entries * SQE.size, PAGE)

    @property
    def cq_iova(self) -> int:
        return self.mem.iova + self.cq_offset

    @property
    def extra_offset(self) -> int:
        """Where the caller's part of the buffer starts, after both queues."""
        return self.cq_offset + _round_up(self.entries * CQE.size, PAGE)

    def take_cid(self) -> int:
        # Command ids are per submission queue; never reuse one still in flight.
        while self.next_cid in self.inflight:
            self.next_cid = (self.next_cid + 1) & 0xFFFF
        cid = self.next_cid
        self.next_cid = (self.next_cid + 1) & 0xFFFF
        return cid


@dataclass
class Slot:
    """One I/O kept in flight on a queue: its LBA range, data buffer and PRP list page."""

    queue: Queue
    first_lba: int
    data_offset: int  # in the queue's buffer
    prp_offset: int
    step: int = 0


@dataclass
class Figures:
    """What the run did; printed as one line and, with ``--json``, as JSON."""

    ios: int = 0
    reads: int = 0
    writes: int = 0
    blocks_verified: int = 0
    interrupts: int = 0
    irq_notifications: int = 0
    #: Waits that returned notifications (each batch is handled in one pass).
    batches: int = 0
    completions: int = 0
    io_seconds: float = 0.0
    vectors: dict[int, str] = field(default_factory=dict)
    resized: list[dict[str, Any]] = field(default_factory=list)
    recovered_on_resize: int = 0
    recovered_after_kick: int = 0
    q1_completions_while_creating: int = 0
    cqe_rereads: int = 0
    #: Per queue, the longest a completion sat posted in its CQ before its
    #: vector's interrupt arrived, as seen at the notifications in between (ms).
    signal_delay_ms: dict[int, float] = field(default_factory=dict)
    dma_allocated: int = 0
    dma_mappings: int = 0
    daemon_dma: dict[str, Any] = field(default_factory=dict)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _ascii(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip(" \0")


class Controller:
    """One NVMe controller behind vfio-irqd, driven from a single thread."""

    def __init__(self, client: Client, *, stall: float, log: Callable[[str], None]) -> None:
        self.client = client
        self.stall = stall
        self.log = log
        self.dev = DeviceAccess.open(client)
        self.bar = self.dev.bar("bar0")
        self.buffers: list[DmaBuffer] = []
        self.queues: dict[int, Queue] = {}
        self.by_vector: dict[int, list[Queue]] = {}
        self.figures = Figures()
        #: Vectors whose next interrupt follows a ``resized``: the daemon's kick.
        self.kicked: set[int] = set()
        cap = self.bar.read64(REG_CAP)
        self.mqes = (cap & 0xFFFF) + 1
        self.stride = 4 << ((cap >> 32) & 0xF)
        # CAP.TO is in 500 ms units: how long CSTS.RDY may take to follow CC.EN.
        self.ready_timeout = max(1, (cap >> 24) & 0xFF) * 0.5
        self.version = self.bar.read32(REG_VS)

    # -- memory ---------------------------------------------------------------------

    def alloc(self, size: int, name: str) -> DmaBuffer:
        """DMA memory from the daemon, zeroed (a fresh memfd is)."""
        buf = dma_alloc(self.client, _round_up(size, PAGE), name=name)
        self.buffers.append(buf)
        self.figures.dma_allocated += buf.size
        self.figures.dma_mappings += 1
        return buf

    # -- registers ------------------------------------------------------------------

    def _wait_ready(self, ready: bool) -> None:
        # The one register poll: NVMe has no interrupt for CSTS.RDY following CC.EN.
        deadline = time.monotonic() + self.ready_timeout
        while bool(self.bar.read32(REG_CSTS) & CSTS_RDY) is not ready:
            if self.bar.read32(REG_CSTS) & CSTS_CFS:
                raise NvmeError("controller fatal status (CSTS.CFS)")
            if time.monotonic() > deadline:
                raise NvmeError(f"CSTS.RDY did not become {int(ready)} in {self.ready_timeout}s")
            time.sleep(0.001)

    def disable(self) -> None:
        """CC.EN = 0: the controller stops every queue and all its DMA."""
        if self.bar.read32(REG_CC) & CC_EN:
            self.bar.write32(REG_CC, self.bar.read32(REG_CC) & ~CC_EN & 0xFFFF_FFFF)
        self._wait_ready(False)

    def _doorbell(self, qid: int, completion: bool, value: int) -> None:
        self.bar.write32(DOORBELLS + (2 * qid + int(completion)) * self.stride, value)

    # -- start ----------------------------------------------------------------------

    def enable(self, admin_entries: int = 32) -> None:
        """Reset, then bring up the admin queue on vector 0 (subscribed before CC.EN)."""
        self.dev.enable_bus_master()
        self.disable()
        mem = self.alloc(2 * PAGE, "admin")
        admin = Queue(0, 0, admin_entries, mem)
        # MSI-X on and vector 0 assigned before CC.EN: QEMU's nvme registers the
        # admin CQ's vector at enable time only if MSI-X is already on.
        self._subscribe(admin)
        self.bar.write32(REG_AQA, (admin_entries - 1) << 16 | (admin_entries - 1))
        self.bar.write64(REG_ASQ, admin.sq_iova)
        self.bar.write64(REG_ACQ, admin.cq_iova)
        self.bar.write32(REG_CC, CC_EN | CC_IOSQES_64 | CC_IOCQES_16)
        self._wait_ready(True)
        self._add_queue(admin)

    def _subscribe(self, queue: Queue) -> None:
        how = str(self.client.subscribe("msix", [queue.vector])["how"])
        self.figures.vectors[queue.vector] = how
        self.log(f"vector {queue.vector} subscribed ({how})")

    def _add_queue(self, queue: Queue) -> None:
        queue.last_progress = time.monotonic()
        self.queues[queue.qid] = queue
        self.by_vector.setdefault(queue.vector, []).append(queue)

    # -- commands -------------------------------------------------------------------

    def submit(
        self,
        queue: Queue,
        opcode: int,
        on_done: Callable[[Completion], None],
        *,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw: tuple[int, ...] = (),
    ) -> None:
        """Write a command into the queue's SQ and ring its tail doorbell."""
        if len(queue.inflight) >= queue.entries - 1:
            raise NvmeError(f"queue {queue.qid} is full")
        cid = queue.take_cid()
        dwords = (*cdw, 0, 0, 0, 0, 0, 0)[:6]
        SQE.pack_into(
            queue.mem.mem, queue.sq_tail * SQE.size, opcode, 0, cid, nsid, 0, 0, prp1, prp2, *dwords
        )
        if not queue.inflight:
            # The stall clock of an idle queue starts with its first command.
            queue.last_progress = time.monotonic()
        queue.inflight[cid] = Command(queue, on_done, time.monotonic())
        queue.sq_tail = (queue.sq_tail + 1) % queue.entries
        self._doorbell(queue.qid, False, queue.sq_tail)

    def admin(self, opcode: int, **kw: Any) -> Completion:
        """Run one admin command to completion (other queues keep running meanwhile)."""
        done: list[Completion] = []
        self.submit(self.queues[0], opcode, done.append, **kw)
        self.pump(lambda: bool(done))
        if done[0].status:
            raise NvmeError(f"admin opcode {opcode:#x} failed: status {done[0].status:#x}")
        return done[0]

    def reap(self, queue: Queue) -> int:
        """Take every new completion from the queue's CQ (phase bit), ring its head doorbell."""
        found = 0
        mem = queue.mem.mem
        while True:
            entry = queue.cq_offset + queue.cq_head * CQE.size
            # The phase bit first, the rest only once it says the entry is new
            # (as Linux's nvme driver does, with dma_rmb between): the device
            # may be writing the entry right now, and a read of the whole of it
            # could pair a new phase with the command id of the previous lap.
            # x86 does not reorder loads with loads, so nothing more is needed.
            (status,) = CQE_STATUS.unpack_from(mem, entry + CQE_STATUS_OFFSET)
            if status & 1 != queue.phase:
                break
            dw0, _dw1, sq_head, _sqid, cid, status = CQE.unpack_from(mem, entry)
            rereads = 0
            while cid not in queue.inflight and rereads < MAX_REREADS:
                # An emulated device may write the entry in pieces, the phase
                # first: the rest lands within moments. Read it again (bounded).
                rereads += 1
                dw0, _dw1, sq_head, _sqid, cid, status = CQE.unpack_from(mem, entry)
            self.figures.cqe_rereads += rereads
            command = queue.inflight.pop(cid, None)
            if command is None:
                raise NvmeError(f"queue {queue.qid}: completion for unknown command {cid}")
            queue.cq_head += 1
            if queue.cq_head == queue.entries:
                queue.cq_head = 0
                queue.phase ^= 1
            found += 1
            queue.completions += 1
            self.figures.completions += 1
            command.on_done(Completion(cid, status >> 1, dw0, sq_head))
        if found:
            queue.last_progress = time.monotonic()
            self._doorbell(queue.qid, True, queue.cq_head)
            if queue.posted_seen is not None:
                delay = (queue.last_progress - queue.posted_seen) * 1000
                worst = self.figures.signal_delay_ms.get(queue.qid, 0.0)
                self.figures.signal_delay_ms[queue.qid] = round(max(worst, delay), 1)
                queue.posted_seen = None
        return found

    def _note_posted(self) -> None:
        # Diagnostics only, never a reap: which queues have a completion posted
        # whose interrupt has not come yet (a late interrupt, not a slow device).
        now = time.monotonic()
        for queue in self.queues.values():
            if queue.inflight and queue.posted_seen is None:
                entry = queue.cq_offset + queue.cq_head * CQE.size
                (status,) = CQE_STATUS.unpack_from(queue.mem.mem, entry + CQE_STATUS_OFFSET)
                if status & 1 == queue.phase:
                    queue.posted_seen = now

    # -- the event loop -------------------------------------------------------------

    def pump(self, until: Callable[[], bool]) -> None:
        """Handle notifications until ``until()``: the only place that waits.

        Waits for the daemon's next notification, bounded only by the stall
        watchdog of the queues that have commands outstanding.
        """
        while not until():
            busy = [q for q in self.queues.values() if q.inflight]
            if not busy:
                raise NvmeError("waiting with nothing outstanding")
            oldest = min(busy, key=lambda q: q.last_progress)
            left = oldest.last_progress + self.stall - time.monotonic()
            if left <= 0:
                self._stalled(oldest)
            try:
                batch = self._take_ready(self.client.next_notification(timeout=left))
            except TimeoutError:
                continue
            except Disconnected as exc:
                raise DeviceLost(f"the daemon closed the connection ({exc})") from exc
            self._handle_batch(batch)
            self._note_posted()

    def _take_ready(self, first: object) -> list[object]:
        """``first`` and every notification already waiting (bounded), in order."""
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self.client.next_notification(timeout=READY_POLL_S))
            except (TimeoutError, Disconnected):
                break  # a Disconnected is raised again by the next wait
        self.figures.batches += 1
        return batch

    def _handle_batch(self, batch: list[object]) -> None:
        """Handle a batch in order, with the ``irq`` counts of all of it merged:
        each signalled queue is reaped once, after the last of them."""
        signalled: dict[int, int] = {}
        for note in batch:
            if isinstance(note, IrqNotification):
                if note.index != "msix":
                    continue
                self.figures.irq_notifications += 1
                for vector, count in note.counts:
                    self.figures.interrupts += count
                    signalled[vector] = signalled.get(vector, 0) + count
            else:
                self._handle(note)
        for vector in signalled:
            found = sum(self.reap(q) for q in self.by_vector.get(vector, ()))
            if vector in self.kicked:
                self.kicked.discard(vector)
                self.figures.recovered_after_kick += found

    def _stalled(self, queue: Queue) -> None:
        # Diagnose only: a completion that is there but was never signalled.
        posted = self.reap(queue)
        raise StallError(
            f"queue {queue.qid} (vector {queue.vector}): no interrupt for {self.stall}s "
            f"with {len(queue.inflight) + posted} commands outstanding; "
            f"{posted} completions were posted without an interrupt"
        )

    def _handle(self, note: object) -> None:
        if isinstance(note, IrqNotification):
            if note.index != "msix":
                return
            self.figures.irq_notifications += 1
            for vector, count in note.counts:
                self.figures.interrupts += count
                found = sum(self.reap(q) for q in self.by_vector.get(vector, ()))
                if vector in self.kicked:
                    self.kicked.discard(vector)
                    self.figures.recovered_after_kick += found
        elif isinstance(note, ResizedNotification):
            self.figures.resized.append(
                {"vectors": list(note.vectors), "possible_loss": note.possible_loss}
            )
            if note.possible_loss:
                # MSI-X was off for a moment: a completion posted then raised no
                # interrupt. Look at every queue now; the kick follows.
                self.figures.recovered_on_resize += sum(self.reap(q) for q in self.queues.values())
                self.kicked.update(note.vectors)
        elif isinstance(note, DeviceLostNotification):
            raise DeviceLost(note.reason)

    # -- identify and queues --------------------------------------------------------

    def identify(self) -> dict[str, Any]:
        """Identify Controller and Namespace 1: what QEMU was given."""
        page = self.alloc(2 * PAGE, "identify")
        self.admin(ADMIN_IDENTIFY, prp1=page.iova, cdw=(CNS_CONTROLLER,))
        ctrl = bytes(page.mem[:PAGE])
        self.admin(ADMIN_IDENTIFY, nsid=1, prp1=page.iova + PAGE, cdw=(CNS_NAMESPACE,))
        ns = bytes(page.mem[PAGE:])
        (nsze,) = struct.unpack_from("<Q", ns, 0)
        flbas = ns[26] & 0xF
        lbads = ns[128 + 4 * flbas + 2]
        return {
            "vid": struct.unpack_from("<H", ctrl, 0)[0],
            "serial": _ascii(ctrl[4:24]),
            "model": _ascii(ctrl[24:64]),
            "firmware": _ascii(ctrl[64:72]),
            "namespaces": struct.unpack_from("<I", ctrl, 516)[0],
            "nsze": nsze,
            "lba_bytes": 1 << lbads,
            "ns_bytes": nsze << lbads,
            "version": f"{self.version >> 16}.{self.version >> 8 & 0xFF}",
        }

    def set_queue_count(self, wanted: int) -> int:
        """Set Features (Number of Queues): how many I/O queue pairs the controller grants."""
        n = wanted - 1
        done = self.admin(ADMIN_SET_FEATURES, cdw=(FEATURE_NUM_QUEUES, n << 16 | n))
        return min(done.dw0 & 0xFFFF, done.dw0 >> 16) + 1

    def create_io_queue(self, qid: int, entries: int, extra: int) -> Queue:
        """Subscribe vector ``qid``, then Create I/O CQ (IEN, IV = qid), then Create I/O SQ.

        ``extra`` bytes after the queues are for the caller (PRP lists, data).
        """
        sq_bytes = _round_up(entries * SQE.size, PAGE)
        cq_bytes = _round_up(entries * CQE.size, PAGE)
        mem = self.alloc(sq_bytes + cq_bytes + extra, f"q{qid}")
        queue = Queue(qid, qid, entries, mem)
        self._subscribe(queue)  # before the CQ: see the QEMU pitfall above
        size = (entries - 1) << 16 | qid
        self.admin(
            ADMIN_CREATE_CQ,
            prp1=queue.cq_iova,
            cdw=(size, queue.vector << 16 | CQ_IRQ_ENABLED | QUEUE_PHYS_CONTIG),
        )
        self.admin(ADMIN_CREATE_SQ, prp1=queue.sq_iova, cdw=(size, qid << 16 | QUEUE_PHYS_CONTIG))
        self._add_queue(queue)
        return queue

    def close(self, *, lost: bool = False) -> None:
        """Stop the controller's DMA, then give back the memory and the device fd.

        ``lost``: the device is going away; only let go of it here, at once
        (the kernel's unbind waits until every fd and mapping of it is gone,
        and the daemon frees the DMA memory when the connection closes).
        """
        try:
            if not lost:
                self.disable()
        finally:
            for buf in self.buffers:
                buf.close()
                if not lost:
                    self.client.dma_free(buf.id)
            self.buffers.clear()
            self.dev.close()


class Workload:
    """Reads and writes kept in flight on every I/O queue, each read checked.

    Each slot owns ``SLOT_BLOCKS`` blocks and alternates: read (checked against
    the generations it expects) then write (the next generation), with the
    transfer size cycling through ``SIZES``.
    """

    def __init__(self, ctrl: Controller, *, first_lba: int, lba_count: int) -> None:
        self.ctrl = ctrl
        #: No end while queues are being created; then ``finish_after`` sets one.
        self.target = sys.maxsize
        #: Ended early by SIGINT/SIGTERM (``stop``).
        self.stopped = False
        self.submitted = 0
        self.first_lba = first_lba
        self.lba_count = lba_count
        self.next_lba = first_lba
        self.gens: dict[int, int] = {}
        self.slots: list[Slot] = []
        self.errors: list[str] = []

    def layout(self, depth: int) -> int:
        """Bytes a queue of ``depth`` slots needs after its queues: PRP pages, then data."""
        return depth * (PAGE + SLOT_BYTES)

    def start(self, queue: Queue, depth: int, base: int) -> None:
        """Give ``queue`` ``depth`` slots (their memory from ``base`` in its buffer) and go."""
        for i in range(depth):
            if self.next_lba + SLOT_BLOCKS > self.first_lba + self.lba_count:
                raise NvmeError(f"--lba-count {self.lba_count} is too small for every slot")
            slot = Slot(queue, self.next_lba, base + depth * PAGE + i * SLOT_BYTES, base + i * PAGE)
            self.next_lba += SLOT_BLOCKS
            self.slots.append(slot)
            self._issue(slot)

    def finish_after(self, ios: int) -> None:
        """Submit ``ios`` more I/Os over all queues, then stop (unless stopped already)."""
        if not self.stopped:
            self.target = self.submitted + ios

    def stop(self) -> None:
        """Submit nothing more: the run ends once the I/Os in flight have completed."""
        self.target = min(self.target, self.submitted)
        self.stopped = True

    @property
    def done(self) -> bool:
        return self.submitted >= self.target and not any(
            q.inflight for q in self.ctrl.queues.values() if q.qid
        )

    def _issue(self, slot: Slot) -> None:
        if self.submitted >= self.target:
            return
        self.submitted += 1
        nlb = SIZES[(slot.step // 2) % len(SIZES)]
        write = slot.step % 2 == 1
        mem, iova = slot.queue.mem.mem, slot.queue.mem.iova
        lbas = range(slot.first_lba, slot.first_lba + nlb)
        if write:
            gens = [self.gens.get(lba, 0) + 1 for lba in lbas]
            data = blocks(slot.first_lba, gens)
            mem[slot.data_offset : slot.data_offset + len(data)] = data
        else:
            mem[slot.data_offset : slot.data_offset + nlb * BLOCK] = bytes(nlb * BLOCK)
        prp1, prp2 = self._prps(slot, nlb * BLOCK, iova)

        def done(completion: Completion) -> None:
            self._completed(slot, write, nlb, completion)

        self.ctrl.submit(
            slot.queue,
            IO_WRITE if write else IO_READ,
            done,
            nsid=1,
            prp1=prp1,
            prp2=prp2,
            cdw=(slot.first_lba & 0xFFFF_FFFF, slot.first_lba >> 32, nlb - 1),
        )

    def _prps(self, slot: Slot, size: int, iova: int) -> tuple[int, int]:
        # The data buffer is page aligned: PRP1 is its first page; PRP2 the
        # second page, or a PRP list of the remaining pages when there are more.
        data = iova + slot.data_offset
        pages = -(-size // PAGE)
        if pages == 1:
            return data, 0
        if pages == 2:
            return data, data + PAGE
        rest = [data + PAGE * i for i in range(1, pages)]
        struct.pack_into(f"<{len(rest)}Q", slot.queue.mem.mem, slot.prp_offset, *rest)
        return data, iova + slot.prp_offset

    def _completed(self, slot: Slot, write: bool, nlb: int, completion: Completion) -> None:
        figures = self.ctrl.figures
        figures.ios += 1
        if completion.status:
            self.errors.append(
                f"{'write' if write else 'read'} of LBA {slot.first_lba}+{nlb} on queue "
                f"{slot.queue.qid}: status {completion.status:#x}"
            )
        elif write:
            figures.writes += 1
            for lba in range(slot.first_lba, slot.first_lba + nlb):
                self.gens[lba] = self.gens.get(lba, 0) + 1
        else:
            figures.reads += 1
            got = bytes(slot.queue.mem.mem[slot.data_offset : slot.data_offset + nlb * BLOCK])
            gens = [self.gens.get(lba, 0) for lba in range(slot.first_lba, slot.first_lba + nlb)]
            if got != blocks(slot.first_lba, gens):
                bad = next(
                    i
                    for i in range(nlb)
                    if got[i * BLOCK : (i + 1) * BLOCK] != block(slot.first_lba + i, gens[i])
                )
                self.errors.append(
                    f"read of LBA {slot.first_lba}+{nlb}: expected generations {gens}, "
                    f"block {bad} holds {decode(got[bad * BLOCK :])}"
                )
            else:
                figures.blocks_verified += nlb
        slot.step += 1
        self._issue(slot)


def bring_up_queues(
    ctrl: Controller, work: Workload, queues: int, entries: int, depth: int
) -> Queue:
    """Create queue 1 and start its I/O, then queues 2.. one by one while it runs.

    Each admin command waits in the same loop that keeps queue 1's I/O going.
    Returns queue 1.
    """
    extra = work.layout(depth)
    q1 = ctrl.create_io_queue(1, entries, extra)
    work.start(q1, depth, q1.extra_offset)
    before = q1.completions
    for qid in range(2, queues + 1):
        queue = ctrl.create_io_queue(qid, entries, extra)
        work.start(queue, depth, queue.extra_offset)
    ctrl.figures.q1_completions_while_creating = q1.completions - before
    return q1


class StopOnSignal:
    """SIGINT and SIGTERM end the run in order instead of killing it.

    Killing a driver mid-I/O leaves the controller enabled with commands
    outstanding while the daemon unmaps their memory; stopping submits
    nothing more, lets the I/Os in flight complete through their interrupts,
    then flushes and disables the controller. The handler only sets state:
    it may run between any two bytecodes.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.work: Workload | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopOnSignal:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum)
        if self.work is not None:
            self.work.stop()

    def attach(self, work: Workload) -> None:
        """From now on a signal stops ``work`` (at once if one came already)."""
        self.work = work
        if self.received is not None:
            work.stop()


def run(args: argparse.Namespace, log: Callable[[str], None], summary: dict[str, Any]) -> None:
    """The whole driver; fills ``summary`` as it goes (raises DeviceLost, NvmeError)."""
    summary["ok"] = False
    with (
        StopOnSignal() as stop,
        Client(args.socket, client_name="nvme-example", timeout=10.0) as client,
    ):
        ctrl = Controller(client, stall=args.stall, log=log)
        figures = ctrl.figures
        summary["figures"] = figures
        summary["controller"] = ctrl
        try:
            ctrl.enable()
            log(f"controller enabled (NVMe {ctrl.version >> 16}.{ctrl.version >> 8 & 0xFF})")
            ident = ctrl.identify()
            summary["identify"] = ident
            log(f"{ident['model']} serial {ident['serial']}: {ident['ns_bytes']} bytes")
            granted = ctrl.set_queue_count(args.queues)
            queues = min(args.queues, granted)
            entries = min(ctrl.mqes, max(2 * args.depth, 2))
            depth = min(args.depth, entries - 1)
            lba_count = args.lba_count or ident["nsze"] - args.first_lba
            work = Workload(ctrl, first_lba=args.first_lba, lba_count=lba_count)
            summary["workload"] = work
            stop.attach(work)
            started = time.monotonic()
            q1 = bring_up_queues(ctrl, work, queues, entries, depth)
            # --ios more over every queue; those during the creation come on top.
            if args.ios:
                work.finish_after(args.ios)
            stats: dict[str, Any] = dict(client.stats())
            figures.daemon_dma = dict(stats.get("dma", {}))
            log(
                f"I/O running on {queues} queues "
                f"(dma {figures.dma_allocated} bytes in {figures.dma_mappings} mappings, "
                f"{figures.interrupts} interrupts so far)"
            )
            try:
                ctrl.pump(lambda: work.done or bool(work.errors))
                flush: list[Completion] = []
                if not work.errors:
                    ctrl.submit(q1, IO_FLUSH, flush.append, nsid=1)
                    ctrl.pump(lambda: bool(flush))
            finally:
                figures.io_seconds = time.monotonic() - started
            summary["ok"] = not work.errors
            log(f"stopped by {stop.received.name}" if stop.received else "done")
        except DeviceLost:
            ctrl.close(lost=True)
            raise
        except BaseException:
            ctrl.close()
            raise
        ctrl.close()


def _json_summary(summary: dict[str, Any], exit_status: int, error: str | None) -> dict[str, Any]:
    figures: Figures | None = summary.get("figures")
    work: Workload | None = summary.get("workload")
    ctrl: Controller | None = summary.get("controller")
    queues = ctrl.queues if ctrl is not None else {}
    out: dict[str, Any] = {
        "ok": bool(summary.get("ok")) and exit_status == EXIT_OK,
        "exit": exit_status,
        "error": error,
        "identify": summary.get("identify"),
    }
    if figures is not None:
        per_irq = figures.completions / figures.interrupts if figures.interrupts else 0.0
        out |= {
            "ios": figures.ios,
            "reads": figures.reads,
            "writes": figures.writes,
            "blocks_verified": figures.blocks_verified,
            "interrupts": figures.interrupts,
            "irq_notifications": figures.irq_notifications,
            "batches": figures.batches,
            "completions": figures.completions,
            "completions_per_interrupt": round(per_irq, 3),
            "io_seconds": round(figures.io_seconds, 3),
            "iops": round(figures.ios / figures.io_seconds, 1) if figures.io_seconds else 0.0,
            "vectors": {str(v): how for v, how in sorted(figures.vectors.items())},
            "resized": figures.resized,
            "recovered_on_resize": figures.recovered_on_resize,
            "recovered_after_kick": figures.recovered_after_kick,
            "q1_completions_while_creating": figures.q1_completions_while_creating,
            "cqe_rereads": figures.cqe_rereads,
            "signal_delay_ms": {str(q): ms for q, ms in sorted(figures.signal_delay_ms.items())},
            "per_queue": {str(qid): q.completions for qid, q in queues.items() if qid},
            "dma_allocated": figures.dma_allocated,
            "dma_mappings": figures.dma_mappings,
            "daemon_dma": figures.daemon_dma,
        }
    if work is not None:
        out["errors"] = work.errors[:10]
        out["stopped"] = work.stopped
        out["lba_range"] = [work.first_lba, work.next_lba - work.first_lba]
        out["written"] = sorted([lba, gen] for lba, gen in work.gens.items())
    return out


def figure_line(out: dict[str, Any]) -> str:
    """The one line of figures printed at the end."""
    if "ios" not in out:
        return f"nvme: no I/O ({out.get('error')})"
    vectors = ",".join(f"{v}:{how}" for v, how in out["vectors"].items())
    return (
        f"nvme: {out['ios']} I/Os ({out['reads']} reads, {out['writes']} writes, "
        f"{out['blocks_verified']} blocks verified) in {out['io_seconds']}s = "
        f"{out['iops']} IOPS; {out['interrupts']} interrupts, "
        f"{out['completions_per_interrupt']} completions/interrupt; "
        f"vectors {vectors}; {len(out['resized'])} resized, "
        f"{out['recovered_on_resize']} completions found by the rescan on resized, "
        f"{out['recovered_after_kick']} at the kick"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--help``)."""
    parser = argparse.ArgumentParser(
        prog="irqd_nvme.py",
        description=(
            "A userspace NVMe driver over vfio-irqd: enables the controller behind the "
            "daemon's socket, identifies it, creates I/O queue pairs at run time (each on "
            "its own MSI-X vector), and runs checked reads and writes whose completions it "
            "learns of only from the daemon's irq notifications. Needs the drive, dma and "
            "subscribe permissions. Overwrites the LBAs it uses."
        ),
        epilog=(
            "SIGINT or SIGTERM: submit no more I/O, complete and check those in flight, "
            "then flush and disable the controller as at the end of a run. "
            "exit status: 0 every I/O completed and every read matched; 1 an error "
            "(a command failed, data mismatch, or a stall: a lost interrupt); 3 the device "
            "was lost (unbound or removed) while running."
        ),
    )
    parser.add_argument("--socket", required=True, help="the daemon's socket")
    parser.add_argument(
        "--queues", type=int, default=4, help="I/O queue pairs to create (default 4)"
    )
    parser.add_argument("--depth", type=int, default=8, help="I/Os in flight per queue (8)")
    parser.add_argument(
        "--ios",
        type=int,
        default=1000,
        help="I/Os to run once every queue is up, on top of those queue 1 ran meanwhile "
        "(1000); 0: until SIGINT or SIGTERM",
    )
    parser.add_argument(
        "--first-lba", type=int, default=0, help="the first logical block to use (0)"
    )
    parser.add_argument(
        "--lba-count", type=int, default=0, help="blocks the run may use (0: to the end)"
    )
    parser.add_argument(
        "--stall",
        type=float,
        default=5.0,
        help="seconds a queue may wait for an interrupt before the run fails (5)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON summary on stdout (the line to stderr)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the driver; print the figures (and the JSON summary); return the exit status."""
    args = parse_args(argv)
    began = time.monotonic()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"nvme: +{time.monotonic() - began:.3f}s {message}", file=sys.stderr, flush=True)

    summary: dict[str, Any] = {}
    error: str | None = None
    try:
        run(args, log, summary)
        status = EXIT_OK if summary["ok"] else EXIT_FAILED
    except DeviceLost as exc:
        error, status = f"device lost: {exc.reason}", EXIT_DEVICE_LOST
    except (NvmeError, RpcError, ProtocolError, OSError) as exc:
        # RpcError: the daemon refused (e.g. no drive or dma permission); OSError
        # covers a daemon that is not there and one that went away (Disconnected).
        error, status = f"{type(exc).__name__}: {exc}", EXIT_FAILED
    out = _json_summary(summary, status, error)
    if error:
        log(error)
    line = figure_line(out)
    if args.json:
        print(line, file=sys.stderr, flush=True)
        print(json.dumps(out), flush=True)
    else:
        print(line, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
