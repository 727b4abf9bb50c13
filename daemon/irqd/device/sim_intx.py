"""The simulated INTx line: ``vfio_pci_set_intx_mask`` / ``_unmask`` / ``_trigger``
(drivers/vfio/pci/vfio_pci_intrs.c) and its handler.

It follows the persistent handler of 6.9+ ("vfio/pci: Create persistent INTx
handler", also in 6.1.y stable): the new eventfd is looked up before the old
one is dropped, and the handler masks the line even when no eventfd is
assigned. Not modelled: ``DATA_EVENTFD|ACTION_UNMASK`` (the kernel's virqfd
that unmasks when an eventfd is written) raises ``NotImplementedError``; the
config-space INTx disable bit (``virq_disabled``).
"""

from __future__ import annotations

import errno

from .base import VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE
from .sim_kernel import fail, get_eventfd, put, signal


class SimIntx:
    """The INTx index of a simulated device: enabled or not, mask, line, trigger."""

    def __init__(self) -> None:
        #: Whether INTx is the active index (``vdev->irq_type``).
        self.enabled = False
        self.masked = False
        #: The level of the line the "hardware" drives.
        self.line = False
        #: The sim's dup of the assigned eventfd.
        self.trigger: int | None = None

    def mask(self, start: int, count: int, dtype: int, data: tuple[int, ...] | None) -> int:
        """``vfio_pci_set_intx_mask``."""
        if not self.enabled or start != 0 or count != 1:
            raise fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            raise fail(errno.ENOTTY)  # "XXX implement me" in the kernel too
        if dtype == VFIO_IRQ_SET_DATA_NONE or (data is not None and data[0]):
            self.masked = True
        return 0

    def unmask(self, start: int, count: int, dtype: int, data: tuple[int, ...] | None) -> int:
        """``vfio_pci_set_intx_unmask``."""
        if not self.enabled or start != 0 or count != 1:
            raise fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            assert data is not None
            if data[0] >= 0:
                raise NotImplementedError("SimDevice does not model the INTx unmask eventfd")
            return 0  # vfio_virqfd_disable of nothing
        if dtype == VFIO_IRQ_SET_DATA_NONE or (data is not None and data[0]):
            self._unmask_now()
        return 0

    def set_trigger(
        self,
        start: int,
        count: int,
        dtype: int,
        data: tuple[int, ...] | None,
        *,
        other_active: bool,
    ) -> int:
        """``vfio_pci_set_intx_trigger``; ``other_active``: MSI or MSI-X is enabled."""
        if self.enabled and count == 0 and dtype == VFIO_IRQ_SET_DATA_NONE:
            self.disable()
            return 0
        if other_active or start != 0 or count != 1:
            raise fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            assert data is not None
            # 6.9+/6.1.y: the eventfd is looked up first; a bad fd changes nothing.
            new = get_eventfd(data[0]) if data[0] >= 0 else None
            if not self.enabled:
                self.enabled = True
                self.masked = False  # ctx->masked = vdev->virq_disabled
            put(self.trigger)
            self.trigger = new
            self._maybe_fire()  # request_irq on a still-asserted line fires at once
            return 0
        if not self.enabled:
            raise fail(errno.EINVAL)
        if dtype == VFIO_IRQ_SET_DATA_NONE or (data is not None and data[0]):
            signal(self.trigger, 1)  # loopback; the mask is untouched
        return 0

    def drive(self, asserted: bool) -> None:
        """The "hardware" drives the level-triggered line; an unmasked assertion fires."""
        self.line = asserted
        self._maybe_fire()

    def disable(self) -> None:
        """INTx is disabled: the trigger dropped, the mask cleared."""
        put(self.trigger)
        self.trigger = None
        self.enabled = False
        self.masked = False

    def _maybe_fire(self) -> None:
        # vfio_intx_handler: an unmasked assertion masks the line and signals the
        # eventfd if one is assigned (vfio_send_intx_eventfd).
        if self.enabled and self.line and not self.masked:
            self.masked = True
            signal(self.trigger, 1)

    def _unmask_now(self) -> None:
        # vfio_pci_intx_unmask_handler: a line still asserted stays masked and is
        # signalled again instead of being lost.
        if self.masked:
            if self.line:
                signal(self.trigger, 1)
            else:
                self.masked = False
