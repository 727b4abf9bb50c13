"""The container's IOMMU as the daemon sees it: page sizes, usable IOVA ranges, mappings.

:class:`IommuInfo` is what ``VFIO_IOMMU_GET_INFO`` reports (type1,
include/uapi/linux/vfio.h): a bitmap of page sizes, the usable IOVA ranges
(the ``IOVA_RANGE`` capability: the IOMMU's aperture minus non-relaxable
reserved regions such as the MSI window; a map elsewhere is ``EINVAL``) and
how many more mappings the kernel allows (``DMA_AVAIL``, the module
parameter ``dma_entry_limit``, 65535 by default).

:class:`SimIommu` models ``VFIO_IOMMU_MAP_DMA``/``UNMAP_DMA`` of the type1
driver (``vfio_dma_do_map``/``vfio_dma_do_unmap`` in
drivers/vfio/vfio_iommu_type1.c, 6.1 and 6.12) for the simulated device, with
the kernel's checks in the kernel's order and its errnos.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import Final

from . import vfio_ioctl as io

__all__ = ["SIM_IOMMU_INFO", "IommuInfo", "SimIommu", "parse_iommu_info"]

_NR = struct.Struct("=II")  # nr_iovas, reserved
_RANGE = struct.Struct("=QQ")  # start, end (inclusive)
_AVAIL = struct.Struct("=I")


@dataclass(frozen=True)
class IommuInfo:
    """Page sizes, usable IOVA ranges (inclusive ends) and mappings still allowed."""

    #: Bitmap of the page sizes the IOMMU supports (bit N: 2**N bytes).
    page_sizes: int
    #: ``(start, end)`` pairs, end inclusive, sorted; every IOVA a map may use.
    ranges: tuple[tuple[int, int], ...]
    #: How many more mappings the kernel allows; ``None`` if it does not say (pre-5.10).
    dma_avail: int | None = None

    @property
    def page_size(self) -> int:
        """The smallest page size: the granule of every IOVA, size and vaddr."""
        sizes = self.page_sizes or os.sysconf("SC_PAGE_SIZE")
        return sizes & -sizes

    def usable(self, iova: int, size: int) -> bool:
        """Whether ``[iova, iova + size)`` lies inside one usable range."""
        last = iova + size - 1
        return size > 0 and any(start <= iova and last <= end for start, end in self.ranges)

    def describe_ranges(self) -> str:
        """The usable ranges as text, for error messages."""
        return ", ".join(f"{start:#x}-{end:#x}" for start, end in self.ranges) or "none"

    def to_wire(self) -> dict[str, object]:
        """The info as msgpack-able data."""
        return {
            "page_sizes": self.page_sizes,
            "ranges": [[start, end] for start, end in self.ranges],
            "dma_avail": self.dma_avail,
        }


#: Without the IOVA-range capability (kernels before 5.4) the whole 64-bit space is offered.
_ALL_IOVAS: Final = ((0, 2**64 - 1),)


def parse_iommu_info(pgsizes: int, buf: bytes, cap_offset: int) -> IommuInfo:
    """An :class:`IommuInfo` from the answer of ``VFIO_IOMMU_GET_INFO``."""
    ranges: list[tuple[int, int]] | None = None
    avail: int | None = None
    for cap in io.info_caps(buf, cap_offset):
        if cap.id == io.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            count, _ = _NR.unpack_from(buf, cap.body)
            first = cap.body + _NR.size
            count = min(count, max(0, (len(buf) - first) // _RANGE.size))
            ranges = [_RANGE.unpack_from(buf, first + i * _RANGE.size) for i in range(count)]
        elif cap.id == io.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
            (avail,) = _AVAIL.unpack_from(buf, cap.body)
    return IommuInfo(
        page_sizes=pgsizes,
        ranges=tuple(sorted(ranges)) if ranges is not None else _ALL_IOVAS,
        dma_avail=avail,
    )


#: What QEMU's emulated Intel IOMMU (q35, intel-iommu) reports under Linux 6.1 and
#: 6.12 (docs/protocol.md, "DMA memory"): 4K|2M|1G pages, 39-bit IOVAs minus the MSI window
#: 0xfee00000-0xfeefffff, 65535 mappings (vfio_iommu_type1's ``dma_entry_limit``).
SIM_IOMMU_INFO: Final = IommuInfo(
    page_sizes=(1 << 12) | (1 << 21) | (1 << 30),
    ranges=((0, 0xFEDF_FFFF), (0xFEF0_0000, 0x7F_FFFF_FFFF)),
    dma_avail=65535,
)


def _fail(code: int, detail: str | None = None) -> OSError:
    return OSError(code, detail or os.strerror(code))


class SimIommu:
    """A type1 IOMMU's mapping table, with the kernel's checks and errnos.

    ``fail_next_map``/``fail_next_unmap``: an errno the next map/unmap fails
    with after passing every check, as when the kernel cannot pin the pages
    (``ENOMEM`` over ``RLIMIT_MEMLOCK``) or the IOMMU driver fails; one-shot.
    """

    def __init__(self, info: IommuInfo = SIM_IOMMU_INFO) -> None:
        self._info = info
        #: iova -> (size, vaddr) of every mapping.
        self.mappings: dict[int, tuple[int, int]] = {}
        self.fail_next_map: int | None = None
        self.fail_next_unmap: int | None = None

    def info(self) -> IommuInfo:
        """``VFIO_IOMMU_GET_INFO``: ``dma_avail`` counts down with each mapping."""
        avail = self._info.dma_avail
        left = None if avail is None else avail - len(self.mappings)
        return IommuInfo(self._info.page_sizes, self._info.ranges, left)

    def map(self, vaddr: int, iova: int, size: int) -> None:
        """``vfio_dma_do_map`` (read and write)."""
        mask = self._info.page_size - 1
        if size == 0 or (size | iova | vaddr) & mask:
            raise _fail(errno.EINVAL)
        if iova + size - 1 >= 2**64 or vaddr + size - 1 >= 2**64:
            raise _fail(errno.EINVAL)  # the kernel's overflow checks
        if any(
            self._overlaps(iova, size, start, length)
            for start, (length, _) in self.mappings.items()
        ):
            raise _fail(errno.EEXIST)  # vfio_find_dma
        avail = self._info.dma_avail
        if avail is not None and len(self.mappings) >= avail:
            raise _fail(errno.ENOSPC)  # !iommu->dma_avail
        if not self._info.usable(iova, size):
            raise _fail(errno.EINVAL)  # !vfio_iommu_iova_dma_valid
        if self.fail_next_map is not None:
            code, self.fail_next_map = self.fail_next_map, None
            raise _fail(code)
        self.mappings[iova] = (size, vaddr)

    def unmap(self, iova: int, size: int) -> int:
        """``vfio_dma_do_unmap`` (type1v2): every mapping inside the range goes; one
        that straddles its start or end is ``EINVAL``. Returns the bytes unmapped."""
        mask = self._info.page_size - 1
        if (iova | size) & mask or size == 0 or iova + size - 1 >= 2**64:
            raise _fail(errno.EINVAL)
        inside = []
        for start, (length, _) in self.mappings.items():
            if not self._overlaps(iova, size, start, length):
                continue
            if start < iova or start + length > iova + size:
                raise _fail(errno.EINVAL)  # v2: no splitting a mapping
            inside.append(start)
        if self.fail_next_unmap is not None:
            code, self.fail_next_unmap = self.fail_next_unmap, None
            raise _fail(code)
        unmapped = 0
        for start in inside:
            length, _ = self.mappings.pop(start)
            unmapped += length
        return unmapped

    @staticmethod
    def _overlaps(iova: int, size: int, start: int, length: int) -> bool:
        return iova < start + length and start < iova + size
