"""The regions of a VFIO PCI device fd, as ``device.regions`` and ``device.open`` report them.

A VFIO device fd is one file holding every region of the device at its own
offset (vfio-pci puts region N at ``N << 40``, ``VFIO_PCI_OFFSET_SHIFT`` in
drivers/vfio/pci/vfio_pci_priv.h, but a user must take the offset from
``VFIO_DEVICE_GET_REGION_INFO``, never compute it). BARs may be mapped where
the kernel says ``MMAP``, and only the areas of a sparse-mmap capability when
there is one (the holes are the MSI-X table and PBA, which the kernel keeps
for itself on kernels that do not report ``MSIX_MAPPABLE``). Config space is
read and written with ``pread``/``pwrite``; the kernel virtualizes it.

This module also lays out the simulated device's fd (:class:`SimRegions`): a
memfd with BAR0 at offset 0, BAR2 at ``2 << 40`` and config space at
``7 << 40``, as vfio-pci would, and a plausible type-0 config header.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from . import vfio_ioctl as io

__all__ = [
    "REGION_NAMES",
    "VFIO_REGION_INFO_CAP_SPARSE_MMAP",
    "RegionInfo",
    "SimRegions",
    "parse_sparse_mmap",
    "region_name",
]

#: VFIO_PCI_*_REGION_INDEX in include/uapi/linux/vfio.h (6.1): BAR0..5, ROM, CONFIG, VGA.
REGION_NAMES: Final = ("bar0", "bar1", "bar2", "bar3", "bar4", "bar5", "rom", "config", "vga")

#: include/uapi/linux/vfio.h (6.1): struct vfio_region_info_cap_sparse_mmap, version 1.
VFIO_REGION_INFO_CAP_SPARSE_MMAP: Final = 1
_SPARSE_HEADER = struct.Struct("=II")  # nr_areas, reserved
_SPARSE_AREA = struct.Struct("=QQ")  # offset, size

#: drivers/vfio/pci/vfio_pci_priv.h (6.1): VFIO_PCI_OFFSET_SHIFT; the sim uses the same layout.
VFIO_PCI_OFFSET_SHIFT: Final = 40


def region_name(index: int) -> str:
    """``bar0`` .. ``bar5``, ``rom``, ``config``, ``vga``; ``region<N>`` beyond those."""
    return REGION_NAMES[index] if 0 <= index < len(REGION_NAMES) else f"region{index}"


@dataclass(frozen=True)
class RegionInfo:
    """One region of the device fd: where it sits and what may be done with it."""

    index: int
    size: int
    offset: int
    read: bool
    write: bool
    mmap: bool
    #: Mmappable ``(offset, size)`` areas within the region, from a sparse-mmap
    #: capability; empty when the kernel reports none (then all of it, if ``mmap``).
    sparse: tuple[tuple[int, int], ...] = field(default=())

    @property
    def name(self) -> str:
        """The protocol's name for the region."""
        return region_name(self.index)

    def to_wire(self) -> dict[str, Any]:
        """The region as ``device.regions`` reports it."""
        return {
            "index": self.index,
            "name": self.name,
            "size": self.size,
            "offset": self.offset,
            "read": self.read,
            "write": self.write,
            "mmap": self.mmap,
            "sparse": [[offset, size] for offset, size in self.sparse],
        }

    @classmethod
    def from_kernel(cls, info: io.RegionInfo, sparse: Sequence[tuple[int, int]] = ()) -> RegionInfo:
        """From ``struct vfio_region_info`` and its sparse-mmap areas."""
        return cls(
            index=info.index,
            size=info.size,
            offset=info.offset,
            read=bool(info.flags & io.VFIO_REGION_INFO_FLAG_READ),
            write=bool(info.flags & io.VFIO_REGION_INFO_FLAG_WRITE),
            mmap=bool(info.flags & io.VFIO_REGION_INFO_FLAG_MMAP),
            sparse=tuple(sparse),
        )


def parse_sparse_mmap(buf: bytes, cap_offset: int) -> list[tuple[int, int]]:
    """The areas of the sparse-mmap capability in a region-info buffer; ``[]`` if absent."""
    for cap in io.info_caps(buf, cap_offset):
        if cap.id != VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            continue
        (count, _) = _SPARSE_HEADER.unpack_from(buf, cap.body)
        first = cap.body + _SPARSE_HEADER.size
        count = min(count, max(0, (len(buf) - first) // _SPARSE_AREA.size))
        return [_SPARSE_AREA.unpack_from(buf, first + i * _SPARSE_AREA.size) for i in range(count)]
    return []


# -- the simulated device's fd -------------------------------------------------------------

# include/uapi/linux/pci_regs.h: type-0 config header offsets and the MSI-X capability.
PCI_VENDOR_ID: Final = 0x00
PCI_DEVICE_ID: Final = 0x02
PCI_COMMAND: Final = 0x04
PCI_STATUS: Final = 0x06
PCI_STATUS_CAP_LIST: Final = 0x10
PCI_CLASS_REVISION: Final = 0x08
PCI_HEADER_TYPE: Final = 0x0E
PCI_BASE_ADDRESS_0: Final = 0x10
PCI_SUBSYSTEM_VENDOR_ID: Final = 0x2C
PCI_CAPABILITY_LIST: Final = 0x34
PCI_CAP_ID_MSIX: Final = 0x11
PCI_MSIX_FLAGS_QSIZE: Final = 0x07FF
PCI_CFG_SPACE_EXP_SIZE: Final = 4096

#: QEMU's PCI test device (include/hw/pci/pci.h: PCI_VENDOR_ID_REDHAT, PCI_DEVICE_ID_REDHAT_TEST),
#: a device that stands for nothing in particular, as the simulation does.
SIM_VENDOR_ID: Final = 0x1B36
SIM_DEVICE_ID: Final = 0x0005
#: PCI_CLASS_OTHERS (include/linux/pci_ids.h) << 16: "unassigned class".
SIM_CLASS: Final = 0xFF0000

#: The simulated BARs: index -> (size, sparse areas); BAR2 holds the MSI-X table
#: at 0x1000 and its PBA at 0x1800, left out of the mmappable area as a kernel
#: without ``MSIX_MAPPABLE`` reports it.
SIM_BARS: Final[dict[int, tuple[int, tuple[tuple[int, int], ...]]]] = {
    0: (16 * 1024, ()),
    2: (8 * 1024, ((0, 0x1000),)),
}
SIM_MSIX_TABLE: Final = (2, 0x1000)
SIM_MSIX_PBA: Final = (2, 0x1800)
SIM_MSIX_CAP: Final = 0x40


class SimRegions:
    """The simulated device's fd: a memfd laid out like a vfio-pci device fd.

    The memfd is sparse (only touched pages cost memory), so regions can sit at
    the kernel's ``index << 40`` offsets. Reads and writes are plain file I/O:
    BARs are memory without side effects, and config space is the header
    written at creation, writable everywhere (the kernel would virtualize it).
    """

    def __init__(self, *, msix_vectors: int) -> None:
        """Create the memfd and write the config header; ``close`` releases it."""
        self.regions = [
            RegionInfo(index, size, index << VFIO_PCI_OFFSET_SHIFT, True, True, True, sparse)
            for index, (size, sparse) in sorted(SIM_BARS.items())
        ]
        config_index = REGION_NAMES.index("config")
        self.config = RegionInfo(
            config_index,
            PCI_CFG_SPACE_EXP_SIZE,
            config_index << VFIO_PCI_OFFSET_SHIFT,
            True,
            True,
            False,
        )
        self.regions.append(self.config)
        self.fd = os.memfd_create("irqd-sim-device", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.config.offset + self.config.size)
            os.pwrite(self.fd, self._config_header(msix_vectors), self.config.offset)
        except BaseException:
            self.close()
            raise

    def reset(self) -> None:
        """A function reset: every BAR reads as zero again (the device's registers
        return to their reset values); config space is saved and restored around
        it by the PCI core (``pci_try_reset_function``), so it is unchanged."""
        for region in self.regions:
            if region is not self.config:
                os.pwrite(self.fd, bytes(region.size), region.offset)

    def close(self) -> None:
        """Close the memfd (dups handed to clients stay valid); idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    @staticmethod
    def _config_header(msix_vectors: int) -> bytes:
        header = bytearray(PCI_CFG_SPACE_EXP_SIZE)
        struct.pack_into("<HH", header, PCI_VENDOR_ID, SIM_VENDOR_ID, SIM_DEVICE_ID)
        # COMMAND 0: vfio-pci leaves memory decoding and bus mastering to the user.
        struct.pack_into("<HH", header, PCI_COMMAND, 0, PCI_STATUS_CAP_LIST)
        struct.pack_into("<I", header, PCI_CLASS_REVISION, SIM_CLASS << 8)
        header[PCI_HEADER_TYPE] = 0
        for index in SIM_BARS:
            # A 32-bit memory BAR (low bits 0) at a plausible guest address.
            struct.pack_into(
                "<I", header, PCI_BASE_ADDRESS_0 + 4 * index, 0xFEA0_0000 + index * 0x10000
            )
        struct.pack_into("<HH", header, PCI_SUBSYSTEM_VENDOR_ID, SIM_VENDOR_ID, 0x1100)
        header[PCI_CAPABILITY_LIST] = SIM_MSIX_CAP
        if msix_vectors:
            qsize = (msix_vectors - 1) & PCI_MSIX_FLAGS_QSIZE
            table_bir, table_offset = SIM_MSIX_TABLE
            pba_bir, pba_offset = SIM_MSIX_PBA
            struct.pack_into(
                "<BBHII",
                header,
                SIM_MSIX_CAP,
                PCI_CAP_ID_MSIX,
                0,  # the last capability
                qsize,
                table_offset | table_bir,
                pba_offset | pba_bir,
            )
        else:
            header[PCI_CAPABILITY_LIST] = 0
            struct.pack_into("<H", header, PCI_STATUS, 0)
        return bytes(header)
