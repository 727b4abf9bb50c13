"""``VfioDevice``: a real PCI device bound to vfio-pci, through raw VFIO ioctls.

Getting hold of the device (opening it, or adopting a previous process's fds)
is irqd.device.vfio_open; this is what the daemon does with it once held:
interrupts, regions and config space, DMA mappings, the hand-over.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from . import vfio_ioctl as io
from .base import (
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
    Device,
    IrqIndex,
    IrqInfo,
    ResetUnsupportedError,
    SetIrqsData,
    StoredDevice,
    Unsupported,
)
from .iommu import IommuInfo, parse_iommu_info
from .regions import REGION_NAMES, RegionInfo, parse_sparse_mmap
from .vfio_open import (
    DEV_VFIO,
    HANDOVER_KEYS,
    SYSFS_PCI_DEVICES,
    DeviceBusyError,
    DeviceNotFoundError,
    GroupNotViableError,
    NoInterruptRemappingError,
    NoIommuGroupError,
    NotBoundToVfioError,
    VfioAdoptError,
    VfioOpenError,
    VfioPermissionError,
    check_adopted,
    close_quietly,
    find_group,
    open_device,
)

__all__ = [
    "HANDOVER_KEYS",
    "DeviceBusyError",
    "DeviceNotFoundError",
    "GroupNotViableError",
    "NoInterruptRemappingError",
    "NoIommuGroupError",
    "NotBoundToVfioError",
    "VfioAdoptError",
    "VfioDevice",
    "VfioOpenError",
    "VfioPermissionError",
]

#: include/uapi/linux/pci_regs.h: the 16-bit COMMAND register and its bus-master bit.
PCI_COMMAND = 0x04
PCI_COMMAND_MASTER = 0x4


class VfioDevice(Device):
    """One PCI device through VFIO: interrupts, regions and config space.

    Holds three fds (container, group, device); ``close`` releases all of them,
    after which every call fails with EBADF, as it would on a closed fd.
    """

    backend: ClassVar[str] = "vfio"

    def __init__(
        self,
        bdf: str,
        *,
        sysfs_devices: Path = SYSFS_PCI_DEVICES,
        dev_vfio: Path = DEV_VFIO,
    ) -> None:
        self.name = bdf
        self.bdf = bdf
        self.group_number = find_group(bdf, sysfs_devices / bdf)
        fds = open_device(bdf, self.group_number, dev_vfio)
        self._container, self._group, self._device = fds.container, fds.group, fds.device
        self.info = io.device_get_info(self._device)
        self._config = io.device_get_region_info(self._device, io.VFIO_PCI_CONFIG_REGION_INDEX)

    # -- restart without disarming (irqd.process.fdstore) ------------------------------------

    def handover_fds(self) -> dict[str, int]:
        """The container, group and device fds, by key, for systemd's fd store.

        They stay this object's (the store gets duplicates through SCM_RIGHTS):
        while the store holds them, closing them here does not release the
        device, so MSI-X stays enabled and every eventfd stays assigned.
        """
        self._fd()  # EBADF once closed: nothing to hand over
        return {"container": self._container, "group": self._group, "device": self._device}

    def export_state(self) -> dict[str, Any]:
        """What ``adopt`` checks the fds against: the address and the group number.

        The interrupt setup itself is not in it: the kernel keeps it with the
        device fd, and which vectors are assigned is the vector table's state.
        """
        return {"bdf": self.bdf, "group": self.group_number}

    @classmethod
    def adopt(cls, bdf: str, fds: Mapping[str, int], state: Mapping[str, Any] | None) -> VfioDevice:
        """The device a previous daemon process had open, from its fds, as it left it.

        Nothing is opened, attached, reset or enabled: no ``VFIO_SET_IOMMU``,
        no ``SET_IRQS``. The fds are only checked, with read-only ioctls, to
        be what they claim (a container of this API version, a viable group
        attached to a container, a PCI device fd) and to belong to ``bdf``'s
        group. Owns ``fds`` from the call on: on ``VfioAdoptError`` they are
        closed, which releases the device (the caller then opens it afresh).
        """
        try:
            held, number, info = check_adopted(bdf, fds, state)
            config = io.device_get_region_info(held.device, io.VFIO_PCI_CONFIG_REGION_INDEX)
        except BaseException:
            for fd in fds.values():
                close_quietly(fd)
            raise
        self = cls.__new__(cls)
        self.name = self.bdf = bdf
        self._container, self._group, self._device = held.container, held.group, held.device
        self.group_number = number
        self.info = info
        self._config = config
        return self

    @classmethod
    def adopt_stored(cls, stored: StoredDevice, fresh: Callable[[], Device]) -> VfioDevice:
        """:meth:`adopt` from the fd store: ``fresh`` is not called (the device is
        still open through the stored fds, so opening it again would fail)."""
        fds, stored.fds = stored.fds, {}
        if stored.configured is None:
            for fd in fds.values():
                close_quietly(fd)
            raise VfioAdoptError(
                "the stored state is of a real device; the simulation is configured"
            )
        return cls.adopt(stored.configured, fds, stored.state)

    # -- Device ----------------------------------------------------------------------

    def assigned_fd(self, index: IrqIndex, vector: int) -> int | None:
        """Refused: the kernel does not give an assigned eventfd back."""
        raise Unsupported("sim.eventfds exists only on the simulated device")

    def irq_info(self, index: IrqIndex) -> IrqInfo:
        """``VFIO_DEVICE_GET_IRQ_INFO``."""
        flags, count = io.device_get_irq_info(self._fd(), int(index))
        return IrqInfo(index=IrqIndex(index), flags=flags, count=count)

    def set_irqs(
        self, flags: int, index: IrqIndex, start: int, count: int, data: SetIrqsData = None
    ) -> int:
        """``VFIO_DEVICE_SET_IRQS``; ``data`` is packed as the data type in ``flags`` says.

        ``data`` longer than ``count`` is passed whole (argsz covers it, the
        kernel reads ``count`` entries); shorter gives the kernel's EINVAL.
        """
        device = self._fd()
        dtype = flags & VFIO_IRQ_SET_DATA_TYPE_MASK
        payload = b""
        if data is not None and dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            payload = io.pack_eventfds([int(x) for x in data])
        elif data is not None and dtype == VFIO_IRQ_SET_DATA_BOOL:
            payload = io.pack_bools(list(data))
        return io.device_set_irqs(device, flags, int(index), start, count, payload)

    def close(self) -> None:
        """Close the device, the group and the container, in that order. Idempotent.

        The last close of the device file disables the active index and drops
        the ERR/REQ triggers (vfio_pci_core_close_device).
        """
        for attr in ("_device", "_group", "_container"):
            fd = getattr(self, attr)
            # Forget the number before closing it: a closed number is reused at once.
            setattr(self, attr, -1)
            close_quietly(fd)

    @property
    def closed(self) -> bool:
        return self._device < 0

    def fds(self) -> list[int]:
        """Every fd this object holds on the device (device, group, container)."""
        return [fd for fd in (self._device, self._group, self._container) if fd >= 0]

    # -- device access and DMA memory (irqd.server.broker) ------------------------------

    def regions(self) -> list[RegionInfo]:
        """Every standard region with a size (BARs, ROM, config, VGA), with sparse areas.

        The kernel answers EINVAL for a region the device lacks (VGA on a
        non-VGA device); device-specific regions beyond VGA are not listed.
        """
        device = self._fd()
        found = []
        for index in range(min(self.info.num_regions, len(REGION_NAMES))):
            try:
                info, buf, cap_offset = io.device_get_region_info_caps(device, index)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    continue
                raise
            if info.size:
                found.append(RegionInfo.from_kernel(info, parse_sparse_mmap(buf, cap_offset)))
        return found

    def device_fd(self) -> int:
        """The VFIO device fd (borrowed: dup it to hand it out)."""
        return self._fd()

    @property
    def resettable(self) -> bool:
        return self.info.resettable

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` (``vfio_pci_ioctl_reset``): the kernel zaps every BAR
        mapping (they fault back in afterwards), and ``pci_try_reset_function``
        saves config space and the MSI/MSI-X state, resets, and restores them;
        the interrupt triggers stay assigned."""
        device = self._fd()
        if not self.info.resettable:
            raise ResetUnsupportedError(self.bdf)
        io.device_reset(device)

    def iommu_info(self) -> IommuInfo:
        """``VFIO_IOMMU_GET_INFO`` on the container (type1v2)."""
        _, pgsizes, buf, cap_offset = io.iommu_get_info(self._container_fd())
        return parse_iommu_info(pgsizes, buf, cap_offset)

    def dma_map(self, vaddr: int, iova: int, size: int) -> None:
        """``VFIO_IOMMU_MAP_DMA``, readable and writable by the device; pins the pages."""
        flags = io.VFIO_DMA_MAP_FLAG_READ | io.VFIO_DMA_MAP_FLAG_WRITE
        io.iommu_map_dma(self._container_fd(), vaddr, iova, size, flags)

    def dma_unmap(self, iova: int, size: int) -> int:
        """``VFIO_IOMMU_UNMAP_DMA``; returns the bytes the kernel unmapped."""
        return io.iommu_unmap_dma(self._container_fd(), iova, size)

    def _container_fd(self) -> int:
        self._fd()  # EBADF once closed, like every other call
        return self._container

    # -- regions and config space ----------------------------------------------------

    def region_info(self, index: int) -> io.RegionInfo:
        """``VFIO_DEVICE_GET_REGION_INFO`` (``VFIO_PCI_*_REGION_INDEX``)."""
        return io.device_get_region_info(self._fd(), index)

    def region_read(self, region: io.RegionInfo, offset: int, size: int) -> bytes:
        """``pread`` from a region at its kernel-given offset."""
        return os.pread(self._fd(), size, region.offset + offset)

    def region_write(self, region: io.RegionInfo, offset: int, data: bytes) -> None:
        """``pwrite`` to a region at its kernel-given offset (the whole of ``data``)."""
        written = os.pwrite(self._fd(), data, region.offset + offset)
        if written != len(data):
            raise OSError(errno.EIO, f"short write to region {region.index}: {written}")

    def read_command(self) -> int:
        """The PCI COMMAND register (16-bit, little endian, config offset 4)."""
        (value,) = struct.unpack("<H", self.region_read(self._config, PCI_COMMAND, 2))
        return int(value)

    def set_bus_master(self, enabled: bool = True) -> None:
        """Set or clear ``PCI_COMMAND_MASTER``.

        An MSI/MSI-X message is a DMA write: the device drops it while bus
        mastering is off, and vfio-pci leaves it off after opening the device.
        """
        command = self.read_command()
        wanted = command | PCI_COMMAND_MASTER if enabled else command & ~PCI_COMMAND_MASTER
        if wanted != command:
            self.region_write(self._config, PCI_COMMAND, struct.pack("<H", wanted))

    def _fd(self) -> int:
        if self._device < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self._device

    def __repr__(self) -> str:
        return f"<VfioDevice {self.bdf} group {self.group_number}>"
