"""A simulated VFIO PCI device that follows the kernel's interrupt rules.

Every rule below is the kernel's, with the function it comes from; where
Linux 6.1 and 6.5+ differ, ``noresize`` picks the generation:

- ``noresize=True`` models 6.1 (``drivers/vfio/pci/vfio_pci_intrs.c`` before
  the 6.5 dynamic MSI-X series): a fixed ``ctx`` array of ``num_ctx`` vectors,
  allocated when the index is enabled; ``vfio_msi_set_block`` rejects a range
  outside it with EINVAL before touching anything, and so does the loopback
  trigger.
- ``noresize=False`` models 6.5+ (checked against 6.12): an xarray of contexts,
  no range check in ``vfio_msi_set_block``; an MSI-X vector with no host vector
  yet gets one from ``vfio_msi_alloc_irq`` (``pci_msix_alloc_irq_at``); MSI
  (never dynamic) fails that vector with EINVAL.

Both share ``vfio_set_irqs_validate_and_prepare`` (``drivers/vfio/vfio_main.c``)
and the dispatch in ``vfio_pci_set_irqs_ioctl``. INTx follows the persistent
handler of 6.9+ ("vfio/pci: Create persistent INTx handler", also in 6.1.y
stable): the new eventfd is looked up before the old one is dropped, and the
handler masks the line even when no eventfd is assigned.

The kernel holds a reference on each assigned eventfd, so closing the caller's
fd does not detach it; the simulation holds its own ``dup`` for the same reason
and closes it on de-assign, disable and ``close()``.

Not modelled: ``DATA_EVENTFD|ACTION_UNMASK`` on INTx (the kernel's virqfd that
unmasks when an eventfd is written) raises ``NotImplementedError``; the
config-space INTx disable bit (``virq_disabled``).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from irqd.eventfd import is_eventfd

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
    Device,
    IrqIndex,
    IrqInfo,
    SetIrqsData,
)

U32_MAX = 2**32 - 1

# PCI_MSIX_FLAGS_QSIZE is 11 bits: a table has 1..2048 entries (include/uapi/linux/pci_regs.h).
MSIX_TABLE_MAX = 2048
# MSI advertises 1 << QMASK vectors, QMASK 0..5 (vfio_pci_get_irq_count, vfio_pci_core.c).
MSI_COUNTS = (0, 1, 2, 4, 8, 16, 32)

_MSI_INDEXES = (IrqIndex.MSI, IrqIndex.MSIX)


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


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
        return self.errno is None


class SimDevice(Device):
    """A ``Device`` with the kernel's counts, flags, errnos and (non-)transactions.

    The sim-only methods (``raise_irq``, ``set_intx_line``, ``request_release``,
    ``assigned_fd``, ``host_vectors``, ``active_index``, ``calls``) play the
    hardware and let tests look inside.
    """

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
    ) -> None:
        if not 0 <= msix_vectors <= MSIX_TABLE_MAX:
            raise ValueError(f"MSI-X table size must be 0..{MSIX_TABLE_MAX}: {msix_vectors}")
        if msi_vectors not in MSI_COUNTS:
            raise ValueError(f"MSI vector count must be one of {MSI_COUNTS}: {msi_vectors}")
        self.name = name
        self.noresize = noresize
        self.host_vector_limit = host_vector_limit
        self._counts = {
            IrqIndex.INTX: 1 if intx else 0,
            IrqIndex.MSI: msi_vectors,
            IrqIndex.MSIX: msix_vectors,
            IrqIndex.ERR: 1 if pcie else 0,
            IrqIndex.REQ: 1,
        }
        self._pcie = pcie
        self._closed = False
        # The active one of INTx/MSI/MSI-X (vdev->irq_type), its host vectors and
        # the sim's dups of the assigned eventfds, by vector.
        self._active: IrqIndex | None = None
        self._num_ctx = 0  # 6.1: size of the ctx array fixed at enable
        self._host: set[int] = set()
        self._triggers: dict[int, int] = {}
        # MSI-X vectors raised while allocated but de-assigned: the entry is masked,
        # the device sets its pending bit and delivers once when unmasked again
        # (vm-notes.md, seen on both kernels).
        self._latched: set[int] = set()
        self._intx_masked = False
        self._intx_line = False
        self._err: int | None = None
        self._req: int | None = None
        #: Every set_irqs call, in order, with its result or errno.
        self.calls: list[SetIrqsCall] = []

    # -- Device ------------------------------------------------------------------

    def irq_info(self, index: IrqIndex) -> IrqInfo:
        """``vfio_pci_ioctl_get_irq_info`` (vfio_pci_core.c, 6.1 and 6.12)."""
        self._check_open()
        index = IrqIndex(index)
        # ERR exists only on PCIe; otherwise the ioctl itself fails.
        if index is IrqIndex.ERR and not self._pcie:
            raise _fail(errno.EINVAL)
        flags = VFIO_IRQ_INFO_EVENTFD
        if index is IrqIndex.INTX:
            flags |= VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
        elif index is not IrqIndex.MSIX or self.noresize:
            # 6.5+: `info.index != MSIX || !vdev->has_dyn_msix`; 6.1: every non-INTx index.
            flags |= VFIO_IRQ_INFO_NORESIZE
        return IrqInfo(index=index, flags=flags, count=self._counts[index])

    def set_irqs(
        self, flags: int, index: IrqIndex, start: int, count: int, data: SetIrqsData = None
    ) -> int:
        """``VFIO_DEVICE_SET_IRQS``; every call is appended to ``calls``."""
        frozen = None if data is None else tuple(int(x) for x in data)
        try:
            result = self._set_irqs(flags, int(index), start, count, frozen)
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
        if self._active is IrqIndex.INTX:
            self._intx_disable()
        elif self._active is not None:
            self._msi_disable()
        self._err = self._put(self._err)
        self._req = self._put(self._req)
        self._closed = True

    # -- sim-only: the hardware side ---------------------------------------------

    def raise_irq(self, index: IrqIndex, vector: int, n: int = 1) -> None:
        """The device raises an interrupt ``n`` times (INTx: asserts the line).

        MSI/MSI-X: delivered to the assigned eventfd; an allocated but de-assigned
        MSI-X vector latches it (delivered once on re-assignment); otherwise, or
        while the index is disabled, it is lost. ERR: the AER handler signals the
        ERR eventfd. REQ: see ``request_release``.
        """
        index = IrqIndex(index)
        if not 0 <= vector < self._counts[index]:
            raise ValueError(f"{index.wire_name} has no vector {vector}")
        if n < 1:
            raise ValueError(f"n must be positive: {n}")
        if index is IrqIndex.INTX:
            self.set_intx_line(True)
        elif index is IrqIndex.ERR:
            # vfio_pci_aer_err_detected: signals err_trigger if set.
            self._signal(self._err, n)
        elif index is IrqIndex.REQ:
            for _ in range(n):
                self.request_release()
        elif self._active is index:
            fd = self._triggers.get(vector)
            if fd is not None:
                self._signal(fd, n)
            elif index is IrqIndex.MSIX and vector in self._host:
                self._latched.add(vector)

    def set_intx_line(self, asserted: bool) -> None:
        """Drive the level-triggered INTx line; an unmasked assertion fires."""
        self._intx_line = asserted
        self._intx_maybe_fire()

    def request_release(self) -> None:
        """The kernel asks for the device back (``vfio_pci_core_request``): signals REQ."""
        self._signal(self._req, 1)

    # -- sim-only: looking inside ------------------------------------------------

    def assigned_fd(self, index: IrqIndex, vector: int) -> int | None:
        """The sim's own dup of the eventfd assigned to a vector: the one the
        "hardware" writes. ``None`` when nothing is assigned."""
        index = IrqIndex(index)
        if index is IrqIndex.ERR:
            return self._err if vector == 0 else None
        if index is IrqIndex.REQ:
            return self._req if vector == 0 else None
        return self._triggers.get(vector) if self._active is index else None

    def host_vectors(self, index: IrqIndex) -> int:
        """Host vectors allocated for ``index`` (INTx: its one line while enabled)."""
        if self._active is not IrqIndex(index):
            return 0
        return 1 if index is IrqIndex.INTX else len(self._host)

    def active_index(self) -> IrqIndex | None:
        """The enabled one of INTx, MSI, MSI-X (``vdev->irq_type``), if any."""
        return self._active

    @property
    def intx_masked(self) -> bool:
        return self._intx_masked

    # -- sim-only: restart without disarming (irqd.process.fdstore) ----------------------

    def export_state(self) -> dict[str, Any]:
        """What the "hardware" holds, as msgpack-able data, for a new daemon process.

        The sim lives inside the daemon, so a new process starts a fresh one;
        this is what it needs to be the same device. The assigned eventfds are
        not in it: they are the vector table's eventfds (each trigger is a dup
        of one), which travel through the fd store anyway, so ``import_state``
        takes them from there. The ERR/REQ triggers are not in it either: the
        daemon carries its own REQ/ERR eventfds and assigns them again.
        """
        return {
            "active": None if self._active is None else int(self._active),
            "num_ctx": self._num_ctx,
            "host": sorted(self._host),
            "assigned": sorted(self._triggers),
            "latched": sorted(self._latched),
            "intx_masked": self._intx_masked,
            "intx_line": self._intx_line,
        }

    def import_state(self, state: dict[str, Any], eventfds: dict[int, int]) -> None:
        """Become the device ``export_state`` described; ``eventfds`` maps each
        assigned vector of the active index to its eventfd (dup'ed here, as the
        kernel takes its own reference). Raises ``ValueError`` if one is missing."""
        self._check_open()
        assigned = [int(v) for v in state["assigned"]]
        missing = [v for v in assigned if v not in eventfds]
        if missing:
            raise ValueError(f"no eventfd for assigned vectors {missing}")
        self._active = None if state["active"] is None else IrqIndex(state["active"])
        self._num_ctx = int(state["num_ctx"])
        self._host = {int(v) for v in state["host"]}
        self._latched = {int(v) for v in state["latched"]}
        self._intx_masked = bool(state["intx_masked"])
        self._intx_line = bool(state["intx_line"])
        for vector in assigned:
            self._put(self._triggers.pop(vector, None))
            self._triggers[vector] = self._get_eventfd(eventfds[vector])

    # -- SET_IRQS ----------------------------------------------------------------

    def _set_irqs(
        self, flags: int, raw_index: int, start: int, count: int, data: tuple[int, ...] | None
    ) -> int:
        self._check_open()
        # vfio_set_irqs_validate_and_prepare (drivers/vfio/vfio_main.c, 6.1 and 6.12).
        if (
            flags & ~(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK)
            or not 0 <= raw_index < len(IrqIndex)
            or not 0 <= start <= U32_MAX
            or not 0 <= count <= U32_MAX
            or count >= U32_MAX - start
        ):
            raise _fail(errno.EINVAL)
        index = IrqIndex(raw_index)
        num_irqs = self._counts[index]
        if start >= num_irqs or start + count > num_irqs:
            raise _fail(errno.EINVAL)
        dtype = flags & VFIO_IRQ_SET_DATA_TYPE_MASK
        if dtype not in (VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD):
            raise _fail(errno.EINVAL)
        if dtype != VFIO_IRQ_SET_DATA_NONE and (data is None or len(data) < count):
            raise _fail(errno.EINVAL)  # argsz shorter than count entries
        if dtype == VFIO_IRQ_SET_DATA_BOOL:
            assert data is not None
            data = tuple(int(b & 0xFF != 0) for b in data)  # uint8_t each
        # vfio_pci_set_irqs_ioctl: the action picks the handler; none (or several
        # actions at once, or mask/unmask on MSI/MSI-X/ERR/REQ) is ENOTTY.
        action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK
        if index is IrqIndex.INTX:
            if action == VFIO_IRQ_SET_ACTION_MASK:
                return self._intx_mask(start, count, dtype, data)
            if action == VFIO_IRQ_SET_ACTION_UNMASK:
                return self._intx_unmask(start, count, dtype, data)
            if action == VFIO_IRQ_SET_ACTION_TRIGGER:
                return self._intx_trigger(start, count, dtype, data)
        elif index in _MSI_INDEXES:
            if action == VFIO_IRQ_SET_ACTION_TRIGGER:
                return self._msi_trigger(index, start, count, dtype, data)
        elif action == VFIO_IRQ_SET_ACTION_TRIGGER:
            # ERR is dispatched only on PCIe; without it num_irqs is 0 and the
            # range check above has already failed.
            return self._single_trigger(index, count, dtype, data)
        raise _fail(errno.ENOTTY)

    # INTx: vfio_pci_set_intx_mask / _unmask / _trigger.

    def _intx_mask(self, start: int, count: int, dtype: int, data: tuple[int, ...] | None) -> int:
        if self._active is not IrqIndex.INTX or start != 0 or count != 1:
            raise _fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            raise _fail(errno.ENOTTY)  # "XXX implement me" in the kernel too
        if dtype == VFIO_IRQ_SET_DATA_NONE or (data is not None and data[0]):
            self._intx_masked = True
        return 0

    def _intx_unmask(self, start: int, count: int, dtype: int, data: tuple[int, ...] | None) -> int:
        if self._active is not IrqIndex.INTX or start != 0 or count != 1:
            raise _fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            assert data is not None
            if data[0] >= 0:
                raise NotImplementedError("SimDevice does not model the INTx unmask eventfd")
            return 0  # vfio_virqfd_disable of nothing
        if dtype == VFIO_IRQ_SET_DATA_NONE or (data is not None and data[0]):
            self._intx_unmask_now()
        return 0

    def _intx_trigger(
        self, start: int, count: int, dtype: int, data: tuple[int, ...] | None
    ) -> int:
        active = self._active
        if active is IrqIndex.INTX and count == 0 and dtype == VFIO_IRQ_SET_DATA_NONE:
            self._intx_disable()
            return 0
        if active not in (IrqIndex.INTX, None) or start != 0 or count != 1:
            raise _fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            assert data is not None
            # 6.9+/6.1.y: the eventfd is looked up first; a bad fd changes nothing.
            new = self._get_eventfd(data[0]) if data[0] >= 0 else None
            if active is None:
                self._active = IrqIndex.INTX
                self._intx_masked = False  # ctx->masked = vdev->virq_disabled
            self._put(self._triggers.pop(0, None))
            if new is not None:
                self._triggers[0] = new
            self._intx_maybe_fire()  # request_irq on a still-asserted line fires at once
            return 0
        if active is not IrqIndex.INTX:
            raise _fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_NONE or (data is not None and data[0]):
            self._signal(self._triggers.get(0), 1)  # loopback; the mask is untouched
        return 0

    def _intx_maybe_fire(self) -> None:
        # vfio_intx_handler: an unmasked assertion masks the line and signals the
        # eventfd if one is assigned (vfio_send_intx_eventfd).
        if self._active is IrqIndex.INTX and self._intx_line and not self._intx_masked:
            self._intx_masked = True
            self._signal(self._triggers.get(0), 1)

    def _intx_unmask_now(self) -> None:
        # vfio_pci_intx_unmask_handler: a line still asserted stays masked and is
        # signalled again instead of being lost.
        if self._intx_masked:
            if self._intx_line:
                self._signal(self._triggers.get(0), 1)
            else:
                self._intx_masked = False

    def _intx_disable(self) -> None:
        self._put(self._triggers.pop(0, None))
        self._active = None
        self._intx_masked = False

    # MSI/MSI-X: vfio_pci_set_msi_trigger and what it calls.

    def _msi_trigger(
        self, index: IrqIndex, start: int, count: int, dtype: int, data: tuple[int, ...] | None
    ) -> int:
        active = self._active
        if active is index and count == 0 and dtype == VFIO_IRQ_SET_DATA_NONE:
            self._msi_disable()
            return 0
        if active not in (index, None):
            raise _fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            assert data is not None
            if active is index:
                self._msi_set_block(start, count, data)
                return 0
            available = self._msi_enable(index, start + count)
            if available:
                return available
            try:
                self._msi_set_block(start, count, data)
            except OSError:
                self._msi_disable()  # a failure in the enabling call disables the index
                raise
            return 0
        if active is not index:
            raise _fail(errno.EINVAL)
        if self.noresize and start + count > self._num_ctx:
            raise _fail(errno.EINVAL)  # 6.1 only; 6.5+ skips vectors without a context
        for i in range(count):
            if data is None or data[i]:
                self._signal(self._triggers.get(start + i), 1)
        return 0

    def _msi_enable(self, index: IrqIndex, nvec: int) -> int:
        # vfio_msi_enable -> pci_alloc_irq_vectors(pdev, 1, nvec, flag): fewer than
        # nvec vectors are freed again and their number returned.
        if nvec < 1:
            raise _fail(errno.ERANGE)  # __pci_enable_msi{,x}_range: maxvec < minvec
        limit = self.host_vector_limit
        if limit is not None and limit < nvec:
            if limit < 1:
                raise _fail(errno.ENOSPC)
            return limit
        self._active = index
        self._num_ctx = nvec
        self._host = set(range(nvec))
        return 0

    def _msi_set_block(self, start: int, count: int, fds: tuple[int, ...]) -> None:
        if self.noresize and (start >= self._num_ctx or start + count > self._num_ctx):
            raise _fail(errno.EINVAL)  # 6.1 vfio_msi_set_block
        for i in range(count):
            try:
                self._msi_set_vector_signal(start + i, fds[i])
            except OSError:
                # Not transactional: start..j, the failed vector included, are left
                # de-assigned (6.1 unwinds j down to start, 6.5+ start up to j).
                for j in range(start, start + i + 1):
                    self._msi_set_vector_signal(j, -1)
                raise

    def _msi_set_vector_signal(self, vector: int, fd: int) -> None:
        # The old handler is always torn down first; its host vector stays allocated.
        self._put(self._triggers.pop(vector, None))
        if fd < 0:
            return
        if vector not in self._host:
            # Only reachable on 6.5+ (6.1 checked the range): vfio_msi_alloc_irq.
            if self._active is not IrqIndex.MSIX or self.noresize:
                raise _fail(errno.EINVAL)  # pci_irq_vector: no such vector
            limit = self.host_vector_limit
            if limit is not None and len(self._host) >= limit:
                raise _fail(errno.ENOSPC)  # pci_msix_alloc_irq_at found no vector
            self._host.add(vector)  # allocated before the eventfd is looked up
        self._triggers[vector] = self._get_eventfd(fd)
        if vector in self._latched:
            # request_irq unmasks the entry and the pending message goes out.
            self._latched.discard(vector)
            self._signal(self._triggers[vector], 1)

    def _msi_disable(self) -> None:
        # vfio_msi_disable: every vector de-assigned, then pci_free_irq_vectors.
        for fd in self._triggers.values():
            self._put(fd)
        self._triggers.clear()
        self._host.clear()
        self._latched.clear()
        self._num_ctx = 0
        self._active = None

    # ERR/REQ: vfio_pci_set_err_trigger / _req_trigger -> vfio_pci_set_ctx_trigger_single.

    def _single_trigger(
        self, index: IrqIndex, count: int, dtype: int, data: tuple[int, ...] | None
    ) -> int:
        # start == 0 and count <= 1 are already implied by num_irqs == 1.
        current = self._err if index is IrqIndex.ERR else self._req
        if dtype == VFIO_IRQ_SET_DATA_NONE:
            if current is None:
                raise _fail(errno.EINVAL)  # falls out of the if-chain
            if count:
                self._signal(current, 1)
                return 0
            self._put(current)
            new: int | None = None
        elif count == 0:
            raise _fail(errno.EINVAL)
        elif dtype == VFIO_IRQ_SET_DATA_BOOL:
            assert data is not None
            if data[0]:
                self._signal(current, 1)
            return 0
        else:
            assert data is not None
            fd = data[0]
            if fd == -1:
                self._put(current)
                new = None
            elif fd >= 0:
                new = self._get_eventfd(fd)
                self._put(current)
            elif self.noresize:
                return 0  # 6.1: fd < -1 is ignored (only -1 clears)
            else:
                # 6.12 (seen under QEMU): fd < -1 is EINVAL, nothing changes.
                raise _fail(errno.EINVAL)
        if index is IrqIndex.ERR:
            self._err = new
        else:
            self._req = new
        return 0

    # -- eventfd references ------------------------------------------------------

    @staticmethod
    def _get_eventfd(fd: int) -> int:
        """``eventfd_ctx_fdget``: EBADF for no such fd, EINVAL for another kind of file.

        The dup pins the file as the kernel's reference does.
        """
        try:
            dup = os.dup(fd)
        except OSError as e:
            raise _fail(errno.EBADF) from e
        if not is_eventfd(dup):
            os.close(dup)
            raise _fail(errno.EINVAL)
        return dup  # os.dup makes it non-inheritable

    @staticmethod
    def _put(fd: int | None) -> None:
        """``eventfd_ctx_put``."""
        if fd is not None:
            os.close(fd)

    @staticmethod
    def _signal(fd: int | None, n: int) -> None:
        """``eventfd_signal``: adds n to the counter; nothing when no eventfd."""
        if fd is not None:
            os.eventfd_write(fd, n)

    def _check_open(self) -> None:
        if self._closed:
            raise _fail(errno.EBADF)

    def __repr__(self) -> str:
        kind = "noresize" if self.noresize else "dynamic"
        return f"<SimDevice {self.name} msix={self._counts[IrqIndex.MSIX]} {kind}>"
