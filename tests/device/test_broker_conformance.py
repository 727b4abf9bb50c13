"""Conformance of what the device broker builds on: regions, the device fd, reset, the IOMMU.

Runs on every backend like test_conformance.py: the simulation here, the real
vfio-pci device in the VM (tests/vm/guest runs ``pytest tests/device`` with
the vfio backend). Rules: ``VFIO_DEVICE_GET_REGION_INFO`` and
``VFIO_DEVICE_RESET`` (drivers/vfio/pci/vfio_pci_core.c), ``VFIO_IOMMU_GET_INFO``,
``MAP_DMA`` and ``UNMAP_DMA`` (``vfio_dma_do_map``/``vfio_dma_do_unmap`` in
drivers/vfio/vfio_iommu_type1.c), include/uapi/linux/vfio.h.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from irqd.device.base import ResetUnsupportedError
from irqd.device.dma import DmaMemory, IovaAllocator
from irqd.device.iommu import IommuInfo

from .harness import Harness

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def memory() -> Iterator[DmaMemory]:
    """Two pages of sealed memfd memory, mapped in this process."""
    mem = DmaMemory(2 * PAGE, name="conformance")
    yield mem
    mem.close()


def first_free_iova(info: IommuInfo, size: int) -> int:
    return IovaAllocator(info.ranges, max(info.page_size, PAGE)).allocate(size)


def test_regions_describe_the_device_fd(dut: Harness) -> None:
    regions = {r.name: r for r in dut.device.regions()}
    assert "config" in regions
    config = regions["config"]
    assert config.size >= 256 and config.read and config.write and not config.mmap
    bars = [r for r in regions.values() if r.name.startswith("bar")]
    assert bars, "a device under test has at least one BAR"
    offsets = [r.offset for r in regions.values()]
    assert len(set(offsets)) == len(offsets)
    for region in regions.values():
        assert region.size > 0
        assert region.offset % PAGE == 0
        for start, size in region.sparse:
            assert start % PAGE == 0 and size > 0 and start + size <= region.size
        wire = region.to_wire()
        assert wire["name"] == region.name and wire["offset"] == region.offset


def test_config_space_reads_through_the_device_fd(dut: Harness) -> None:
    config = next(r for r in dut.device.regions() if r.name == "config")
    fd = dut.device.device_fd()
    vendor, device_id = struct.unpack("<HH", os.pread(fd, 4, config.offset))
    assert vendor not in (0, 0xFFFF)
    assert device_id != 0xFFFF
    (command,) = struct.unpack("<H", os.pread(fd, 2, config.offset + 4))
    assert command != 0xFFFF


def test_a_mappable_bar_maps(dut: Harness) -> None:
    fd = dut.device.device_fd()
    for region in dut.device.regions():
        if region.name.startswith("bar") and region.mmap:
            start, size = region.sparse[0] if region.sparse else (0, region.size)
            size = min(size, PAGE)
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=region.offset + start)
            mapped.close()
            return
    pytest.skip("the device has no mappable BAR")


def test_reset_works_or_says_enodev(dut: Harness) -> None:
    if dut.device.resettable:
        dut.device.reset()
        dut.device.reset()  # again: a reset is repeatable
    else:
        with pytest.raises(ResetUnsupportedError) as exc:
            dut.device.reset()
        assert exc.value.errno == errno.ENODEV


def test_iommu_info(dut: Harness) -> None:
    info = dut.device.iommu_info()
    assert info.page_sizes & PAGE, "the CPU's page size is one the IOMMU maps"
    assert info.ranges == tuple(sorted(info.ranges))
    for (_, end), (start, _) in zip(info.ranges, info.ranges[1:], strict=False):
        assert end < start
    assert info.dma_avail is None or info.dma_avail > 0


def test_map_and_unmap(dut: Harness, memory: DmaMemory) -> None:
    device = dut.device
    info = device.iommu_info()
    iova = first_free_iova(info, memory.size)
    device.dma_map(memory.vaddr, iova, memory.size)
    try:
        if info.dma_avail is not None:
            assert device.iommu_info().dma_avail == info.dma_avail - 1
        # The same IOVA again, or overlapping it: EEXIST (vfio_find_dma).
        with pytest.raises(OSError) as exc:
            device.dma_map(memory.vaddr, iova + PAGE, PAGE)
        assert exc.value.errno == errno.EEXIST
        # type1v2 never splits a mapping: unmapping half of it is EINVAL.
        with pytest.raises(OSError) as exc:
            device.dma_unmap(iova, PAGE)
        assert exc.value.errno == errno.EINVAL
    finally:
        assert device.dma_unmap(iova, memory.size) == memory.size
    assert device.dma_unmap(iova, memory.size) == 0  # nothing left there
    if info.dma_avail is not None:
        assert device.iommu_info().dma_avail == info.dma_avail


@pytest.mark.parametrize(
    ("vaddr_off", "iova_off", "size"),
    [(0, 0, 0), (0, 0, 100), (0, 512, PAGE), (512, 0, PAGE)],
    ids=["size-0", "size-unaligned", "iova-unaligned", "vaddr-unaligned"],
)
def test_map_refuses_what_is_not_page_aligned(
    dut: Harness, memory: DmaMemory, vaddr_off: int, iova_off: int, size: int
) -> None:
    iova = first_free_iova(dut.device.iommu_info(), memory.size)
    with pytest.raises(OSError) as exc:
        dut.device.dma_map(memory.vaddr + vaddr_off, iova + iova_off, size)
    assert exc.value.errno == errno.EINVAL


def test_map_outside_the_usable_ranges_is_einval(dut: Harness, memory: DmaMemory) -> None:
    info = dut.device.iommu_info()
    gaps = [
        (end + 1, start) for (_, end), (start, _) in zip(info.ranges, info.ranges[1:], strict=False)
    ]
    last_end = info.ranges[-1][1]
    if gaps:
        iova = gaps[0][0]  # e.g. the MSI window
    elif last_end < 2**64 - 1 - PAGE:
        iova = (last_end + 1 + PAGE - 1) // PAGE * PAGE
    else:
        pytest.skip("the IOMMU reports the whole IOVA space as usable")
    with pytest.raises(OSError) as exc:
        dut.device.dma_map(memory.vaddr, iova, PAGE)
    assert exc.value.errno == errno.EINVAL
