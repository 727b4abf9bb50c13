"""DMA memory for clients (``dma.*``): buffers mapped in the IOMMU, accounted per client.

``dma.alloc`` / ``dma.free``: sealed memfds (irqd.device.dma), mapped in the
daemon and in the container's IOMMU at an IOVA from the usable ranges
(permission ``dma``), accounted per client and in total, and unmapped when the
client leaves. Every failure undoes what was done before it: no IOVA stays
reserved, no memory mapped, nothing left in the IOMMU.

Everything runs synchronously on the Trio thread, like the vector table.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from irqd.device.base import Device
from irqd.device.dma import HUGE_PAGE_SIZE, DmaMemory, IovaAllocator, IovaError
from irqd.device.iommu import IommuInfo
from irqd.errors import E2BIG, EINVAL, EIO, ENOSPC, IrqdError, device_error
from irqd.limits import ServerLimits
from irqd.server.device_access import Client
from irqproto.methods import DmaAllocParams

__all__ = ["Allocation", "DmaAccounts"]

log = structlog.get_logger("irqd.server.broker")


@dataclass
class Allocation:
    """One DMA buffer: its memory, where the device sees it, and whose it is."""

    id: int
    owner: int
    iova: int
    size: int
    name: str | None
    #: The daemon's own mapping; ``None`` for a buffer taken over from a previous
    #: daemon process (the kernel keeps the pages pinned; only MAP_DMA needed it).
    memory: DmaMemory | None
    hugepages: bool = False

    def to_wire(self) -> dict[str, Any]:
        """The ``dma.alloc`` result (the memfd travels beside it)."""
        result: dict[str, Any] = {
            "id": self.id,
            "iova": self.iova,
            "size": self.size,
            "hugepages": self.hugepages,
        }
        if self.name is not None:
            result["name"] = self.name
        return result


class DmaAccounts:
    """The clients' DMA buffers: allocated, mapped, counted, unmapped."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._ids = itertools.count(1)
        #: Live allocations by id.
        self._allocations: dict[int, Allocation] = {}
        #: Allocations whose unmap the kernel refused: still mapped, still counted,
        #: their IOVA still reserved, never given out again.
        self._stuck: list[Allocation] = []
        self._iommu: IommuInfo | None = None
        self._iovas: IovaAllocator | None = None

    def iommu(self) -> IommuInfo:
        """The container's IOMMU, read once (page sizes and ranges do not change)."""
        if self._iommu is None:
            try:
                info = self.device.iommu_info()
            except OSError as exc:
                raise device_error(exc, "VFIO_IOMMU_GET_INFO") from exc
            page = max(info.page_size, os.sysconf("SC_PAGE_SIZE"))
            self._iovas = IovaAllocator(info.ranges, page)
            self._iommu = info
        return self._iommu

    def _allocator(self) -> IovaAllocator:
        self.iommu()
        assert self._iovas is not None
        return self._iovas

    def alloc(
        self, client: Client, params: DmaAllocParams, limits: ServerLimits
    ) -> tuple[dict[str, Any], int]:
        """``dma.alloc``: the result and the memfd (the caller's to send and close)."""
        iovas = self._allocator()
        size = params.size
        page = iovas.page_size
        if size == 0:
            raise IrqdError(EINVAL, "params[0]: a DMA buffer needs a size (got 0)")
        if size % page:
            raise IrqdError(
                EINVAL, f"params[0]: size {size:#x} is not a multiple of the page size {page:#x}"
            )
        self._check_limits(client, size, limits)
        huge = params.hugepages and size % HUGE_PAGE_SIZE == 0
        try:
            if params.iova is not None:
                iova = iovas.reserve(params.iova, size, iova_max=params.iova_max)
            else:
                align = HUGE_PAGE_SIZE if huge else page
                iova = iovas.allocate(size, align=align, iova_max=params.iova_max)
        except IovaError as exc:
            raise IrqdError(EINVAL, f"params[1]: {exc}") from None
        try:
            memory = self._memory(size, params)
        except BaseException:
            iovas.release(iova, size)
            raise
        try:
            self.device.dma_map(memory.vaddr, iova, size)
        except OSError as exc:
            memory.close()
            iovas.release(iova, size)
            raise _map_error(exc, iova, size) from exc
        except BaseException:
            # Not the kernel's refusal (e.g. cancelled): whether it mapped is
            # unknown, so unmap to be sure before giving the IOVA back.
            with contextlib.suppress(OSError):
                self.device.dma_unmap(iova, size)
            memory.close()
            iovas.release(iova, size)
            raise
        allocation = Allocation(
            next(self._ids), client.id, iova, size, params.name, memory, memory.hugepages
        )
        self._allocations[allocation.id] = allocation
        log.info(
            "dma.mapped",
            client=client.id,
            pid=client.peer.pid,
            id=allocation.id,
            iova=hex(iova),
            size=size,
            name=params.name,
            hugepages=memory.hugepages,
        )
        return allocation.to_wire(), memory.take_fd()

    def _check_limits(self, client: Client, size: int, limits: ServerLimits) -> None:
        held = [a for a in self._allocations.values() if a.owner == client.id]
        held_bytes = sum(a.size for a in held)
        if held_bytes + size > limits.dma_client_bytes:
            raise IrqdError(
                E2BIG,
                f"{size:#x} more bytes of DMA memory would exceed this client's limit "
                f"(dma_client_bytes = {limits.dma_client_bytes}; it holds {held_bytes})",
            )
        if len(held) >= limits.dma_client_mappings:
            raise IrqdError(
                E2BIG,
                f"this client holds {len(held)} DMA buffers, the limit "
                f"(dma_client_mappings = {limits.dma_client_mappings})",
            )
        total = self.total_bytes()
        if total + size > limits.dma_total_bytes:
            raise IrqdError(
                ENOSPC,
                f"{size:#x} more bytes of DMA memory would exceed the daemon's limit "
                f"(dma_total_bytes = {limits.dma_total_bytes}; {total} in use)",
            )

    @staticmethod
    def _memory(size: int, params: DmaAllocParams) -> DmaMemory:
        name = f"irqd-dma:{params.name}" if params.name else "irqd-dma"
        try:
            return DmaMemory(size, name=name, hugepages=params.hugepages)
        except OSError as exc:
            short = exc.errno in (errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOSPC)
            raise IrqdError(
                ENOSPC if short else EIO, f"cannot create {size:#x} bytes of DMA memory: {exc}"
            ) from exc

    def free(self, client: Client, allocation_id: int) -> None:
        """``dma.free``: unmap from the IOMMU, then drop the daemon's mapping."""
        allocation = self._allocations.get(allocation_id)
        if allocation is None or allocation.owner != client.id:
            raise IrqdError(EINVAL, f"params[0]: this client has no DMA buffer {allocation_id}")
        self._unmap(allocation)

    def release(self, client: Client) -> int:
        """Free every buffer of a client that left; returns the bytes released.

        Called where the daemon drops a session's vectors. A driver must stop
        its device's DMA before it exits: after this the IOVAs lead nowhere
        (the IOMMU faults the device's accesses) and may be given to others.
        """
        mine = [a for a in self._allocations.values() if a.owner == client.id]
        released = 0
        for allocation in mine:
            with contextlib.suppress(IrqdError):
                self._unmap(allocation)
                released += allocation.size
        if mine:
            log.info("dma.released", client=client.id, buffers=len(mine), bytes=released)
        return released

    def release_all(self) -> None:
        """Unmap every buffer (the device is going away or the daemon stops)."""
        for allocation in list(self._allocations.values()):
            with contextlib.suppress(IrqdError):
                self._unmap(allocation)

    def _unmap(self, allocation: Allocation) -> None:
        try:
            self.device.dma_unmap(allocation.iova, allocation.size)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                # The daemon closed the device (it was lost): the kernel unmaps and
                # unpins everything when the container goes, which the last
                # holder of a device fd decides. Only the daemon's side is left.
                self._forget(allocation)
                return
            # Still mapped: keep the memory, the accounting and the IOVA.
            log.error(
                "dma.unmap_failed",
                id=allocation.id,
                iova=hex(allocation.iova),
                size=allocation.size,
                error=str(exc),
            )
            self._allocations.pop(allocation.id, None)
            self._stuck.append(allocation)
            raise IrqdError(
                EIO, f"VFIO_IOMMU_UNMAP_DMA of buffer {allocation.id} failed: {exc.strerror}"
            ) from exc
        self._forget(allocation)
        log.info("dma.unmapped", id=allocation.id, iova=hex(allocation.iova), size=allocation.size)

    def _forget(self, allocation: Allocation) -> None:
        del self._allocations[allocation.id]
        if allocation.memory is not None:
            allocation.memory.close()
        if self._iovas is not None:
            self._iovas.release(allocation.iova, allocation.size)

    # -- restart without disarming (irqd.process.fdstore) ----------------------------

    def export_state(self) -> list[dict[str, Any]]:
        """Every buffer still mapped in the container, for the next daemon process.

        The container (and so every IOMMU mapping) survives a hand-over with
        the device's fds; the next process must know the buffers to keep their
        IOVAs reserved, count them and unmap them when their owner leaves.
        """
        return [
            {
                "id": a.id,
                "owner": a.owner,
                "iova": a.iova,
                "size": a.size,
                "name": a.name,
                "hugepages": a.hugepages,
                "stuck": stuck,
            }
            for stuck, allocations in ((False, self._allocations.values()), (True, self._stuck))
            for a in allocations
        ]

    def import_state(self, state: Sequence[dict[str, Any]]) -> None:
        """Take over the buffers ``export_state`` listed (owners keep their session ids).

        Their IOVAs are reserved again; the daemon has no mapping of their
        memory any more (the kernel keeps the pages pinned), which it needs
        only for ``MAP_DMA``.
        """
        iovas = self._allocator()
        last = 0
        for item in state:
            allocation = Allocation(
                int(item["id"]),
                int(item["owner"]),
                int(item["iova"]),
                int(item["size"]),
                item.get("name"),
                None,
                bool(item.get("hugepages", False)),
            )
            try:
                iovas.reserve(allocation.iova, allocation.size)
            except IovaError as exc:
                log.error("dma.adopt_conflict", id=allocation.id, error=str(exc))
            if item.get("stuck"):
                self._stuck.append(allocation)
            else:
                self._allocations[allocation.id] = allocation
            last = max(last, allocation.id)
        self._ids = itertools.count(max(last + 1, next(self._ids)))

    # -- figures -------------------------------------------------------------------

    def total_bytes(self) -> int:
        """Bytes mapped for DMA, every client together (stuck mappings included)."""
        return sum(a.size for a in self._allocations.values()) + sum(a.size for a in self._stuck)

    def totals(self) -> dict[str, int]:
        """``stats`` ``dma``: ``{"bytes", "mappings"}`` of every client together."""
        return {
            "bytes": self.total_bytes(),
            "mappings": len(self._allocations) + len(self._stuck),
        }

    def client_bytes(self, client: Client) -> int:
        """Bytes of DMA memory ``client`` holds (``stats`` per-client ``dma_bytes``)."""
        return sum(a.size for a in self._allocations.values() if a.owner == client.id)

    def allocations(self) -> list[Allocation]:
        """Every live allocation, by id."""
        return [self._allocations[i] for i in sorted(self._allocations)]


def _map_error(exc: OSError, iova: int, size: int) -> IrqdError:
    """The client's error for a ``VFIO_IOMMU_MAP_DMA`` the kernel refused."""
    where = f"{iova:#x}-{iova + size - 1:#x}"
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return IrqdError(ENOSPC, f"the kernel allows no more DMA mappings ({reason})")
    hint = ""
    if exc.errno == errno.ENOMEM:
        hint = (
            "; the pinned pages exceed the daemon's RLIMIT_MEMLOCK "
            f"({_memlock()}): raise LimitMEMLOCK= in the unit"
        )
    return IrqdError(EIO, f"the kernel refused VFIO_IOMMU_MAP_DMA at {where}: {reason}{hint}")


def _memlock() -> str:
    import resource  # noqa: PLC0415  only on this error path

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
