"""Backends for the device conformance suite.

A backend is one factory function: ``DeviceShape -> Harness``. The harness owns
the device and knows how to make the hardware do things the ``Device``
interface cannot (raise an interrupt, drive the INTx line, ask for the device
back). The simulation does these directly; a real ``VfioDevice`` in a VM
(``vfio_harness.py``) does them with doorbell writes to BAR0 (ivshmem) and
returns ``False`` / ``None`` for what it cannot do, and the tests that need it
skip. A real device has one shape: asking it for another skips.

The backend is picked with ``IRQD_DEVICE_BACKEND`` (default ``sim``; ``vfio``
with ``IRQD_VFIO_BDF`` naming a device bound to vfio-pci, see tests/vm/).
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


def sim_dut_shape(noresize: bool) -> DeviceShape:
    return DeviceShape(msix_vectors=8, noresize=noresize)


@dataclass(frozen=True)
class Backend:
    """How to make a device of a shape, and the shape the ``dut`` fixture asks for."""

    make: Callable[[DeviceShape], Harness]
    #: The shape of the standard device under test, NORESIZE clear or set.
    dut_shape: Callable[[bool], DeviceShape]


def _vfio_backend() -> Backend:
    # Imported only when selected: it needs a real device (tests/vm/guest).
    from .vfio_harness import vfio_backend, vfio_dut_shape  # noqa: PLC0415

    return Backend(vfio_backend, vfio_dut_shape)


#: Registered backends, by ``IRQD_DEVICE_BACKEND``.
BACKENDS: dict[str, Callable[[], Backend]] = {
    "sim": lambda: Backend(sim_backend, sim_dut_shape),
    "vfio": _vfio_backend,
}


def selected_backend() -> Backend:
    name = os.environ.get("IRQD_DEVICE_BACKEND", "sim")
    try:
        return BACKENDS[name]()
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
