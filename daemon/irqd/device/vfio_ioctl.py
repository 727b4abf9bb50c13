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


# -- capability chains ------------------------------------------------------------------

# include/uapi/linux/vfio.h (6.1): struct vfio_info_cap_header {__u16 id; __u16 version;
# __u32 next;}; ``next`` and the info struct's ``cap_offset`` are offsets from the start
# of the info buffer, 0 ends the chain.
_CAP_HEADER = struct.Struct("=HHI")


@dataclass(frozen=True)
class InfoCap:
    """One capability of an INFO ioctl's chain: its id, version and offset in the buffer."""

    id: int
    version: int
    offset: int

    @property
    def body(self) -> int:
        """Where the capability's own fields start (after the 8-byte header)."""
        return self.offset + _CAP_HEADER.size


def info_caps(buf: bytes, first: int) -> list[InfoCap]:
    """Walk the capability chain of an INFO buffer from ``first`` (``cap_offset``).

    Stops at an offset outside the buffer or one already seen (a chain the
    kernel would never build), rather than looping.
    """
    caps: list[InfoCap] = []
    seen: set[int] = set()
    offset = first
    while offset and offset not in seen and offset + _CAP_HEADER.size <= len(buf):
        seen.add(offset)
        cap_id, version, following = _CAP_HEADER.unpack_from(buf, offset)
        caps.append(InfoCap(cap_id, version, offset))
        offset = following
    return caps


def device_get_region_info_caps(device: int, index: int) -> tuple[RegionInfo, bytes, int]:
    """``VFIO_DEVICE_GET_REGION_INFO`` with its capability chain.

    Returns the region, the whole info buffer and ``cap_offset`` (0: no chain).
    A kernel with capabilities to report sets ``VFIO_REGION_INFO_FLAG_CAPS``
    and raises ``argsz`` to the size it needs when the buffer was too small;
    the call is then made again with that size.
    """
    argsz = _REGION_INFO.size
    for _attempt in range(2):
        buf = bytearray(argsz)
        _REGION_INFO.pack_into(buf, 0, argsz, 0, index, 0, 0, 0)
        fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, buf)
        needed, flags, got_index, cap_offset, size, offset = _REGION_INFO.unpack_from(buf)
        region = RegionInfo(got_index, flags, size, offset)
        if not flags & VFIO_REGION_INFO_FLAG_CAPS or needed <= argsz:
            return region, bytes(buf), cap_offset if flags & VFIO_REGION_INFO_FLAG_CAPS else 0
        argsz = needed
    return region, bytes(buf), 0


# -- IOMMU (type1, on the container) ----------------------------------------------------

# include/uapi/linux/vfio.h (6.1): VFIO_IOMMU_GET_INFO, MAP_DMA, UNMAP_DMA.
VFIO_IOMMU_GET_INFO = _vfio_io(12)
VFIO_IOMMU_MAP_DMA = _vfio_io(13)
VFIO_IOMMU_UNMAP_DMA = _vfio_io(14)

# include/uapi/linux/vfio.h (6.1): struct vfio_iommu_type1_info.flags.
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
# include/uapi/linux/vfio.h (6.1): capability ids of VFIO_IOMMU_GET_INFO.
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3
# include/uapi/linux/vfio.h (6.1): struct vfio_iommu_type1_dma_map.flags.
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

# argsz, flags, iova_pgsizes, cap_offset, pad: 24 bytes (the struct is 8-byte aligned).
_IOMMU_INFO = struct.Struct("=IIQII")
_DMA_MAP = struct.Struct("=IIQQQ")  # argsz, flags, vaddr, iova, size
_DMA_UNMAP = struct.Struct("=IIQQ")  # argsz, flags, iova, size (then data[], unused)


def iommu_get_info(container: int) -> tuple[int, int, bytes, int]:
    """``VFIO_IOMMU_GET_INFO``: ``(flags, iova_pgsizes, buffer, cap_offset)``.

    Asked twice when the kernel has capabilities (IOVA ranges, DMA mappings
    available) that did not fit: it then raises ``argsz`` to the size needed.
    """
    argsz = _IOMMU_INFO.size
    for _attempt in range(2):
        buf = bytearray(argsz)
        _IOMMU_INFO.pack_into(buf, 0, argsz, 0, 0, 0, 0)
        fcntl.ioctl(container, VFIO_IOMMU_GET_INFO, buf)
        needed, flags, pgsizes, cap_offset, _ = _IOMMU_INFO.unpack_from(buf)
        if not flags & VFIO_IOMMU_INFO_CAPS or needed <= argsz:
            caps = cap_offset if flags & VFIO_IOMMU_INFO_CAPS else 0
            return flags, pgsizes, bytes(buf), caps
        argsz = needed
    return flags, pgsizes, bytes(buf), 0


def iommu_map_dma(container: int, vaddr: int, iova: int, size: int, flags: int) -> None:
    """``VFIO_IOMMU_MAP_DMA``: pin ``size`` bytes at ``vaddr`` and map them at ``iova``."""
    buf = bytearray(_DMA_MAP.pack(_DMA_MAP.size, flags, vaddr, iova, size))
    fcntl.ioctl(container, VFIO_IOMMU_MAP_DMA, buf)


def iommu_unmap_dma(container: int, iova: int, size: int) -> int:
    """``VFIO_IOMMU_UNMAP_DMA``; returns the bytes the kernel unmapped (written to ``size``)."""
    buf = bytearray(_DMA_UNMAP.pack(_DMA_UNMAP.size, 0, iova, size))
    fcntl.ioctl(container, VFIO_IOMMU_UNMAP_DMA, buf)
    _, _, _, unmapped = _DMA_UNMAP.unpack(buf)
    return int(unmapped)
