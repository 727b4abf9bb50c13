"""Simulated MSI and MSI-X: ``vfio_pci_set_msi_trigger`` and what it calls
(drivers/vfio/pci/vfio_pci_intrs.c).

``noresize=True`` models 6.1 (before the 6.5 dynamic MSI-X series): a fixed
``ctx`` array of ``num_ctx`` vectors, allocated when the index is enabled;
``vfio_msi_set_block`` rejects a range outside it with EINVAL before touching
anything, and so does the loopback trigger. ``noresize=False`` models 6.5+
(checked against 6.12): an xarray of contexts, no range check in
``vfio_msi_set_block``; an MSI-X vector with no host vector yet gets one from
``vfio_msi_alloc_irq`` (``pci_msix_alloc_irq_at``); MSI (never dynamic) fails
that vector with EINVAL.
"""

from __future__ import annotations

import errno

from .base import VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, IrqIndex
from .sim_kernel import fail, get_eventfd, put, signal


class SimMsi:
    """The MSI and MSI-X indexes of a simulated device (at most one of them enabled)."""

    def __init__(self, *, noresize: bool, host_vector_limit: int | None) -> None:
        self.noresize = noresize
        #: Host vectors the platform can give; ``None``: as many as asked for.
        self.host_vector_limit = host_vector_limit
        #: The enabled one of MSI and MSI-X, if either is.
        self.active: IrqIndex | None = None
        self.num_ctx = 0  # 6.1: size of the ctx array fixed at enable
        #: Host vectors allocated, by vector.
        self.host: set[int] = set()
        #: The sim's dups of the assigned eventfds, by vector.
        self.triggers: dict[int, int] = {}
        # MSI-X vectors raised while allocated but de-assigned: the entry is masked,
        # the device sets its pending bit and delivers once when unmasked again
        # (docs/design.md, "Kernel facts": vfio_msi_set_vector_signal; seen on 6.1 and 6.12).
        self.latched: set[int] = set()

    def set_trigger(
        self,
        index: IrqIndex,
        start: int,
        count: int,
        dtype: int,
        data: tuple[int, ...] | None,
        *,
        other_active: bool,
    ) -> int:
        """``vfio_pci_set_msi_trigger``; ``other_active``: INTx is enabled."""
        active = self.active
        if active is index and count == 0 and dtype == VFIO_IRQ_SET_DATA_NONE:
            self.disable()
            return 0
        if other_active or active not in (index, None):
            raise fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            assert data is not None
            if active is index:
                self._set_block(start, count, data)
                return 0
            available = self._enable(index, start + count)
            if available:
                return available
            try:
                self._set_block(start, count, data)
            except OSError:
                self.disable()  # a failure in the enabling call disables the index
                raise
            return 0
        if active is not index:
            raise fail(errno.EINVAL)
        if self.noresize and start + count > self.num_ctx:
            raise fail(errno.EINVAL)  # 6.1 only; 6.5+ skips vectors without a context
        for i in range(count):
            if data is None or data[i]:
                signal(self.triggers.get(start + i), 1)
        return 0

    def raise_irq(self, index: IrqIndex, vector: int, n: int) -> None:
        """The device sends ``n`` messages of ``vector``: delivered to the assigned
        eventfd; an allocated but de-assigned MSI-X vector latches it; otherwise lost."""
        if self.active is not index:
            return
        fd = self.triggers.get(vector)
        if fd is not None:
            signal(fd, n)
        elif index is IrqIndex.MSIX and vector in self.host:
            self.latched.add(vector)

    def disable(self) -> None:
        """``vfio_msi_disable``: every vector de-assigned, then ``pci_free_irq_vectors``."""
        for fd in self.triggers.values():
            put(fd)
        self.triggers.clear()
        self.host.clear()
        self.latched.clear()
        self.num_ctx = 0
        self.active = None

    def _enable(self, index: IrqIndex, nvec: int) -> int:
        # vfio_msi_enable -> pci_alloc_irq_vectors(pdev, 1, nvec, flag): fewer than
        # nvec vectors are freed again and their number returned.
        if nvec < 1:
            raise fail(errno.ERANGE)  # __pci_enable_msi{,x}_range: maxvec < minvec
        limit = self.host_vector_limit
        if limit is not None and limit < nvec:
            if limit < 1:
                raise fail(errno.ENOSPC)
            return limit
        self.active = index
        self.num_ctx = nvec
        self.host = set(range(nvec))
        return 0

    def _set_block(self, start: int, count: int, fds: tuple[int, ...]) -> None:
        if self.noresize and (start >= self.num_ctx or start + count > self.num_ctx):
            raise fail(errno.EINVAL)  # 6.1 vfio_msi_set_block
        for i in range(count):
            try:
                self._set_vector_signal(start + i, fds[i])
            except OSError:
                # Not transactional: start..j, the failed vector included, are left
                # de-assigned (6.1 unwinds j down to start, 6.5+ start up to j).
                for j in range(start, start + i + 1):
                    self._set_vector_signal(j, -1)
                raise

    def _set_vector_signal(self, vector: int, fd: int) -> None:
        # The old handler is always torn down first; its host vector stays allocated.
        put(self.triggers.pop(vector, None))
        if fd < 0:
            return
        if vector not in self.host:
            # Only reachable on 6.5+ (6.1 checked the range): vfio_msi_alloc_irq.
            if self.active is not IrqIndex.MSIX or self.noresize:
                raise fail(errno.EINVAL)  # pci_irq_vector: no such vector
            limit = self.host_vector_limit
            if limit is not None and len(self.host) >= limit:
                raise fail(errno.ENOSPC)  # pci_msix_alloc_irq_at found no vector
            self.host.add(vector)  # allocated before the eventfd is looked up
        self.triggers[vector] = get_eventfd(fd)
        if vector in self.latched:
            # request_irq unmasks the entry and the pending message goes out.
            self.latched.discard(vector)
            signal(self.triggers[vector], 1)
