"""What only the simulation has: its record of calls, its own eventfd references,
host-vector bookkeeping and the hardware side."""

from __future__ import annotations

import errno
import os

import pytest

from irqd.device import (
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    IrqIndex,
    SetIrqsCall,
    SimDevice,
)
from irqd.eventfd import is_eventfd

from .conftest import MakeEventFd
from .harness import take

MSIX = IrqIndex.MSIX
EVENTFD_TRIGGER = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
NONE_TRIGGER = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_calls_record_every_call_and_its_outcome(efd: MakeEventFd) -> None:
    sim = SimDevice(msix_vectors=4)
    a = efd()
    sim.assign_eventfds(MSIX, 0, [a])
    with pytest.raises(OSError):
        sim.disable(IrqIndex.MSI)
    sim.disable(MSIX)
    assert sim.calls == [
        SetIrqsCall(EVENTFD_TRIGGER, MSIX, 0, 1, (a,), result=0),
        SetIrqsCall(NONE_TRIGGER, IrqIndex.MSI, 0, 0, None, errno=errno.EINVAL),
        SetIrqsCall(NONE_TRIGGER, MSIX, 0, 0, None, result=0),
    ]
    assert [c.ok for c in sim.calls] == [True, False, True]


def test_sim_holds_its_own_dup(efd: MakeEventFd) -> None:
    sim = SimDevice(msix_vectors=4)
    a = efd()
    sim.assign_eventfds(MSIX, 1, [a])
    dup = sim.assigned_fd(MSIX, 1)
    assert dup is not None
    assert dup != a
    assert is_eventfd(dup)
    assert sim.assigned_fd(MSIX, 0) is None
    sim.assign_eventfds(MSIX, 1, [-1])
    assert sim.assigned_fd(MSIX, 1) is None
    assert not is_eventfd(dup)  # closed on de-assign
    sim.close()


@pytest.mark.parametrize("noresize", [False, True])
def test_close_closes_every_dup(efd: MakeEventFd, noresize: bool) -> None:
    fds = [efd() for _ in range(6)]
    before = open_fds()
    sim = SimDevice(msix_vectors=4, noresize=noresize)
    sim.assign_eventfds(MSIX, 0, fds[:4])
    sim.assign_eventfds(IrqIndex.ERR, 0, [fds[4]])
    sim.assign_eventfds(IrqIndex.REQ, 0, [fds[5]])
    assert open_fds() == before + 6
    sim.close()
    assert open_fds() == before
    assert sim.active_index() is None
    assert sim.host_vectors(MSIX) == 0


def test_host_vectors_and_active_index(efd: MakeEventFd) -> None:
    sim = SimDevice(msix_vectors=8)
    assert sim.active_index() is None
    sim.assign_eventfds(MSIX, 2, [-1])
    assert (sim.active_index(), sim.host_vectors(MSIX)) == (MSIX, 3)
    sim.assign_eventfds(MSIX, 6, [efd()])
    assert sim.host_vectors(MSIX) == 4
    sim.assign_eventfds(MSIX, 6, [-1])
    assert sim.host_vectors(MSIX) == 4
    sim.disable(MSIX)
    sim.assign_eventfds(IrqIndex.INTX, 0, [-1])
    assert sim.host_vectors(IrqIndex.INTX) == 1
    assert sim.host_vectors(MSIX) == 0


def test_dynamic_growth_stops_at_host_limit(efd: MakeEventFd, tmp_path: object) -> None:
    sim = SimDevice(msix_vectors=8, host_vector_limit=2)
    sim.assign_eventfds(MSIX, 0, [-1])
    r, w = os.pipe()
    try:
        # The host vector is allocated before the eventfd is looked up, and stays.
        with pytest.raises(OSError) as exc:
            sim.assign_eventfds(MSIX, 5, [r])
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    assert sim.host_vectors(MSIX) == 2
    with pytest.raises(OSError) as exc:
        sim.assign_eventfds(MSIX, 6, [efd()])
    assert exc.value.errno == errno.ENOSPC
    sim.assign_eventfds(MSIX, 5, [efd()])  # already allocated: fine
    with pytest.raises(OSError) as exc:
        SimDevice(msix_vectors=8, host_vector_limit=0).assign_eventfds(MSIX, 0, [-1])
    assert exc.value.errno == errno.ENOSPC


def test_interrupts_are_lost_while_disabled_or_unallocated(efd: MakeEventFd) -> None:
    sim = SimDevice(msix_vectors=8)
    a, b = efd(), efd()
    sim.raise_irq(MSIX, 0)  # disabled: lost
    sim.assign_eventfds(MSIX, 0, [a])
    sim.raise_irq(MSIX, 3)  # no host vector yet: lost
    sim.assign_eventfds(MSIX, 3, [b])
    assert [take(a), take(b)] == [0, 0]
    sim.raise_irq(MSIX, 3, 2)
    assert take(b) == 2


def test_msi_vector_past_enabled_range_on_6_5(efd: MakeEventFd) -> None:
    # MSI is never dynamic: 6.5+ fails the vector without a host vector with EINVAL.
    sim = SimDevice(msi_vectors=4)
    sim.assign_eventfds(IrqIndex.MSI, 0, [efd()])
    with pytest.raises(OSError) as exc:
        sim.assign_eventfds(IrqIndex.MSI, 2, [efd()])
    assert exc.value.errno == errno.EINVAL
    assert sim.assign_eventfds(IrqIndex.MSI, 2, [-1]) == 0  # de-assigning nothing is fine


def test_intx_enabled_on_an_asserted_line_fires_at_once(efd: MakeEventFd) -> None:
    sim = SimDevice()
    sim.set_intx_line(True)
    a = efd()
    sim.assign_eventfds(IrqIndex.INTX, 0, [a])
    assert take(a) == 1
    assert sim.intx_masked


def test_intx_bad_fd_keeps_the_old_eventfd(efd: MakeEventFd) -> None:
    sim = SimDevice()
    a = efd()
    sim.assign_eventfds(IrqIndex.INTX, 0, [a])
    with pytest.raises(OSError):
        sim.assign_eventfds(IrqIndex.INTX, 0, [2**31 - 2])
    sim.trigger(IrqIndex.INTX, 0, 1)
    assert take(a) == 1


def test_intx_unmask_eventfd_is_not_modelled(efd: MakeEventFd) -> None:
    sim = SimDevice()
    sim.assign_eventfds(IrqIndex.INTX, 0, [-1])
    flags = VFIO_IRQ_SET_DATA_EVENTFD | (1 << 4)
    with pytest.raises(NotImplementedError):
        sim.set_irqs(flags, IrqIndex.INTX, 0, 1, [efd()])
    assert sim.set_irqs(flags, IrqIndex.INTX, 0, 1, [-1]) == 0


def test_err_raised_by_the_device(efd: MakeEventFd) -> None:
    sim = SimDevice()
    a = efd()
    sim.raise_irq(IrqIndex.ERR, 0)  # nobody listening
    sim.assign_eventfds(IrqIndex.ERR, 0, [a])
    sim.raise_irq(IrqIndex.ERR, 0, 2)
    sim.raise_irq(IrqIndex.REQ, 0)
    assert take(a) == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"msix_vectors": 2049}, {"msix_vectors": -1}, {"msi_vectors": 3}, {"msi_vectors": 64}],
)
def test_shape_is_checked(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SimDevice(**kwargs)  # type: ignore[arg-type]


def test_raise_checks_its_arguments() -> None:
    sim = SimDevice(msix_vectors=4, intx=False)
    with pytest.raises(ValueError, match="no vector 4"):
        sim.raise_irq(MSIX, 4)
    with pytest.raises(ValueError, match="no vector 0"):
        sim.raise_irq(IrqIndex.INTX, 0)
    with pytest.raises(ValueError, match="positive"):
        sim.raise_irq(MSIX, 0, 0)
