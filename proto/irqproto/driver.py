"""A userspace driver's side of the device broker: mapped BARs, config space, DMA buffers.

Built on the plain results of the clients' ``device_open`` and ``dma_alloc``,
so it works with the blocking client (:meth:`DeviceAccess.open`,
:func:`dma_alloc`) and the Trio client (:meth:`DeviceAccess.aopen`,
:func:`adma_alloc`) alike. It does file I/O and ``mmap``, so it lives outside
the sans-IO core.

Register access:

* A BAR is ``mmap``-ed where the region allows it (``mmap``), area by area when
  the kernel reports a sparse-mmap capability (the holes are typically the
  MSI-X table, which only the kernel may touch); elsewhere, and for regions
  that cannot be mapped, accesses fall back to ``pread``/``pwrite`` on the
  device fd at the region's offset.
* Every access is 32 bits wide, through a ``memoryview`` cast to ``I`` so that
  the CPU issues one 4-byte load or store (a byte-wise copy could split a
  register access). 64-bit registers are two 32-bit halves, low first: Linux
  6.1 splits an 8-byte ``pread`` of a BAR into two 4-byte accesses anyway, and
  many devices (NVMe's CAP, ASQ, ACQ) define their 64-bit registers that way.
* Config space is read and written with ``pread``/``pwrite`` (the kernel
  virtualizes it; it is never mappable), little endian as PCI defines it.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from .blocking import Client
    from .trio_client import TrioClient

__all__ = [
    "PCI_COMMAND",
    "PCI_COMMAND_MASTER",
    "PCI_COMMAND_MEMORY",
    "Bar",
    "DeviceAccess",
    "DmaBuffer",
    "Region",
    "adma_alloc",
    "dma_alloc",
]

#: include/uapi/linux/pci_regs.h: the 16-bit COMMAND register and two of its bits.
PCI_COMMAND: Final = 0x04
PCI_COMMAND_MEMORY: Final = 0x2
PCI_COMMAND_MASTER: Final = 0x4

_CONFIG_FORMATS: Final = {1: "<B", 2: "<H", 4: "<I"}


@dataclass(frozen=True)
class Region:
    """One region of the device fd, as ``device.regions`` describes it."""

    index: int
    name: str
    size: int
    offset: int
    readable: bool
    writable: bool
    mappable: bool
    #: The mmappable ``(offset, size)`` areas within the region, when the kernel
    #: reports a sparse-mmap capability; empty means the whole region (if ``mappable``).
    sparse: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_wire(cls, item: Mapping[str, Any]) -> Region:
        """Build a region from one item of a ``device.regions`` result."""
        return cls(
            index=int(item["index"]),
            name=str(item["name"]),
            size=int(item["size"]),
            offset=int(item["offset"]),
            readable=bool(item["read"]),
            writable=bool(item["write"]),
            mappable=bool(item["mmap"]),
            sparse=[(int(off), int(size)) for off, size in item.get("sparse", [])],
        )

    def mmap_areas(self) -> list[tuple[int, int]]:
        """The ``(offset, size)`` areas that may be mapped; none if not ``mappable``."""
        if not self.mappable or self.size == 0:
            return []
        return list(self.sparse) if self.sparse else [(0, self.size)]


class Bar:
    """A mapped BAR (or the ``pread``/``pwrite`` fallback) with 32-bit register access."""

    def __init__(self, fd: int, region: Region) -> None:
        """Map what ``region`` allows of the device fd ``fd`` (which stays the caller's)."""
        self.region = region
        self.size = region.size
        self._fd = fd
        # (start, end, mmap, 32-bit view) per mapped area, by offset in the region.
        self._areas: list[tuple[int, int, mmap.mmap, memoryview]] = []
        prot = (mmap.PROT_READ if region.readable else 0) | (
            mmap.PROT_WRITE if region.writable else 0
        )
        try:
            for offset, size in region.mmap_areas():
                mapped = mmap.mmap(
                    fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=region.offset + offset
                )
                self._areas.append((offset, offset + size, mapped, memoryview(mapped).cast("I")))
        except BaseException:
            self.close()
            raise

    @property
    def mapped(self) -> list[tuple[int, int]]:
        """The ``(offset, size)`` areas accessed through ``mmap``."""
        return [(start, end - start) for start, end, _, _ in self._areas]

    def read32(self, offset: int) -> int:
        """The 32-bit register at ``offset`` (4-byte aligned)."""
        view = self._view(offset)
        if view is not None:
            words, start = view
            return int(words[(offset - start) >> 2])
        data = os.pread(self._fd, 4, self.region.offset + offset)
        if len(data) != 4:
            raise OSError(f"short read of {self.region.name} at {offset:#x}")
        return int(struct.unpack("<I", data)[0])

    def write32(self, offset: int, value: int) -> None:
        """Store ``value`` into the 32-bit register at ``offset`` (4-byte aligned)."""
        if not 0 <= value <= 0xFFFF_FFFF:
            raise ValueError(f"{value:#x} does not fit in 32 bits")
        view = self._view(offset)
        if view is not None:
            words, start = view
            words[(offset - start) >> 2] = value
            return
        written = os.pwrite(self._fd, struct.pack("<I", value), self.region.offset + offset)
        if written != 4:
            raise OSError(f"short write to {self.region.name} at {offset:#x}")

    def read64(self, offset: int) -> int:
        """A 64-bit register as two 32-bit reads, the low half first."""
        low = self.read32(offset)
        return low | self.read32(offset + 4) << 32

    def write64(self, offset: int, value: int) -> None:
        """A 64-bit register as two 32-bit writes, the low half first."""
        if not 0 <= value < 1 << 64:
            raise ValueError(f"{value:#x} does not fit in 64 bits")
        self.write32(offset, value & 0xFFFF_FFFF)
        self.write32(offset + 4, value >> 32)

    def close(self) -> None:
        """Unmap the BAR; idempotent. The device fd stays open."""
        areas, self._areas = self._areas, []
        for _, _, mapped, words in areas:
            words.release()
            mapped.close()

    def _view(self, offset: int) -> tuple[memoryview, int] | None:
        if offset % 4 or not 0 <= offset <= self.size - 4:
            raise ValueError(
                f"{self.region.name}: offset {offset:#x} is not a 4-byte register "
                f"inside its {self.size:#x} bytes"
            )
        for start, end, _, words in self._areas:
            if start <= offset and offset + 4 <= end:
                return words, start
        return None

    def __repr__(self) -> str:
        return f"<Bar {self.region.name} size={self.size:#x} mapped={self.mapped}>"


class _SyncDevice(Protocol):
    def device_open(self) -> tuple[list[dict[str, Any]], int]: ...


class _AsyncDevice(Protocol):
    async def device_open(self) -> tuple[list[dict[str, Any]], int]: ...


class DeviceAccess:
    """The device's regions through a dup of the daemon's VFIO device fd.

    Get one with :meth:`open` (blocking client) or :meth:`aopen` (Trio client);
    needs the ``drive`` permission. Close it (or use ``with``) to unmap every
    BAR and close the fd: the kernel asks for the device back (unbind) only
    once every reference to it is gone, mappings included.
    """

    def __init__(self, regions: list[dict[str, Any]], fd: int) -> None:
        """Take ownership of ``fd``, described by ``regions`` (a ``device.open`` result)."""
        self.fd = fd
        self.regions: dict[str, Region] = {}
        self._bars: dict[str, Bar] = {}
        try:
            for item in regions:
                region = Region.from_wire(item)
                self.regions[region.name] = region
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, client: Client | _SyncDevice) -> DeviceAccess:
        """``device.open`` through a blocking client."""
        regions, fd = client.device_open()
        return cls(regions, fd)

    @classmethod
    async def aopen(cls, client: TrioClient | _AsyncDevice) -> DeviceAccess:
        """``device.open`` through a Trio client."""
        regions, fd = await client.device_open()
        return cls(regions, fd)

    def bar(self, name: str) -> Bar:
        """The BAR (``bar0`` .. ``bar5``), mapped on first use and kept until :meth:`close`."""
        bar = self._bars.get(name)
        if bar is None:
            region = self.regions.get(name)
            if region is None:
                raise KeyError(f"the device has no region {name!r} (has {sorted(self.regions)})")
            bar = self._bars[name] = Bar(self._fd(), region)
        return bar

    def config_read(self, offset: int, size: int) -> int:
        """Read 1, 2 or 4 bytes of config space at ``offset`` (little endian)."""
        fmt = self._config_format(offset, size)
        data = os.pread(self._fd(), size, self._config().offset + offset)
        if len(data) != size:
            raise OSError(f"short config read at {offset:#x}")
        return int(struct.unpack(fmt, data)[0])

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write 1, 2 or 4 bytes of config space at ``offset`` (little endian)."""
        fmt = self._config_format(offset, size)
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"{value:#x} does not fit in {size} bytes")
        written = os.pwrite(self._fd(), struct.pack(fmt, value), self._config().offset + offset)
        if written != size:
            raise OSError(f"short config write at {offset:#x}")

    def enable_bus_master(self) -> None:
        """Set ``PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY`` in COMMAND.

        vfio-pci leaves bus mastering off after opening the device: without it
        the device can neither DMA nor send MSI/MSI-X messages (both are writes).
        """
        command = self.config_read(PCI_COMMAND, 2)
        wanted = command | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY
        if wanted != command:
            self.config_write(PCI_COMMAND, 2, wanted)

    def close(self) -> None:
        """Unmap every BAR and close the device fd; idempotent."""
        bars, self._bars = self._bars, {}
        for bar in bars.values():
            bar.close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> DeviceAccess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _fd(self) -> int:
        if self.fd < 0:
            raise ValueError("the device access is closed")
        return self.fd

    def _config(self) -> Region:
        region = self.regions.get("config")
        if region is None:
            raise KeyError("the device reports no config region")
        return region

    def _config_format(self, offset: int, size: int) -> str:
        fmt = _CONFIG_FORMATS.get(size)
        if fmt is None:
            raise ValueError(f"config accesses are 1, 2 or 4 bytes, not {size}")
        if offset % size or not 0 <= offset <= self._config().size - size:
            raise ValueError(f"config offset {offset:#x} is not an aligned {size}-byte field")
        return fmt


class DmaBuffer:
    """Memory the device can reach at ``iova``: the client's mapping of the daemon's memfd.

    ``mem`` is a writable ``memoryview`` of ``size`` bytes. :meth:`close` only
    unmaps it here; the device keeps its IOMMU mapping until ``dma_free(id)``
    or until the connection closes (stop the device's DMA first).
    """

    def __init__(self, result: Mapping[str, Any]) -> None:
        """Map the memfd of a ``dma_alloc`` result (the ``"fd"`` is taken over)."""
        fd = int(result["fd"])
        try:
            self.id = int(result["id"])
            self.iova = int(result["iova"])
            self.size = int(result["size"])
            self.name: str | None = result.get("name")
            self._map = mmap.mmap(
                fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            # The mapping holds the file; the fd itself is no longer needed.
            os.close(fd)
        self.mem = memoryview(self._map)

    def close(self) -> None:
        """Unmap the buffer in this process; idempotent. Views of ``mem`` must be released."""
        if not self._map.closed:
            self.mem.release()
            self._map.close()

    def __enter__(self) -> DmaBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DmaBuffer id={self.id} iova={self.iova:#x} size={self.size:#x}>"


class _SyncDma(Protocol):
    def dma_alloc(self, size: int, **opts: Any) -> dict[str, Any]: ...


class _AsyncDma(Protocol):
    async def dma_alloc(self, size: int, **opts: Any) -> dict[str, Any]: ...


def dma_alloc(client: Client | _SyncDma, size: int, **opts: Any) -> DmaBuffer:
    """``dma.alloc`` through a blocking client, mapped here; ``opts`` as ``Client.dma_alloc``."""
    return DmaBuffer(client.dma_alloc(size, **opts))


async def adma_alloc(client: TrioClient | _AsyncDma, size: int, **opts: Any) -> DmaBuffer:
    """``dma.alloc`` through a Trio client, mapped here; ``opts`` as ``TrioClient.dma_alloc``."""
    return DmaBuffer(await client.dma_alloc(size, **opts))
