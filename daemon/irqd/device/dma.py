"""DMA memory for clients: sealed memfds mapped in the daemon, and an IOVA allocator.

A buffer is a memfd the daemon creates, sizes and seals against shrinking and
growing (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``, memfd_create(2)): the
client gets the fd and maps it, the daemon maps it too and gives that address
to ``VFIO_IOMMU_MAP_DMA``, which pins the pages. Without the seals a client
could truncate the file under the pinned mapping, and the daemon's own
mapping would then fault on its next access (SIGBUS).

The daemon's mapping is made with ``mmap(2)`` through ctypes rather than
Python's ``mmap``: the daemon never reads the memory, it needs only the
address, and a Python ``mmap`` cannot give its address without exporting a
buffer that then blocks closing it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from bisect import insort
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

__all__ = ["HUGE_PAGE_SIZE", "IOVA_FLOOR", "DmaMemory", "IovaAllocator", "IovaError"]

#: The x86-64 huge page size that ``MFD_HUGETLB`` gives by default (the system's
#: default hugepagesz); a huge-page buffer is sized and aligned to it.
HUGE_PAGE_SIZE: Final = 2 * 1024 * 1024

#: IOVAs below this are not handed out unless asked for by address: a device
#: that DMAs to a zeroed (uninitialized) address then faults in the IOMMU
#: instead of hitting a buffer. libvfn keeps the same floor (``__VFN_IOVA_MIN``).
IOVA_FLOOR: Final = 0x10000

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
#: mmap(2)'s MAP_FAILED, ``(void *) -1``, as ctypes returns it.
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


class DmaMemory:
    """One sealed memfd of ``size`` bytes, mapped shared in the daemon at ``vaddr``.

    Huge pages (``MFD_HUGETLB``) when asked and the system has them reserved,
    else normal pages; ``hugepages`` says which it got. ``close`` unmaps and
    closes; it must come after ``VFIO_IOMMU_UNMAP_DMA``.
    """

    def __init__(self, size: int, *, name: str = "irqd-dma", hugepages: bool = False) -> None:
        """Create, size, seal and map the memfd; ``OSError`` leaves nothing behind."""
        self.size = size
        self.fd = -1
        self.vaddr = 0
        self.hugepages = False
        if hugepages and size % HUGE_PAGE_SIZE == 0:
            with contextlib.suppress(OSError):
                self._create(name, os.MFD_HUGETLB)
                self.hugepages = True
        if not self.hugepages:
            self._create(name, 0)

    def _create(self, name: str, extra: int) -> None:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | extra)
        try:
            os.ftruncate(fd, self.size)
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
            # Huge pages are taken from the reserved pool here, so a system
            # without any fails now (ENOMEM) rather than at the first touch.
            address = _mmap(
                None, self.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0
            )
            if address is None or address == _MAP_FAILED:
                _raise_mmap_error()
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.vaddr = fd, int(address)

    def take_fd(self) -> int:
        """Hand the memfd over (to be sent to the client); the mapping keeps the memory.

        The daemon then holds no fd per buffer, only its mapping.
        """
        fd, self.fd = self.fd, -1
        if fd < 0:
            raise ValueError("the memfd was already handed over")
        return fd

    def close(self) -> None:
        """Unmap and close what is still held; idempotent."""
        vaddr, self.vaddr = self.vaddr, 0
        if vaddr:
            _munmap(vaddr, self.size)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"<DmaMemory fd={self.fd} size={self.size:#x} hugepages={self.hugepages}>"


class IovaError(ValueError):
    """No IOVA can be given as asked; the message names the usable ranges."""


@dataclass
class IovaAllocator:
    """First-fit allocation of IOVA ranges inside the IOMMU's usable ranges.

    ``ranges`` are ``(start, end)`` with inclusive ends, as the kernel reports
    them. Every block is aligned to ``align`` (at least the IOMMU page size),
    never crosses from one usable range into another, and never overlaps
    another block.
    """

    ranges: Sequence[tuple[int, int]]
    #: The IOMMU's smallest page size.
    page_size: int = 4096

    def __post_init__(self) -> None:
        #: Sorted ``(start, size)`` of every block handed out.
        self._used: list[tuple[int, int]] = []

    def describe(self) -> str:
        """The usable ranges, for error messages."""
        return ", ".join(f"{s:#x}-{e:#x}" for s, e in self.ranges) or "none"

    def reserve(self, iova: int, size: int, *, iova_max: int | None = None) -> int:
        """Take ``[iova, iova + size)`` as asked; :class:`IovaError` if it cannot be had."""
        last = iova + size - 1
        if iova % self.page_size:
            raise IovaError(
                f"iova {iova:#x} is not aligned to the IOMMU page size {self.page_size:#x}"
            )
        if iova_max is not None and last > iova_max:
            raise IovaError(f"iova {iova:#x}-{last:#x} ends above iova_max {iova_max:#x}")
        if not any(start <= iova and last <= end for start, end in self.ranges):
            raise IovaError(
                f"iova {iova:#x}-{last:#x} is outside the IOMMU's usable ranges ({self.describe()})"
            )
        for start, length in self._used:
            if iova < start + length and start <= last:
                raise IovaError(
                    f"iova {iova:#x}-{last:#x} overlaps a mapping at "
                    f"{start:#x}-{start + length - 1:#x}"
                )
        insort(self._used, (iova, size))
        return iova

    def allocate(self, size: int, *, align: int | None = None, iova_max: int | None = None) -> int:
        """The lowest free, aligned IOVA for ``size`` bytes at or below ``iova_max``."""
        align = max(align or self.page_size, self.page_size)
        for start, range_end in self.ranges:
            end = range_end if iova_max is None else min(range_end, iova_max)
            candidate = _align_up(max(start, IOVA_FLOOR), align)
            for used_start, used_size in self._used:
                if used_start + used_size <= candidate:
                    continue
                if candidate + size <= used_start:
                    break
                candidate = _align_up(used_start + used_size, align)
            if candidate + size - 1 <= end:
                insort(self._used, (candidate, size))
                return candidate
        bound = f" at or below iova_max {iova_max:#x}" if iova_max is not None else ""
        raise IovaError(
            f"no free IOVA range of {size:#x} bytes{bound} in the IOMMU's usable ranges "
            f"({self.describe()})"
        )

    def release(self, iova: int, size: int) -> None:
        """Give a block back; one never handed out is ignored."""
        with contextlib.suppress(ValueError):
            self._used.remove((iova, size))

    @property
    def used(self) -> list[tuple[int, int]]:
        """``(iova, size)`` of every block handed out, in IOVA order."""
        return list(self._used)


def _raise_mmap_error() -> NoReturn:
    code = ctypes.get_errno() or errno.ENOMEM
    raise OSError(code, f"mmap of the DMA memfd: {os.strerror(code)}")


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align
