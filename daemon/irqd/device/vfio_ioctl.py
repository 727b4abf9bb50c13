"""One thin typed function per VFIO ioctl, nothing else.

Every function packs the kernel's struct, calls ``fcntl.ioctl`` with a mutable
buffer (so the kernel's answer is written back and the ioctl's own return value,
which can be positive, is kept) and unpacks the result. Errors are the kernel's:
``OSError`` with its errno, never translated here; ``irqd.device.vfio`` turns the
usual ones into advice.

Numbers and layouts are from ``include/uapi/linux/vfio.h``; they were checked
against Linux 6.1 and 6.12 and have not changed since 3.6 (cdev ones: 6.6).
Every VFIO ioctl is ``_IO(VFIO_TYPE, VFIO_BASE + n)`` with ``VFIO_TYPE = ';'``
and ``VFIO_BASE = 100``: sizes travel in ``argsz``, not in the number.
"""

from __future__ import annotations

import fcntl
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# include/uapi/linux/vfio.h (6.1): VFIO_TYPE (';') << _IOC_TYPESHIFT (8) | VFIO_BASE (100).
_VFIO_IO_BASE = (ord(";") << 8) | 100


def _vfio_io(n: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + n)``: no direction and size bits."""
    return _VFIO_IO_BASE + n


# include/uapi/linux/vfio.h (6.1) ioctl numbers.
VFIO_GET_API_VERSION = _vfio_io(0)
VFIO_CHECK_EXTENSION = _vfio_io(1)
VFIO_SET_IOMMU = _vfio_io(2)
VFIO_GROUP_GET_STATUS = _vfio_io(3)
VFIO_GROUP_SET_CONTAINER = _vfio_io(4)
VFIO_GROUP_UNSET_CONTAINER = _vfio_io(5)
VFIO_GROUP_GET_DEVICE_FD = _vfio_io(6)
VFIO_DEVICE_GET_INFO = _vfio_io(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio_io(8)
VFIO_DEVICE_GET_IRQ_INFO = _vfio_io(9)
VFIO_DEVICE_SET_IRQS = _vfio_io(10)
VFIO_DEVICE_RESET = _vfio_io(11)

# include/uapi/linux/vfio.h (6.1): VFIO_API_VERSION.
VFIO_API_VERSION = 0

# include/uapi/linux/vfio.h (6.1): extensions / IOMMU types for CHECK_EXTENSION and SET_IOMMU.
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8

# include/uapi/linux/vfio.h (6.1): struct vfio_group_status.flags.
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

# include/uapi/linux/vfio.h (6.1): struct vfio_device_info.flags.
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

# include/uapi/linux/vfio.h (6.1): struct vfio_region_info.flags.
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

# include/uapi/linux/vfio.h (6.1): VFIO_PCI_*_REGION_INDEX.
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8

# Struct layouts (native endian, natural alignment; include/uapi/linux/vfio.h 6.1).
_GROUP_STATUS = struct.Struct("=II")  # argsz, flags
# argsz, flags, num_regions, num_irqs, cap_offset, pad: 24 bytes since 4.x
# (cap_offset); a 6.1 kernel also accepts the older 16-byte argsz.
_DEVICE_INFO = struct.Struct("=IIIIII")
_REGION_INFO = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
_IRQ_INFO = struct.Struct("=IIII")  # argsz, flags, index, count
_IRQ_SET = struct.Struct("=IIIII")  # argsz, flags, index, start, count; then data[]


@dataclass(frozen=True)
class GroupStatus:
    """``struct vfio_group_status``."""

    flags: int

    @property
    def viable(self) -> bool:
        """Every device in the group is bound to a VFIO driver (or to none)."""
        return bool(self.flags & VFIO_GROUP_FLAGS_VIABLE)

    @property
    def container_set(self) -> bool:
        return bool(self.flags & VFIO_GROUP_FLAGS_CONTAINER_SET)


@dataclass(frozen=True)
class DeviceInfo:
    """``struct vfio_device_info``."""

    flags: int
    num_regions: int
    num_irqs: int

    @property
    def pci(self) -> bool:
        return bool(self.flags & VFIO_DEVICE_FLAGS_PCI)

    @property
    def resettable(self) -> bool:
        return bool(self.flags & VFIO_DEVICE_FLAGS_RESET)


@dataclass(frozen=True)
class RegionInfo:
    """``struct vfio_region_info``; ``offset`` is where pread/pwrite on the device fd go."""

    index: int
    flags: int
    size: int
    offset: int

    @property
    def readable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_WRITE)


# -- container (/dev/vfio/vfio) ---------------------------------------------------------


def get_api_version(container: int) -> int:
    """``VFIO_GET_API_VERSION``: 0 (``VFIO_API_VERSION``) on every kernel so far."""
    return fcntl.ioctl(container, VFIO_GET_API_VERSION)


def check_extension(container: int, extension: int) -> bool:
    """``VFIO_CHECK_EXTENSION``: whether the container supports an IOMMU type."""
    return fcntl.ioctl(container, VFIO_CHECK_EXTENSION, extension) > 0


def set_iommu(container: int, iommu_type: int) -> None:
    """``VFIO_SET_IOMMU``; needs a group attached first. EPERM: no interrupt remapping."""
    fcntl.ioctl(container, VFIO_SET_IOMMU, iommu_type)


# -- group (/dev/vfio/N) ----------------------------------------------------------------


def group_get_status(group: int) -> GroupStatus:
    """``VFIO_GROUP_GET_STATUS``."""
    buf = bytearray(_GROUP_STATUS.pack(_GROUP_STATUS.size, 0))
    fcntl.ioctl(group, VFIO_GROUP_GET_STATUS, buf)
    _, flags = _GROUP_STATUS.unpack(buf)
    return GroupStatus(flags)


def group_set_container(group: int, container: int) -> None:
    """``VFIO_GROUP_SET_CONTAINER``: the argument is a pointer to the container fd."""
    fcntl.ioctl(group, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))


def group_unset_container(group: int) -> None:
    """``VFIO_GROUP_UNSET_CONTAINER``."""
    fcntl.ioctl(group, VFIO_GROUP_UNSET_CONTAINER)


def group_get_device_fd(group: int, name: str) -> int:
    """``VFIO_GROUP_GET_DEVICE_FD``: the device fd is the ioctl's return value."""
    buf = bytearray(name.encode("ascii") + b"\0")
    return int(fcntl.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, buf, True))


# -- device -----------------------------------------------------------------------------


def device_get_info(device: int) -> DeviceInfo:
    """``VFIO_DEVICE_GET_INFO``."""
    buf = bytearray(_DEVICE_INFO.pack(_DEVICE_INFO.size, 0, 0, 0, 0, 0))
    fcntl.ioctl(device, VFIO_DEVICE_GET_INFO, buf)
    _, flags, num_regions, num_irqs, _, _ = _DEVICE_INFO.unpack(buf)
    return DeviceInfo(flags, num_regions, num_irqs)


def device_get_region_info(device: int, index: int) -> RegionInfo:
    """``VFIO_DEVICE_GET_REGION_INFO`` (capability chains are not read)."""
    buf = bytearray(_REGION_INFO.pack(_REGION_INFO.size, 0, index, 0, 0, 0))
    fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, buf)
    _, flags, got_index, _, size, offset = _REGION_INFO.unpack(buf)
    return RegionInfo(got_index, flags, size, offset)


def device_get_irq_info(device: int, index: int) -> tuple[int, int]:
    """``VFIO_DEVICE_GET_IRQ_INFO``: ``(flags, count)``."""
    buf = bytearray(_IRQ_INFO.pack(_IRQ_INFO.size, 0, index, 0))
    fcntl.ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, buf)
    _, flags, _, count = _IRQ_INFO.unpack(buf)
    return flags, count


def device_set_irqs(  # noqa: PLR0917  the kernel struct's fields, in its order
    device: int,
    flags: int,
    index: int,
    start: int,
    count: int,
    data: bytes = b"",
) -> int:
    """``VFIO_DEVICE_SET_IRQS`` with ``data`` already packed; returns the ioctl's value.

    ``argsz`` is the header plus exactly ``data``: the kernel checks it against
    the size ``count`` entries of the data type need (EINVAL when short).
    """
    header = _IRQ_SET.pack(_IRQ_SET.size + len(data), flags, index, start, count)
    # mutate_flag True: the ioctl's return value (possibly positive) comes back.
    return int(fcntl.ioctl(device, VFIO_DEVICE_SET_IRQS, bytearray(header + data), True))


def pack_eventfds(fds: Sequence[int]) -> bytes:
    """``DATA_EVENTFD`` payload: one ``int32`` per vector, -1 de-assigns."""
    return struct.pack(f"={len(fds)}i", *fds)


def pack_bools(values: Sequence[bool | int]) -> bytes:
    """``DATA_BOOL`` payload: one ``uint8`` per vector."""
    return bytes(1 if v else 0 for v in values)


def device_reset(device: int) -> None:
    """``VFIO_DEVICE_RESET``."""
    fcntl.ioctl(device, VFIO_DEVICE_RESET)
