"""The device interface shared by every backend (``SimDevice``, ``VfioDevice``).

The interface mirrors the kernel's VFIO interrupt uAPI one to one: a backend
implements ``irq_info`` (``VFIO_DEVICE_GET_IRQ_INFO``), ``set_irqs``
(``VFIO_DEVICE_SET_IRQS``) and ``close``; everything else is built on those
three here, so the layers above run unchanged on the simulation and on the
kernel, and one conformance suite checks both.

Constants are from ``include/uapi/linux/vfio.h`` (checked against Linux 6.1
and 6.12; the values have not changed since they were introduced in 3.6).
"""

from __future__ import annotations

import abc
import enum
import errno
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .iommu import IommuInfo
from .regions import RegionInfo

# include/uapi/linux/vfio.h (6.1): struct vfio_irq_info.flags
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

# include/uapi/linux/vfio.h (6.1): struct vfio_irq_set.flags
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_IRQ_SET_DATA_TYPE_MASK = (
    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
)
VFIO_IRQ_SET_ACTION_TYPE_MASK = (
    VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER
)


class IrqIndex(enum.IntEnum):
    """VFIO PCI IRQ indexes (``VFIO_PCI_*_IRQ_INDEX`` in include/uapi/linux/vfio.h, 6.1)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4

    @property
    def wire_name(self) -> str:
        """The name the protocol uses: ``intx``, ``msi``, ``msix``, ``err``, ``req``."""
        return self.name.lower()

    @classmethod
    def from_wire(cls, name: str) -> IrqIndex:
        """The index for a protocol name; ``KeyError`` for an unknown one."""
        return cls[name.upper()]


@dataclass(frozen=True)
class IrqInfo:
    """What ``VFIO_DEVICE_GET_IRQ_INFO`` reports for one index."""

    index: IrqIndex
    flags: int
    count: int

    @property
    def eventfd(self) -> bool:
        return bool(self.flags & VFIO_IRQ_INFO_EVENTFD)

    @property
    def maskable(self) -> bool:
        return bool(self.flags & VFIO_IRQ_INFO_MASKABLE)

    @property
    def automasked(self) -> bool:
        return bool(self.flags & VFIO_IRQ_INFO_AUTOMASKED)

    @property
    def noresize(self) -> bool:
        return bool(self.flags & VFIO_IRQ_INFO_NORESIZE)

    @property
    def dynamic(self) -> bool:
        """MSI-X vectors can be added one at a time while the index is enabled (Linux 6.5+)."""
        return self.index is IrqIndex.MSIX and self.count > 0 and not self.noresize


# The data argument of set_irqs, by data type:
#   DATA_NONE    -> None
#   DATA_BOOL    -> a sequence of `count` bools
#   DATA_EVENTFD -> a sequence of `count` ints (eventfd numbers, -1 de-assigns)
SetIrqsData = Sequence[int] | Sequence[bool] | None


class Unsupported(Exception):
    """This backend does not offer the operation; it refuses it explicitly.

    E.g. reading back an assigned eventfd (``sim.eventfds``) on a real device,
    whose kernel does not give assigned eventfds back.
    """


class AdoptError(ValueError):
    """What a previous daemon process stored cannot be taken as this device.

    A ``ValueError`` (not a ``ConfigError``): the daemon logs it and opens the
    device afresh instead of refusing to start.
    """


@dataclass
class StoredDevice:
    """What a previous daemon process left of its device (irqd.process.fdstore)."""

    #: The PCI address configured for this process; ``None`` for the simulation.
    configured: str | None
    #: What ``Device.export_state`` returned in the previous process.
    state: Mapping[str, Any] | None
    #: The fds ``Device.handover_fds`` returned, by key; the adopter owns them.
    fds: dict[str, int] = field(default_factory=dict)
    #: The vector table's carried eventfds by (index, vector); borrowed, not owned.
    eventfds: Mapping[tuple[IrqIndex, int], int] = field(default_factory=dict)


class ResetUnsupportedError(OSError):
    """The device does not report ``VFIO_DEVICE_FLAGS_RESET``: it has no reset the
    kernel can use (the kernel's own answer, ``vfio_pci_ioctl_reset``, is EINVAL).
    Its errno is ``ENODEV``, which the protocol passes on as is."""

    def __init__(self, name: str) -> None:
        super().__init__(
            errno.ENODEV,
            f"{name} cannot be reset: it does not report VFIO_DEVICE_FLAGS_RESET "
            "(no function-level, PM or bus reset the kernel can use)",
        )


class Device(abc.ABC):
    """One VFIO PCI device's interrupt interface.

    Backends raise ``OSError`` with the kernel's errno (``EINVAL``, ``ENOTTY``,
    ``EBUSY``...) exactly where the kernel would, and return the ioctl's
    (possibly positive) return value from ``set_irqs``.
    """

    #: A short human name, e.g. the PCI address or ``sim``.
    name: str

    #: The backend's name: in ``device.info`` and as ``kind`` in a hand-over's state.
    backend: ClassVar[str]

    @abc.abstractmethod
    def irq_info(self, index: IrqIndex) -> IrqInfo:
        """``VFIO_DEVICE_GET_IRQ_INFO`` for one index."""

    @abc.abstractmethod
    def set_irqs(
        self, flags: int, index: IrqIndex, start: int, count: int, data: SetIrqsData = None
    ) -> int:
        """``VFIO_DEVICE_SET_IRQS`` exactly as the kernel takes it.

        Returns the ioctl's return value: 0, or for an enabling call that got
        fewer MSI/MSI-X vectors than asked, the positive number available (the
        kernel has then freed what it had allocated and left the index disabled).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device; the kernel disables the active index and drops ERR/REQ."""

    # -- restart without disarming (irqd.process.fdstore) ---------------------------

    @abc.abstractmethod
    def handover_fds(self) -> dict[str, int]:
        """The fds that keep the device open, by key, for systemd's fd store.

        Empty for a device that lives inside the process. They stay this
        object's (the store gets duplicates). ``Unsupported`` if this backend
        cannot be handed over to a new process.
        """

    @abc.abstractmethod
    def export_state(self) -> dict[str, Any]:
        """What the next process needs besides the fds, as msgpack-able data."""

    @classmethod
    @abc.abstractmethod
    def adopt_stored(cls, stored: StoredDevice, fresh: Callable[[], Device]) -> Device:
        """The device a previous process left, as it left it: no ``SET_IRQS`` call.

        ``fresh`` opens the configured device, for a backend that needs a new
        object to take the stored state over. Owns ``stored.fds`` from the
        call on (closes them on failure). ``AdoptError`` if they cannot be used.
        """

    # -- simulation capabilities ---------------------------------------------------

    @abc.abstractmethod
    def assigned_fd(self, index: IrqIndex, vector: int) -> int | None:
        """The eventfd the device signals for this vector (``sim.eventfds``); ``None`` if none.

        The number is the device's own: dup it before handing it out.
        ``Unsupported`` on a backend that cannot give it back.
        """

    # -- device access and DMA memory (irqd.server.broker) -------------------------

    @abc.abstractmethod
    def regions(self) -> list[RegionInfo]:
        """``VFIO_DEVICE_GET_REGION_INFO`` for every region the device has (size > 0)."""

    @abc.abstractmethod
    def device_fd(self) -> int:
        """The device fd whose regions ``regions`` describes; borrowed: dup it to hand it out."""

    @property
    @abc.abstractmethod
    def resettable(self) -> bool:
        """``VFIO_DEVICE_FLAGS_RESET``: the device has a function reset the kernel can use."""

    @abc.abstractmethod
    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``; :class:`ResetUnsupportedError` unless ``resettable``."""

    @abc.abstractmethod
    def iommu_info(self) -> IommuInfo:
        """``VFIO_IOMMU_GET_INFO`` of the device's container."""

    @abc.abstractmethod
    def dma_map(self, vaddr: int, iova: int, size: int) -> None:
        """``VFIO_IOMMU_MAP_DMA``, readable and writable by the device; the kernel's errno."""

    @abc.abstractmethod
    def dma_unmap(self, iova: int, size: int) -> int:
        """``VFIO_IOMMU_UNMAP_DMA``; returns the bytes unmapped."""

    # -- conveniences built on set_irqs -----------------------------------------

    def assign_eventfds(self, index: IrqIndex, start: int, fds: Sequence[int]) -> int:
        """Assign (fd >= 0) or de-assign (fd == -1) eventfds for ``start .. start+len(fds)-1``.

        On an inactive MSI/MSI-X index this enables it with ``start+len(fds)``
        host vectors.
        """
        return self.set_irqs(
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            len(fds),
            list(fds),
        )

    def disable(self, index: IrqIndex) -> None:
        """Disable the whole index (``DATA_NONE|ACTION_TRIGGER, count=0``)."""
        self.set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, index, 0, 0)

    def trigger(self, index: IrqIndex, start: int, count: int) -> None:
        """Loopback: the kernel signals the eventfds of these assigned vectors itself."""
        self.set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, index, start, count)

    def unmask(self, index: IrqIndex, start: int = 0, count: int = 1) -> None:
        """Re-arm a masked (INTx) interrupt (``DATA_NONE|ACTION_UNMASK``)."""
        self.set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, index, start, count)

    def mask(self, index: IrqIndex, start: int = 0, count: int = 1) -> None:
        """Mask an interrupt (``DATA_NONE|ACTION_MASK``); INTx only."""
        self.set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK, index, start, count)

    def all_irq_info(self) -> dict[IrqIndex, IrqInfo]:
        """``irq_info`` for every index; one the device lacks reads as count 0.

        The kernel answers GET_IRQ_INFO for ERR with EINVAL on a device that is
        not PCI Express (vfio_pci_core.c, ``vfio_pci_ioctl_get_irq_info``).
        """
        result = {}
        for index in IrqIndex:
            try:
                result[index] = self.irq_info(index)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                result[index] = IrqInfo(index, 0, 0)
        return result
