"""Backends for the device conformance suite.

A backend is one factory function: ``DeviceShape -> Harness``. The harness owns
the device and knows how to make the hardware do things the ``Device``
interface cannot (raise an interrupt, drive the INTx line, ask for the device
back). The simulation does these directly; a real ``VfioDevice`` in a VM will
do them with doorbell writes to BAR0 (ivshmem) and return ``False`` /
``None`` for what it cannot do, and the tests that need it skip.

The backend is picked with ``IRQD_DEVICE_BACKEND`` (default ``sim``).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from irqd.device import Device, IrqIndex, SimDevice


@dataclass(frozen=True)
class DeviceShape:
    """What the device under test has. A backend that cannot provide a shape skips."""

    msix_vectors: int = 8
    noresize: bool = False
    msi_vectors: int = 1
    intx: bool = True
    pcie: bool = True
    #: Host vectors the platform can give the device; None for plenty.
    host_vector_limit: int | None = None


class Harness(abc.ABC):
    """A device under test and the hardware-side powers the suite needs."""

    device: Device
    shape: DeviceShape

    @abc.abstractmethod
    def raise_interrupt(self, index: IrqIndex, vector: int, n: int = 1) -> None:
        """Make the device raise ``vector`` ``n`` times, one after another
        (a real backend waits until each has been delivered or dropped)."""

    def set_intx_line(self, asserted: bool) -> bool:
        """Drive INTx; ``False`` when the backend cannot."""
        return False

    def request_release(self) -> bool:
        """Make the kernel ask for the device back (REQ); ``False`` when it cannot."""
        return False

    def host_vectors(self, index: IrqIndex) -> int | None:
        """Allocated host vectors, when the backend can tell."""
        return None

    def close(self) -> None:
        self.device.close()


class SimHarness(Harness):
    def __init__(self, shape: DeviceShape) -> None:
        self.shape = shape
        self.sim = SimDevice(
            msix_vectors=shape.msix_vectors,
            noresize=shape.noresize,
            msi_vectors=shape.msi_vectors,
            intx=shape.intx,
            pcie=shape.pcie,
            host_vector_limit=shape.host_vector_limit,
        )
        self.device = self.sim

    def raise_interrupt(self, index: IrqIndex, vector: int, n: int = 1) -> None:
        self.sim.raise_irq(index, vector, n)

    def set_intx_line(self, asserted: bool) -> bool:
        self.sim.set_intx_line(asserted)
        return True

    def request_release(self) -> bool:
        self.sim.request_release()
        return True

    def host_vectors(self, index: IrqIndex) -> int | None:
        return self.sim.host_vectors(index)


def sim_backend(shape: DeviceShape) -> Harness:
    return SimHarness(shape)


Backend = Callable[[DeviceShape], Harness]

#: Registered backends; ``vfio`` joins when the VM harness exists.
BACKENDS: dict[str, Backend] = {"sim": sim_backend}


def selected_backend() -> Backend:
    name = os.environ.get("IRQD_DEVICE_BACKEND", "sim")
    try:
        return BACKENDS[name]
    except KeyError:
        pytest.fail(f"unknown IRQD_DEVICE_BACKEND {name!r}; known: {sorted(BACKENDS)}")


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def take(fd: int) -> int:
    """The eventfd's counter, taken (0 when nothing is pending)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
