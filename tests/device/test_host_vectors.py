"""The daemon's ``host_vectors`` against what the simulated kernel allocated.

``host_vectors`` reports host vectors the kernel *allocated* for MSI and MSI-X
(the guest kernel's ``/sys/bus/pci/devices/BDF/msi_irqs``), not only those with
an eventfd (its ``/proc/interrupts`` handlers); docs/real-device.md. The VM stage
compares the two on the real kernel after every step; these tests keep the
simulated device and the vector table agreeing on the same sequences, failures
and rollbacks included.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import pytest

from irqd.config import MsixStrategy
from irqd.device.base import IrqIndex
from irqd.device.sim import SimDevice
from irqd.errors import IrqdError
from irqd.hotpath.python import PythonHotLoop
from irqd.server.vectors import VectorTable

MSIX, MSI = IrqIndex.MSIX, IrqIndex.MSI


#: Subscriber ids, as sessions have.
_IDS = itertools.count(1)


class Sink:
    """A subscriber that drops what it is credited with."""

    def __init__(self) -> None:
        self.id = next(_IDS)

    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        pass

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        pass


def table_on(sim: SimDevice, **kw: object) -> Iterator[VectorTable]:
    hot = PythonHotLoop()
    table = VectorTable(sim, hot, **kw)  # type: ignore[arg-type]
    try:
        yield table
    finally:
        table.close()
        hot.close()
        sim.close()


def kernel(sim: SimDevice) -> dict[str, int]:
    return {"msi": sim.host_vectors(MSI), "msix": sim.host_vectors(MSIX)}


def test_failed_dynamic_subscribe_counts_what_the_kernel_kept() -> None:
    # Room for three host vectors: vector 0 (the enabling call), vector 1, then one
    # more. Subscribing 2, 3 allocates 2 and fails on 3; the rollback de-assigns 2,
    # but a dynamic MSI-X vector stays allocated until MSI-X is disabled
    # (vfio_msi_set_vector_signal, drivers/vfio/pci/vfio_pci_intrs.c).
    sim = SimDevice(msix_vectors=8, noresize=False, host_vector_limit=3)
    for table in table_on(sim):
        a = Sink()
        table.subscribe(a, MSIX, [1])
        assert table.host_vectors()["msix"] == sim.host_vectors(MSIX) == 2
        with pytest.raises(IrqdError) as info:
            table.subscribe(a, MSIX, [2, 3])
        assert info.value.code == "ENOSPC"
        assert sim.host_vectors(MSIX) == 3
        assert table.host_vectors() == kernel(sim)
        # Vector 2 is allocated already: subscribing it again needs no new one.
        table.subscribe(a, MSIX, [2])
        assert table.host_vectors() == kernel(sim) == {"msi": 0, "msix": 3}


def test_failed_dynamic_subscribe_that_allocated_nothing() -> None:
    # Room for two: vector 0 and vector 1; vector 2 finds none and allocates nothing.
    sim = SimDevice(msix_vectors=8, noresize=False, host_vector_limit=2)
    for table in table_on(sim):
        a = Sink()
        with pytest.raises(IrqdError):
            table.subscribe(a, MSIX, [1, 2])
        assert table.host_vectors() == kernel(sim) == {"msi": 0, "msix": 2}


@pytest.mark.parametrize("noresize", [False, True])
def test_release_grow_and_switching_index_agree_with_the_kernel(noresize: bool) -> None:
    sim = SimDevice(msix_vectors=8, noresize=noresize, msi_vectors=1)
    for table in table_on(sim, msix_prearm=2):
        a, b = Sink(), Sink()
        table.subscribe(a, MSIX, [0, 1])
        assert table.host_vectors() == kernel(sim)
        table.subscribe(b, MSIX, [5])  # dynamic on 6.5+, a grow on NORESIZE
        assert table.host_vectors() == kernel(sim)
        table.unsubscribe(b, MSIX, [5])  # de-assigned, still allocated
        assert table.host_vectors() == kernel(sim)
        assert kernel(sim)["msix"] == (6 if noresize else 3)
        table.unsubscribe(a, MSIX, [0, 1])
        table.subscribe(a, MSI, [0])  # MSI-X is idle: disabled, its vectors freed
        assert table.host_vectors() == kernel(sim) == {"msi": 1, "msix": 0}


def test_prearm_short_of_host_vectors_agrees() -> None:
    # NORESIZE, pre-arm 8 with room for 3: the kernel answers 3, the table enables 3.
    sim = SimDevice(msix_vectors=8, noresize=True, host_vector_limit=3)
    for table in table_on(sim, msix_strategy=MsixStrategy.PREARM, msix_prearm=8):
        a = Sink()
        table.subscribe(a, MSIX, [0])
        assert table.host_vectors() == kernel(sim) == {"msi": 0, "msix": 3}
        with pytest.raises(IrqdError):
            table.subscribe(a, MSIX, [6])  # a grow to 7 the host cannot give
        assert table.host_vectors() == kernel(sim)
