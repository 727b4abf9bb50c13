"""The simulated device's interrupts: ``VFIO_DEVICE_GET_IRQ_INFO`` and
``VFIO_DEVICE_SET_IRQS`` with the kernel's counts, flags, errnos and (non-)transactions.

Every rule is the kernel's, with the function it comes from; where Linux 6.1
and 6.5+ differ, ``noresize`` picks the generation (irqd.device.sim_msi).
INTx is irqd.device.sim_intx, MSI and MSI-X irqd.device.sim_msi; ERR and REQ
(one eventfd each) are here. All share ``vfio_set_irqs_validate_and_prepare``
(``drivers/vfio/vfio_main.c``) and the dispatch in ``vfio_pci_set_irqs_ioctl``
(``drivers/vfio/pci/vfio_pci_intrs.c``), which are here too.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any

from .base import (
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
    IrqIndex,
    IrqInfo,
)
from .sim_intx import SimIntx
from .sim_kernel import fail, get_eventfd, put, signal
from .sim_msi import SimMsi

U32_MAX = 2**32 - 1

_MSI_INDEXES = (IrqIndex.MSI, IrqIndex.MSIX)


class SimCtxTrigger:
    """ERR or REQ: one eventfd (``vfio_pci_set_ctx_trigger_single``)."""

    def __init__(self) -> None:
        #: The sim's dup of the assigned eventfd.
        self.fd: int | None = None

    def set(self, count: int, dtype: int, data: tuple[int, ...] | None, noresize: bool) -> int:
        """``vfio_pci_set_err_trigger`` / ``_req_trigger``."""
        # start == 0 and count <= 1 are already implied by num_irqs == 1.
        current = self.fd
        if dtype == VFIO_IRQ_SET_DATA_NONE:
            if current is None:
                raise fail(errno.EINVAL)  # falls out of the if-chain
            if count:
                signal(current, 1)
                return 0
            put(current)
            new: int | None = None
        elif count == 0:
            raise fail(errno.EINVAL)
        elif dtype == VFIO_IRQ_SET_DATA_BOOL:
            assert data is not None
            if data[0]:
                signal(current, 1)
            return 0
        else:
            assert data is not None
            fd = data[0]
            if fd == -1:
                put(current)
                new = None
            elif fd >= 0:
                new = get_eventfd(fd)
                put(current)
            elif noresize:
                return 0  # 6.1: fd < -1 is ignored (only -1 clears)
            else:
                # 6.12 (seen under QEMU): fd < -1 is EINVAL, nothing changes.
                raise fail(errno.EINVAL)
        self.fd = new
        return 0

    def drop(self) -> None:
        """The device file's last close drops the trigger."""
        put(self.fd)
        self.fd = None


class SimIrqs:
    """Every IRQ index of a simulated device, and the one ioctl that sets them."""

    def __init__(
        self,
        counts: Mapping[IrqIndex, int],
        *,
        noresize: bool,
        host_vector_limit: int | None,
        pcie: bool,
    ) -> None:
        self.counts = dict(counts)
        self.noresize = noresize
        self.pcie = pcie
        self.intx = SimIntx()
        self.msi = SimMsi(noresize=noresize, host_vector_limit=host_vector_limit)
        self.err = SimCtxTrigger()
        self.req = SimCtxTrigger()

    @property
    def active(self) -> IrqIndex | None:
        """The enabled one of INTx, MSI, MSI-X (``vdev->irq_type``), if any."""
        return IrqIndex.INTX if self.intx.enabled else self.msi.active

    def info(self, index: IrqIndex) -> IrqInfo:
        """``vfio_pci_ioctl_get_irq_info`` (vfio_pci_core.c, 6.1 and 6.12)."""
        # ERR exists only on PCIe; otherwise the ioctl itself fails.
        if index is IrqIndex.ERR and not self.pcie:
            raise fail(errno.EINVAL)
        flags = VFIO_IRQ_INFO_EVENTFD
        if index is IrqIndex.INTX:
            flags |= VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
        elif index is not IrqIndex.MSIX or self.noresize:
            # 6.5+: `info.index != MSIX || !vdev->has_dyn_msix`; 6.1: every non-INTx index.
            flags |= VFIO_IRQ_INFO_NORESIZE
        return IrqInfo(index=index, flags=flags, count=self.counts[index])

    def set_irqs(
        self, flags: int, raw_index: int, start: int, count: int, data: tuple[int, ...] | None
    ) -> int:
        """``VFIO_DEVICE_SET_IRQS``: validate, then the handler the index and action pick."""
        # vfio_set_irqs_validate_and_prepare (drivers/vfio/vfio_main.c, 6.1 and 6.12).
        if (
            flags & ~(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK)
            or not 0 <= raw_index < len(IrqIndex)
            or not 0 <= start <= U32_MAX
            or not 0 <= count <= U32_MAX
            or count >= U32_MAX - start
        ):
            raise fail(errno.EINVAL)
        index = IrqIndex(raw_index)
        num_irqs = self.counts[index]
        if start >= num_irqs or start + count > num_irqs:
            raise fail(errno.EINVAL)
        dtype = flags & VFIO_IRQ_SET_DATA_TYPE_MASK
        if dtype not in (VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD):
            raise fail(errno.EINVAL)
        if dtype != VFIO_IRQ_SET_DATA_NONE and (data is None or len(data) < count):
            raise fail(errno.EINVAL)  # argsz shorter than count entries
        if dtype == VFIO_IRQ_SET_DATA_BOOL:
            assert data is not None
            data = tuple(int(b & 0xFF != 0) for b in data)  # uint8_t each
        return self._dispatch(
            flags & VFIO_IRQ_SET_ACTION_TYPE_MASK,
            index,
            start=start,
            count=count,
            dtype=dtype,
            data=data,
        )

    def _dispatch(
        self,
        action: int,
        index: IrqIndex,
        *,
        start: int,
        count: int,
        dtype: int,
        data: tuple[int, ...] | None,
    ) -> int:
        # vfio_pci_set_irqs_ioctl: the action picks the handler; none (or several
        # actions at once, or mask/unmask on MSI/MSI-X/ERR/REQ) is ENOTTY.
        if index is IrqIndex.INTX:
            if action == VFIO_IRQ_SET_ACTION_MASK:
                return self.intx.mask(start, count, dtype, data)
            if action == VFIO_IRQ_SET_ACTION_UNMASK:
                return self.intx.unmask(start, count, dtype, data)
            if action == VFIO_IRQ_SET_ACTION_TRIGGER:
                other = self.msi.active is not None
                return self.intx.set_trigger(start, count, dtype, data, other_active=other)
        elif index in _MSI_INDEXES:
            if action == VFIO_IRQ_SET_ACTION_TRIGGER:
                other = self.intx.enabled
                return self.msi.set_trigger(index, start, count, dtype, data, other_active=other)
        elif action == VFIO_IRQ_SET_ACTION_TRIGGER:
            # ERR is dispatched only on PCIe; without it num_irqs is 0 and the
            # range check above has already failed.
            single = self.err if index is IrqIndex.ERR else self.req
            return single.set(count, dtype, data, self.noresize)
        raise fail(errno.ENOTTY)

    # -- the hardware side ------------------------------------------------------

    def raise_irq(self, index: IrqIndex, vector: int, n: int) -> None:
        """The device raises an interrupt ``n`` times (see ``SimDevice.raise_irq``)."""
        if index is IrqIndex.INTX:
            self.intx.drive(True)
        elif index is IrqIndex.ERR:
            # vfio_pci_aer_err_detected: signals err_trigger if set.
            signal(self.err.fd, n)
        elif index is IrqIndex.REQ:
            for _ in range(n):
                self.request_release()
        else:
            self.msi.raise_irq(index, vector, n)

    def request_release(self) -> None:
        """The kernel asks for the device back (``vfio_pci_core_request``): signals REQ."""
        signal(self.req.fd, 1)

    # -- looking inside -----------------------------------------------------------

    def assigned_fd(self, index: IrqIndex, vector: int) -> int | None:
        """The sim's own dup of the eventfd assigned to a vector, or ``None``."""
        if index is IrqIndex.ERR:
            return self.err.fd if vector == 0 else None
        if index is IrqIndex.REQ:
            return self.req.fd if vector == 0 else None
        if index is IrqIndex.INTX:
            return self.intx.trigger if self.intx.enabled and vector == 0 else None
        return self.msi.triggers.get(vector) if self.msi.active is index else None

    def host_vectors(self, index: IrqIndex) -> int:
        """Host vectors allocated for ``index`` (INTx: its one line while enabled)."""
        if self.active is not index:
            return 0
        return 1 if index is IrqIndex.INTX else len(self.msi.host)

    def close(self) -> None:
        """The device file's last close (``vfio_pci_core_disable``): the active index
        is disabled, ERR/REQ triggers dropped."""
        if self.intx.enabled:
            self.intx.disable()
        elif self.msi.active is not None:
            self.msi.disable()
        self.err.drop()
        self.req.drop()

    # -- a new daemon process (irqd.process.fdstore) ------------------------------

    def export_state(self) -> dict[str, Any]:
        """What the "hardware" holds, without the eventfds (``SimDevice.export_state``)."""
        intx, msi = self.intx, self.msi
        intx_assigned = [] if intx.trigger is None else [0]
        assigned = intx_assigned if intx.enabled else sorted(msi.triggers)
        active = self.active
        return {
            "active": None if active is None else int(active),
            "num_ctx": msi.num_ctx,
            "host": sorted(msi.host),
            "assigned": assigned,
            "latched": sorted(msi.latched),
            "intx_masked": intx.masked,
            "intx_line": intx.line,
        }

    def import_state(self, state: Mapping[str, Any], eventfds: Mapping[int, int]) -> None:
        """Become what ``export_state`` described; ``eventfds`` maps each assigned
        vector to its eventfd (dup'ed here). ``ValueError`` if one is missing."""
        assigned = [int(v) for v in state["assigned"]]
        missing = [v for v in assigned if v not in eventfds]
        if missing:
            raise ValueError(f"no eventfd for assigned vectors {missing}")
        active = None if state["active"] is None else IrqIndex(state["active"])
        intx, msi = self.intx, self.msi
        intx.enabled = active is IrqIndex.INTX
        msi.active = active if active in _MSI_INDEXES else None
        msi.num_ctx = int(state["num_ctx"])
        msi.host = {int(v) for v in state["host"]}
        msi.latched = {int(v) for v in state["latched"]}
        intx.masked = bool(state["intx_masked"])
        intx.line = bool(state["intx_line"])
        for vector in assigned:
            fd = get_eventfd(eventfds[vector])
            if intx.enabled:
                put(intx.trigger)
                intx.trigger = fd
            else:
                put(msi.triggers.pop(vector, None))
                msi.triggers[vector] = fd
