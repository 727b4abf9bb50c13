"""The conformance suite's ``vfio`` backend: a real ivshmem-doorbell device.

Used inside the VM guest (tests/vm/guest/main.py runs ``pytest tests/device``
with ``IRQD_DEVICE_BACKEND=vfio`` and ``IRQD_VFIO_BDF``). The device is QEMU's
``ivshmem-doorbell`` behind vfio-pci; it raises MSI-X vector V on itself when
``own_id << 16 | V`` is written to its DOORBELL register (BAR0 + 12; own id in
IVPOSITION, BAR0 + 8; QEMU docs/specs/ivshmem-spec.rst).

A doorbell write reaches the guest asynchronously (QEMU's main loop reads the
vector's eventfd and sends the MSI-X message), and two writes that QEMU reads
at once become one message. So ``raise_interrupt`` raises one at a time and
waits until the kernel counted it in ``/proc/interrupts``
(``vfio-msix[V](BDF)``). A vector with no handler (de-assigned, or MSI-X
disabled) has no line there: nothing to wait on, so it gives QEMU a short
while to consume the doorbell before going on.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from irqd.device import IrqIndex
from irqd.device.vfio import VfioDevice

from .harness import DeviceShape, Harness

# QEMU docs/specs/ivshmem-spec.rst: BAR0 register offsets.
IVPOSITION = 8
DOORBELL = 12

#: How long to wait for one interrupt to be counted before failing.
DELIVERY_DEADLINE = 5.0
#: The time QEMU gets to consume a doorbell that nothing in the guest can see.
UNOBSERVABLE_SETTLE = 0.05


def bdf() -> str:
    value = os.environ.get("IRQD_VFIO_BDF")
    if not value:
        pytest.fail("IRQD_DEVICE_BACKEND=vfio needs IRQD_VFIO_BDF (a device bound to vfio-pci)")
    return value


def device_shape(device: VfioDevice) -> DeviceShape:
    """The shape the real device has."""
    info = device.all_irq_info()
    return DeviceShape(
        msix_vectors=info[IrqIndex.MSIX].count,
        noresize=info[IrqIndex.MSIX].noresize,
        msi_vectors=info[IrqIndex.MSI].count,
        intx=info[IrqIndex.INTX].count > 0,
        pcie=info[IrqIndex.ERR].count > 0,
    )


def msix_interrupt_count(address: str, vector: int) -> int | None:
    """The kernel's count for one vfio MSI-X vector, ``None`` without a handler."""
    name = f"vfio-msix[{vector}]({address})"
    with open("/proc/interrupts") as f:
        cpus = len(f.readline().split())
        for line in f:
            fields = line.split()
            if fields and fields[-1] == name:
                return sum(int(x) for x in fields[1 : 1 + cpus])
    return None


class VfioHarness(Harness):
    """The real device; the hardware side is the ivshmem doorbell."""

    def __init__(self, shape: DeviceShape) -> None:
        self.address = bdf()
        self.vfio = VfioDevice(self.address)
        self.device = self.vfio
        real = device_shape(self.vfio)
        if shape != real:
            self.vfio.close()
            pytest.skip(f"the real device is {real}, not {shape}")
        self.shape = real
        # MSI-X messages are DMA writes: dropped while bus mastering is off.
        self.vfio.set_bus_master(True)
        self.bar0 = self.vfio.region_info(0)
        (self.own_id,) = struct.unpack("<I", self.vfio.region_read(self.bar0, IVPOSITION, 4))

    def raise_interrupt(self, index: IrqIndex, vector: int, n: int = 1) -> None:
        if index is not IrqIndex.MSIX:
            pytest.skip(f"ivshmem-doorbell raises only MSI-X, not {index.wire_name}")
        for _ in range(n):
            before = msix_interrupt_count(self.address, vector)
            self.vfio.region_write(
                self.bar0, DOORBELL, struct.pack("<I", self.own_id << 16 | vector)
            )
            if before is None:
                time.sleep(UNOBSERVABLE_SETTLE)
                continue
            deadline = time.monotonic() + DELIVERY_DEADLINE
            while (msix_interrupt_count(self.address, vector) or 0) <= before:
                if time.monotonic() > deadline:
                    pytest.fail(f"msix vector {vector}: doorbell not delivered in time")
                time.sleep(0.0005)


def vfio_backend(shape: DeviceShape) -> Harness:
    return VfioHarness(shape)


def vfio_dut_shape(noresize: bool) -> DeviceShape:
    """The real device's shape, if its kernel has this NORESIZE setting (else skip)."""
    device = VfioDevice(bdf())
    try:
        real = device_shape(device)
    finally:
        device.close()
    if real.noresize != noresize:
        kind = "sets" if real.noresize else "clears"
        pytest.skip(f"this kernel {kind} NORESIZE for MSI-X")
    return real
