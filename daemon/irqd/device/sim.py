"""A simulated VFIO PCI device that follows the kernel's rules.

:class:`SimDevice` is the ``Device`` (irqd.device.base) the tests and ``--sim``
run on; it is a facade over parts with one job each:

- irqd.device.sim_irqs: ``GET_IRQ_INFO``/``SET_IRQS`` with the kernel's counts,
  flags, errnos and (non-)transactions, per generation (Linux 6.1 or 6.5+,
  picked by ``noresize``); INTx in irqd.device.sim_intx, MSI and MSI-X in
  irqd.device.sim_msi, the eventfd references in irqd.device.sim_kernel;
- irqd.device.regions: the device fd's regions (BARs, config space), reset;
- irqd.device.iommu: the container's IOMMU and its DMA mappings.

The kernel holds a reference on each assigned eventfd, so closing the caller's
fd does not detach it; the simulation holds its own ``dup`` for the same reason
and closes it on de-assign, disable and ``close()``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import (
    AdoptError,
    Device,
    IrqIndex,
    IrqInfo,
    ResetUnsupportedError,
    SetIrqsData,
    StoredDevice,
)
from .iommu import IommuInfo, SimIommu
from .regions import RegionInfo, SimRegions
from .sim_irqs import SimIrqs
from .sim_kernel import fail

# PCI_MSIX_FLAGS_QSIZE is 11 bits: a table has 1..2048 entries (include/uapi/linux/pci_regs.h).
MSIX_TABLE_MAX = 2048
# MSI advertises 1 << QMASK vectors, QMASK 0..5 (vfio_pci_get_irq_count, vfio_pci_core.c).
MSI_COUNTS = (0, 1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class SetIrqsCall:
    """One ``set_irqs`` call as the simulated device received it, and its outcome."""

    flags: int
    index: int
    start: int
    count: int
    data: tuple[int, ...] | None
    result: int | None = None  # the return value, when it returned
    errno: int | None = None  # the errno, when it raised OSError

    @property
    def ok(self) -> bool:
        """Whether the call returned (rather than raised)."""
        return self.errno is None


class SimDevice(Device):
    """A ``Device`` with the kernel's counts, flags, errnos and (non-)transactions.

    The sim-only methods (``raise_irq``, ``set_intx_line``, ``request_release``,
    ``host_vectors``, ``active_index``, ``calls``) play the hardware and let
    tests look inside; ``assigned_fd`` is the ``Device`` capability behind
    ``sim.eventfds``.
    """

    backend: ClassVar[str] = "sim"

    def __init__(
        self,
        *,
        msix_vectors: int = 64,
        noresize: bool = False,
        msi_vectors: int = 1,
        intx: bool = True,
        pcie: bool = True,
        host_vector_limit: int | None = None,
        name: str = "sim",
        resettable: bool = True,
    ) -> None:
        if not 0 <= msix_vectors <= MSIX_TABLE_MAX:
            raise ValueError(f"MSI-X table size must be 0..{MSIX_TABLE_MAX}: {msix_vectors}")
        if msi_vectors not in MSI_COUNTS:
            raise ValueError(f"MSI vector count must be one of {MSI_COUNTS}: {msi_vectors}")
        self.name = name
        counts = {
            IrqIndex.INTX: 1 if intx else 0,
            IrqIndex.MSI: msi_vectors,
            IrqIndex.MSIX: msix_vectors,
            IrqIndex.ERR: 1 if pcie else 0,
            IrqIndex.REQ: 1,
        }
        self._irqs = SimIrqs(
            counts, noresize=noresize, host_vector_limit=host_vector_limit, pcie=pcie
        )
        self._closed = False
        #: Every set_irqs call, in order, with its result or errno.
        self.calls: list[SetIrqsCall] = []
        # Device access and DMA: the fd's layout is made on first use (a memfd
        # per device is wasted on the many tests that never open it).
        self._resettable = resettable
        self._fd_layout: SimRegions | None = None
        #: The simulated IOMMU of the container (tests inject failures through it).
        self.iommu = SimIommu()
        #: How many times ``reset`` ran.
        self.resets = 0

    @property
    def noresize(self) -> bool:
        """Whether MSI-X reports NORESIZE: the 6.1 rules rather than 6.5+'s."""
        return self._irqs.noresize

    @property
    def host_vector_limit(self) -> int | None:
        """Host vectors the platform can give; ``None``: as many as asked for."""
        return self._irqs.msi.host_vector_limit

    # -- Device ------------------------------------------------------------------

    def irq_info(self, index: IrqIndex) -> IrqInfo:
        """``vfio_pci_ioctl_get_irq_info`` (vfio_pci_core.c, 6.1 and 6.12)."""
        self._check_open()
        return self._irqs.info(IrqIndex(index))

    def set_irqs(
        self, flags: int, index: IrqIndex, start: int, count: int, data: SetIrqsData = None
    ) -> int:
        """``VFIO_DEVICE_SET_IRQS``; every call is appended to ``calls``."""
        frozen = None if data is None else tuple(int(x) for x in data)
        try:
            self._check_open()
            result = self._irqs.set_irqs(flags, int(index), start, count, frozen)
        except OSError as e:
            self.calls.append(SetIrqsCall(flags, int(index), start, count, frozen, errno=e.errno))
            raise
        self.calls.append(SetIrqsCall(flags, int(index), start, count, frozen, result=result))
        return result

    def close(self) -> None:
        """Like the last close of the device file (``vfio_pci_core_disable``): the
        active index is disabled, ERR/REQ triggers dropped. Idempotent."""
        if self._closed:
            return
        self._irqs.close()
        if self._fd_layout is not None:
            self._fd_layout.close()
        self.iommu.mappings.clear()  # the container goes with the last close
        self._closed = True

    # -- device access and DMA memory -------------------------------------------

    def regions(self) -> list[RegionInfo]:
        """BAR0 (16 KiB), BAR2 (8 KiB, MSI-X table hole) and config space (4 KiB);
        see ``irqd.device.regions.SimRegions``."""
        return list(self._layout().regions)

    def device_fd(self) -> int:
        """The memfd laid out like a vfio-pci device fd (borrowed: dup it)."""
        return self._layout().fd

    @property
    def resettable(self) -> bool:
        return self._resettable

    def reset(self) -> None:
        """Like ``vfio_pci_ioctl_reset``: the BARs return to their reset values,
        config space and every assigned vector are kept (the PCI core saves and
        restores the MSI-X state around the reset; vfio keeps its triggers)."""
        self._check_open()
        if not self._resettable:
            raise ResetUnsupportedError(self.name)
        self._layout().reset()
        self.resets += 1

    def iommu_info(self) -> IommuInfo:
        """What QEMU's emulated Intel IOMMU reports (``irqd.device.iommu.SIM_IOMMU_INFO``)."""
        self._check_open()
        return self.iommu.info()

    def dma_map(self, vaddr: int, iova: int, size: int) -> None:
        """``vfio_dma_do_map`` as ``SimIommu`` models it."""
        self._check_open()
        self.iommu.map(vaddr, iova, size)

    def dma_unmap(self, iova: int, size: int) -> int:
        """``vfio_dma_do_unmap`` as ``SimIommu`` models it."""
        self._check_open()
        return self.iommu.unmap(iova, size)

    def _layout(self) -> SimRegions:
        self._check_open()
        if self._fd_layout is None:
            self._fd_layout = SimRegions(msix_vectors=self._irqs.counts[IrqIndex.MSIX])
        return self._fd_layout

    # -- sim-only: the hardware side ---------------------------------------------

    def raise_irq(self, index: IrqIndex, vector: int, n: int = 1) -> None:
        """The device raises an interrupt ``n`` times (INTx: asserts the line).

        MSI/MSI-X: delivered to the assigned eventfd; an allocated but de-assigned
        MSI-X vector latches it (delivered once on re-assignment); otherwise, or
        while the index is disabled, it is lost. ERR: the AER handler signals the
        ERR eventfd. REQ: see ``request_release``.
        """
        index = IrqIndex(index)
        if not 0 <= vector < self._irqs.counts[index]:
            raise ValueError(f"{index.wire_name} has no vector {vector}")
        if n < 1:
            raise ValueError(f"n must be positive: {n}")
        self._irqs.raise_irq(index, vector, n)

    def set_intx_line(self, asserted: bool) -> None:
        """Drive the level-triggered INTx line; an unmasked assertion fires."""
        self._irqs.intx.drive(asserted)

    def request_release(self) -> None:
        """The kernel asks for the device back (``vfio_pci_core_request``): signals REQ."""
        self._irqs.request_release()

    # -- sim-only: looking inside ------------------------------------------------

    def assigned_fd(self, index: IrqIndex, vector: int) -> int | None:
        """The sim's own dup of the eventfd assigned to a vector: the one the
        "hardware" writes. ``None`` when nothing is assigned."""
        return self._irqs.assigned_fd(IrqIndex(index), vector)

    def host_vectors(self, index: IrqIndex) -> int:
        """Host vectors allocated for ``index`` (INTx: its one line while enabled)."""
        return self._irqs.host_vectors(IrqIndex(index))

    def active_index(self) -> IrqIndex | None:
        """The enabled one of INTx, MSI, MSI-X (``vdev->irq_type``), if any."""
        return self._irqs.active

    @property
    def intx_masked(self) -> bool:
        """Whether the INTx line is masked."""
        return self._irqs.intx.masked

    # -- restart without disarming (irqd.process.fdstore) --------------------------------

    def handover_fds(self) -> dict[str, int]:
        """None: the sim lives inside the process (its eventfds are the vector table's)."""
        self._check_open()
        return {}

    @classmethod
    def adopt_stored(cls, stored: StoredDevice, fresh: Callable[[], Device]) -> SimDevice:
        """A new sim (``fresh``, shaped by this process's config) that takes the stored
        state over, with the carried eventfds of the index that was active."""
        for fd in stored.fds.values():  # a sim stores none; anything else is not ours
            os.close(fd)
        stored.fds = {}
        if stored.configured is not None or stored.state is None:
            raise AdoptError("the stored state is of the simulated device, not a real one")
        device = fresh()
        if not isinstance(device, cls):
            device.close()
            raise AdoptError("the stored state is of the simulated device, not a real one")
        active = stored.state["active"]
        eventfds = {
            vector: fd
            for (index, vector), fd in stored.eventfds.items()
            if active is not None and index == active
        }
        try:
            device.import_state(stored.state, eventfds)
        except BaseException:
            device.close()
            raise
        return device

    def export_state(self) -> dict[str, Any]:
        """What the "hardware" holds, as msgpack-able data, for a new daemon process.

        The sim lives inside the daemon, so a new process starts a fresh one;
        this is what it needs to be the same device. The assigned eventfds are
        not in it: they are the vector table's eventfds (each trigger is a dup
        of one), which travel through the fd store anyway, so ``import_state``
        takes them from there. The ERR/REQ triggers are not in it either: the
        daemon carries its own REQ/ERR eventfds and assigns them again.
        """
        return self._irqs.export_state()

    def import_state(self, state: Mapping[str, Any], eventfds: Mapping[int, int]) -> None:
        """Become the device ``export_state`` described; ``eventfds`` maps each
        assigned vector of the active index to its eventfd (dup'ed here, as the
        kernel takes its own reference). Raises ``ValueError`` if one is missing."""
        self._check_open()
        self._irqs.import_state(state, eventfds)

    def _check_open(self) -> None:
        if self._closed:
            raise fail(errno.EBADF)

    def __repr__(self) -> str:
        kind = "noresize" if self.noresize else "dynamic"
        return f"<SimDevice {self.name} msix={self._irqs.counts[IrqIndex.MSIX]} {kind}>"
