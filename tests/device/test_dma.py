"""DMA memory (sealed memfds) and the IOVA allocator; the simulated IOMMU's own rules."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct

import pytest

from irqd.device.dma import IOVA_FLOOR, DmaMemory, IovaAllocator, IovaError
from irqd.device.iommu import SIM_IOMMU_INFO, IommuInfo, SimIommu, parse_iommu_info
from irqd.device.regions import SimRegions, parse_sparse_mmap

PAGE = 4096
MSI_WINDOW = (0xFEE0_0000, 0xFEEF_FFFF)


def test_memory_is_sealed_against_resizing() -> None:
    mem = DmaMemory(2 * PAGE)
    try:
        seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
        assert seals == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, PAGE)
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 4 * PAGE)
        with pytest.raises(PermissionError):
            fcntl.fcntl(mem.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        mem.close()


def test_memory_is_shared_with_whoever_maps_the_fd() -> None:
    mem = DmaMemory(PAGE)
    fd = mem.take_fd()
    try:
        with mmap.mmap(fd, PAGE, mmap.MAP_SHARED) as theirs:
            theirs[0:5] = b"hello"
            # The daemon's mapping sees the client's write: it is the same memory.
            assert ctypes.string_at(mem.vaddr, 5) == b"hello"
        assert mem.fd == -1
        with pytest.raises(ValueError):
            mem.take_fd()
    finally:
        os.close(fd)
        mem.close()
        mem.close()  # idempotent


def test_hugepages_fall_back_to_normal_pages() -> None:
    # Most test machines reserve no huge pages; either way the memory works.
    mem = DmaMemory(2 * 1024 * 1024, hugepages=True)
    try:
        assert mem.vaddr and mem.size == 2 * 1024 * 1024
        assert os.fstat(mem.fd).st_size == mem.size
    finally:
        mem.close()
    small = DmaMemory(PAGE, hugepages=True)  # not a multiple of a huge page
    assert not small.hugepages
    small.close()


def allocator() -> IovaAllocator:
    return IovaAllocator(SIM_IOMMU_INFO.ranges, PAGE)


def test_first_fit_skips_the_floor_and_used_blocks() -> None:
    a = allocator()
    first = a.allocate(PAGE)
    assert first == IOVA_FLOOR
    second = a.allocate(2 * PAGE)
    assert second == first + PAGE
    a.release(first, PAGE)
    assert a.allocate(PAGE) == first  # the hole is reused
    assert a.allocate(PAGE) == second + 2 * PAGE


def test_alignment_and_iova_max() -> None:
    a = allocator()
    a.allocate(PAGE)
    huge = a.allocate(2 << 20, align=2 << 20)
    assert huge % (2 << 20) == 0
    # A 28-bit DMA mask: nothing above 256 MiB.
    limit = (1 << 28) - 1
    iova = a.allocate(1 << 20, iova_max=limit)
    assert iova + (1 << 20) - 1 <= limit
    with pytest.raises(IovaError, match="iova_max"):
        a.allocate(1 << 28, iova_max=limit)


def test_never_across_the_msi_window() -> None:
    a = allocator()
    # Fill the first range up to just below the MSI window.
    a.reserve(IOVA_FLOOR, MSI_WINDOW[0] - 0x10_0000 - IOVA_FLOOR)
    iova = a.allocate(2 << 20)
    assert iova >= MSI_WINDOW[1] + 1  # did not straddle the window
    assert not (iova <= MSI_WINDOW[1] and iova + (2 << 20) > MSI_WINDOW[0])


def test_reserve_checks_alignment_ranges_overlap() -> None:
    a = allocator()
    assert a.reserve(0x100000, PAGE) == 0x100000
    with pytest.raises(IovaError, match="overlaps"):
        a.reserve(0x100000, PAGE)
    with pytest.raises(IovaError, match="not aligned"):
        a.reserve(0x200800, PAGE)
    with pytest.raises(IovaError, match=r"outside .*0xfef00000"):
        a.reserve(MSI_WINDOW[0], PAGE)
    with pytest.raises(IovaError, match="iova_max"):
        a.reserve(0x300000, PAGE, iova_max=0x300000)
    assert a.used == [(0x100000, PAGE)]


def test_sim_iommu_follows_vfio_dma_do_map() -> None:
    iommu = SimIommu(IommuInfo(PAGE, ((0, 0xFFFF_FFFF),), dma_avail=2))
    iommu.map(0x7000_0000, 0x10000, 2 * PAGE)
    with pytest.raises(OSError) as exc:
        iommu.map(0x7100_0000, 0x11000, PAGE)
    assert exc.value.errno == errno.EEXIST
    iommu.map(0x7100_0000, 0x20000, PAGE)
    with pytest.raises(OSError) as exc:
        iommu.map(0x7200_0000, 0x30000, PAGE)  # dma_avail exhausted
    assert exc.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as exc:
        iommu.unmap(0x10000, PAGE)  # half a mapping
    assert exc.value.errno == errno.EINVAL
    assert iommu.unmap(0, 0x100000) == 3 * PAGE  # everything inside the range
    iommu.fail_next_map = errno.ENOMEM
    with pytest.raises(OSError) as exc:
        iommu.map(0x7000_0000, 0x10000, PAGE)
    assert exc.value.errno == errno.ENOMEM
    assert iommu.mappings == {}
    with pytest.raises(OSError) as exc:
        iommu.map(0x7000_0000, 0x1_0000_0000, PAGE)  # beyond the aperture
    assert exc.value.errno == errno.EINVAL


def test_iommu_info_capability_chain() -> None:
    # vfio_iommu_type1_info (24 bytes), then IOVA_RANGE at 24 (16 + 2 * 16) -> DMA_AVAIL at 72.
    buf = bytearray(84)
    struct.pack_into("=IIQII", buf, 0, 84, 3, PAGE | (1 << 21), 24, 0)
    struct.pack_into("=HHIII", buf, 24, 1, 1, 72, 2, 0)
    struct.pack_into("=QQQQ", buf, 40, 0, 0xFEDFFFFF, 0xFEF00000, 0x7FFFFFFFFF)
    struct.pack_into("=HHII", buf, 72, 3, 1, 0, 65535)
    info = parse_iommu_info(PAGE | (1 << 21), bytes(buf), 24)
    assert info == IommuInfo(PAGE | (1 << 21), ((0, 0xFEDFFFFF), (0xFEF00000, 0x7FFFFFFFFF)), 65535)
    assert info.page_size == PAGE
    # A chain that loops on itself ends instead of hanging.
    struct.pack_into("=HHI", buf, 72, 3, 1, 24)
    assert parse_iommu_info(PAGE, bytes(buf), 24).dma_avail == 65535


def test_sparse_mmap_capability() -> None:
    buf = bytearray(32 + 16 + 32)
    struct.pack_into("=HHIII", buf, 32, 1, 1, 0, 2, 0)
    struct.pack_into("=QQQQ", buf, 48, 0, 0x2000, 0x3000, 0x1000)
    assert parse_sparse_mmap(bytes(buf), 32) == [(0, 0x2000), (0x3000, 0x1000)]
    assert parse_sparse_mmap(bytes(buf), 0) == []


def test_sim_regions_look_like_a_vfio_device_fd() -> None:
    layout = SimRegions(msix_vectors=8)
    try:
        by_name = {r.name: r for r in layout.regions}
        assert by_name["bar0"].offset == 0
        assert by_name["config"].offset == 7 << 40
        header = os.pread(layout.fd, 0x50, by_name["config"].offset)
        vendor, device = (
            int.from_bytes(header[0:2], "little"),
            int.from_bytes(header[2:4], "little"),
        )
        assert (vendor, device) == (0x1B36, 0x0005)
        # The MSI-X capability: table size 8, table in BAR2 at 0x1000 (the sparse hole).
        assert header[0x34] == 0x40 and header[0x40] == 0x11
        assert int.from_bytes(header[0x42:0x44], "little") == 7
        assert int.from_bytes(header[0x44:0x48], "little") == 0x1000 | 2
        assert by_name["bar2"].sparse == ((0, 0x1000),)
        os.pwrite(layout.fd, b"\xff" * 4, by_name["bar0"].offset + 16)
        layout.reset()
        assert os.pread(layout.fd, 4, by_name["bar0"].offset + 16) == bytes(4)
        assert os.pread(layout.fd, 0x50, by_name["config"].offset) == header  # kept
    finally:
        layout.close()
