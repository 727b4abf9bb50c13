"""One suite for every ``Device`` backend: the kernel's SET_IRQS rules, checked
through the interface with real eventfds.

Rules are from drivers/vfio/pci/vfio_pci_intrs.c and vfio_pci_core.c (6.1 and
6.12) and drivers/vfio/vfio_main.c; see docs/design.md ("Kernel facts the code
relies on") and the docstring of irqd/device/sim.py. Where 6.1 (NORESIZE) and 6.12 (dynamic
MSI-X) differ, the test asks ``shape.noresize``.
"""

from __future__ import annotations

import errno
import os

import pytest

from irqd.device import (
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    Device,
    IrqIndex,
    SetIrqsData,
)

from .conftest import MakeEventFd, MakeHarness
from .harness import DeviceShape, Harness, new_eventfd, take

MSIX = IrqIndex.MSIX
MSI = IrqIndex.MSI
INTX = IrqIndex.INTX
ERR = IrqIndex.ERR
REQ = IrqIndex.REQ

EVENTFD_TRIGGER = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
NONE_TRIGGER = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER
BOOL_TRIGGER = VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER
NONE_MASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK
NONE_UNMASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK

#: An fd number no process can have open (above any RLIMIT_NOFILE): EBADF.
NO_SUCH_FD = 2**31 - 2


def fails(  # noqa: PLR0917  mirrors set_irqs' arity
    code: int,
    device: Device,
    flags: int,
    index: int,
    start: int,
    count: int,
    data: SetIrqsData = None,
) -> None:
    with pytest.raises(OSError) as exc:
        device.set_irqs(flags, IrqIndex(index) if index < 5 else index, start, count, data)  # type: ignore[arg-type]
    assert exc.value.errno == code, os.strerror(exc.value.errno or 0)


def counts(fds: list[int]) -> list[int]:
    return [take(fd) for fd in fds]


def assign(device: Device, index: IrqIndex, start: int, fds: list[int]) -> int:
    return device.assign_eventfds(index, start, fds)


@pytest.fixture
def not_an_eventfd() -> object:
    """The read end of a pipe: a valid fd that is not an eventfd (EINVAL)."""
    r, w = os.pipe()
    yield r
    os.close(r)
    os.close(w)


# -- GET_IRQ_INFO --------------------------------------------------------------


def test_counts_and_flags(dut: Harness) -> None:
    info = dut.device.all_irq_info()
    shape = dut.shape
    # The flags are reported even for a device without a pin (count 0).
    assert info[INTX].count == int(shape.intx)
    assert info[INTX].flags == (
        VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
    )
    assert info[MSI].count == shape.msi_vectors
    assert info[MSI].flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE
    assert info[MSIX].count == shape.msix_vectors
    expected_msix = VFIO_IRQ_INFO_EVENTFD | (VFIO_IRQ_INFO_NORESIZE if shape.noresize else 0)
    assert info[MSIX].flags == expected_msix
    assert info[MSIX].dynamic is not shape.noresize
    # ERR and REQ fall into the kernel's `else` branch: NORESIZE too. ERR only
    # exists on PCIe (all_irq_info reads the kernel's EINVAL as count 0).
    assert info[REQ].count == 1
    assert info[REQ].flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE
    if shape.pcie:
        assert info[ERR].count == 1
        assert info[ERR].flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE
    else:
        assert info[ERR].count == 0


def test_no_pin_no_pcie_no_msi(make_harness: MakeHarness, efd: MakeEventFd) -> None:
    dut = make_harness(DeviceShape(intx=False, pcie=False, msi_vectors=0))
    assert dut.device.irq_info(INTX).count == 0
    assert dut.device.irq_info(MSI).count == 0
    # No ERR index at all without PCIe: GET_IRQ_INFO itself fails.
    with pytest.raises(OSError) as exc:
        dut.device.irq_info(ERR)
    assert exc.value.errno == errno.EINVAL
    for index in (INTX, MSI, ERR):
        fails(errno.EINVAL, dut.device, EVENTFD_TRIGGER, index, 0, 1, [efd()])


# -- validation (vfio_set_irqs_validate_and_prepare, then the dispatch) ---------


@pytest.mark.parametrize(
    ("flags", "index", "start", "count", "code"),
    [
        pytest.param(NONE_TRIGGER | 1 << 6, MSIX, 0, 1, errno.EINVAL, id="unknown-flag"),
        pytest.param(NONE_TRIGGER | VFIO_IRQ_SET_DATA_BOOL, MSIX, 0, 1, errno.EINVAL, id="2-data"),
        pytest.param(VFIO_IRQ_SET_ACTION_TRIGGER, MSIX, 0, 1, errno.EINVAL, id="no-data"),
        pytest.param(NONE_TRIGGER | VFIO_IRQ_SET_ACTION_MASK, MSIX, 0, 1, errno.ENOTTY, id="2-act"),
        pytest.param(VFIO_IRQ_SET_DATA_NONE, MSIX, 0, 1, errno.ENOTTY, id="no-action"),
        pytest.param(NONE_TRIGGER, MSIX, 8, 1, errno.EINVAL, id="start-past-table"),
        pytest.param(NONE_TRIGGER, MSIX, 7, 2, errno.EINVAL, id="end-past-table"),
        pytest.param(NONE_TRIGGER, MSIX, 0, 9, errno.EINVAL, id="count-past-table"),
        pytest.param(NONE_TRIGGER, MSIX, 1, 2**32 - 2, errno.EINVAL, id="u32-overflow"),
        pytest.param(NONE_TRIGGER, 5, 0, 1, errno.EINVAL, id="no-such-index"),
        # The range is checked before the action: EINVAL wins over ENOTTY.
        pytest.param(NONE_MASK | NONE_TRIGGER, MSIX, 8, 1, errno.EINVAL, id="range-first"),
        pytest.param(NONE_TRIGGER, INTX, 0, 2, errno.EINVAL, id="intx-count-2"),
        pytest.param(NONE_TRIGGER, REQ, 1, 1, errno.EINVAL, id="req-start-1"),
    ],
)
def test_validation(
    dut: Harness, *, flags: int, index: int, start: int, count: int, code: int
) -> None:
    fails(code, dut.device, flags, index, start, count)


def test_short_data_is_einval(dut: Harness, efd: MakeEventFd) -> None:
    # argsz shorter than `count` entries.
    fails(errno.EINVAL, dut.device, EVENTFD_TRIGGER, MSIX, 0, 2, [efd()])
    fails(errno.EINVAL, dut.device, BOOL_TRIGGER, MSIX, 0, 2, [True])


@pytest.mark.parametrize("index", [MSI, MSIX, ERR, REQ])
@pytest.mark.parametrize("flags", [NONE_MASK, NONE_UNMASK], ids=["mask", "unmask"])
def test_mask_unmask_only_on_intx(
    dut: Harness, efd: MakeEventFd, index: IrqIndex, flags: int
) -> None:
    # An index the device lacks (no MSI, ERR without PCIe) fails the range
    # check first: EINVAL.
    code = errno.EINVAL if dut.device.all_irq_info()[index].count == 0 else errno.ENOTTY
    fails(code, dut.device, flags, index, 0, 1)
    if index is MSIX:  # an enabled index changes nothing
        assign(dut.device, MSIX, 0, [efd()])
        fails(errno.ENOTTY, dut.device, flags, index, 0, 1)


def test_other_index_active_is_einval(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    assert assign(dev, MSIX, 0, [-1]) == 0
    fails(errno.EINVAL, dev, EVENTFD_TRIGGER, INTX, 0, 1, [efd()])
    fails(errno.EINVAL, dev, NONE_UNMASK, INTX, 0, 1)
    fails(errno.EINVAL, dev, NONE_MASK, INTX, 0, 1)
    fails(errno.EINVAL, dev, EVENTFD_TRIGGER, MSI, 0, 1, [efd()])
    fails(errno.EINVAL, dev, NONE_TRIGGER, MSI, 0, 0)  # disable the other one
    fails(errno.EINVAL, dev, NONE_TRIGGER, MSI, 0, 1)  # loopback on the other one
    dev.disable(MSIX)
    if dut.shape.intx:
        assert assign(dev, INTX, 0, [efd()]) == 0
        fails(errno.EINVAL, dev, EVENTFD_TRIGGER, MSIX, 0, 1, [efd()])
        fails(errno.EINVAL, dev, EVENTFD_TRIGGER, MSI, 0, 1, [efd()])


@pytest.mark.parametrize("index", [INTX, MSI, MSIX])
def test_disable_inactive_index_is_einval(dut: Harness, index: IrqIndex) -> None:
    fails(errno.EINVAL, dut.device, NONE_TRIGGER, index, 0, 0)


def test_loopback_on_inactive_index_is_einval(dut: Harness) -> None:
    for index in (INTX, MSI, MSIX):
        fails(errno.EINVAL, dut.device, NONE_TRIGGER, index, 0, 1)
        fails(errno.EINVAL, dut.device, BOOL_TRIGGER, index, 0, 1, [True])


def test_count_zero(dut: Harness, efd: MakeEventFd) -> None:
    """count == 0 is a disable only with DATA_NONE|TRIGGER on the active index;
    elsewhere the kernel's answer depends on the handler, not one rule."""
    dev = dut.device
    # MSI/MSI-X inactive, DATA_EVENTFD: vfio_msi_enable(0) -> pci_alloc_irq_vectors(1, 0)
    # -> __pci_enable_msix_range: maxvec < minvec -> ERANGE.
    fails(errno.ERANGE, dev, EVENTFD_TRIGGER, MSIX, 0, 0, [])
    fails(errno.EINVAL, dev, BOOL_TRIGGER, MSIX, 0, 0, [])
    # MSI-X active: an empty block and an empty loopback are no-ops.
    assign(dev, MSIX, 0, [-1])
    assert dev.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 0, []) == 0
    assert dev.set_irqs(BOOL_TRIGGER, MSIX, 0, 0, []) == 0
    dev.disable(MSIX)
    if dut.shape.intx:
        # INTx wants count == 1 for everything but the disable.
        assign(dev, INTX, 0, [-1])
        fails(errno.EINVAL, dev, EVENTFD_TRIGGER, INTX, 0, 0, [])
        fails(errno.EINVAL, dev, NONE_UNMASK, INTX, 0, 0)
        fails(errno.EINVAL, dev, NONE_MASK, INTX, 0, 0)
        dev.disable(INTX)
    # ERR/REQ: only DATA_NONE takes count 0, and only to clear a set eventfd.
    for index in (ERR, REQ):
        fails(errno.EINVAL, dev, EVENTFD_TRIGGER, index, 0, 0, [])
        fails(errno.EINVAL, dev, BOOL_TRIGGER, index, 0, 0, [])
        fails(errno.EINVAL, dev, NONE_TRIGGER, index, 0, 0)


# -- enabling MSI-X --------------------------------------------------------------


def test_enable_at_vector_n_allocates_n_plus_1(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    a, b = efd(), efd()
    assert assign(dev, MSIX, 3, [a]) == 0
    if (host := dut.host_vectors(MSIX)) is not None:
        assert host == 4
    # Vectors 0..2 came with it: assignable on both kinds of kernel.
    assert assign(dev, MSIX, 0, [b]) == 0
    dut.raise_interrupt(MSIX, 0)
    dut.raise_interrupt(MSIX, 3)
    assert counts([a, b]) == [1, 1]
    if dut.shape.noresize:
        fails(errno.EINVAL, dev, EVENTFD_TRIGGER, MSIX, 4, 1, [efd()])
    else:
        assert assign(dev, MSIX, 4, [efd()]) == 0
        if (host := dut.host_vectors(MSIX)) is not None:
            assert host == 5


def test_host_limit_returns_number_available(make_harness: MakeHarness, efd: MakeEventFd) -> None:
    dut = make_harness(DeviceShape(msix_vectors=8, host_vector_limit=4))
    dev = dut.device
    fds = [efd() for _ in range(6)]
    assert assign(dev, MSIX, 0, fds) == 4
    # The kernel freed what it had: the index is not enabled.
    fails(errno.EINVAL, dev, NONE_TRIGGER, MSIX, 0, 0)
    fails(errno.EINVAL, dev, NONE_TRIGGER, MSIX, 0, 1)
    assert assign(dev, MSIX, 0, fds[:4]) == 0
    dev.trigger(MSIX, 0, 4)
    assert counts(fds) == [1, 1, 1, 1, 0, 0]


def test_vector_outside_enabled_range(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    a, b, c = efd(), efd(), efd()
    assert assign(dev, MSIX, 0, [a, b]) == 0
    if dut.shape.noresize:
        # 6.1: EINVAL, and the enabled vectors keep working.
        fails(errno.EINVAL, dev, EVENTFD_TRIGGER, MSIX, 5, 1, [c])
        fails(errno.EINVAL, dev, NONE_TRIGGER, MSIX, 0, 3)  # loopback past num_ctx
        dut.raise_interrupt(MSIX, 0)
        assert counts([a, b, c]) == [1, 0, 0]
    else:
        # 6.5+: vector 5 alone is added; nothing else is touched.
        assert assign(dev, MSIX, 5, [c]) == 0
        if (host := dut.host_vectors(MSIX)) is not None:
            assert host == 3
        dut.raise_interrupt(MSIX, 0)
        dut.raise_interrupt(MSIX, 5)
        dev.trigger(MSIX, 0, 8)  # vectors without an eventfd are skipped
        assert counts([a, b, c]) == [2, 1, 2]


def test_deassign_keeps_host_vector_and_latches(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    fds = [efd() for _ in range(4)]
    assign(dev, MSIX, 0, fds)
    assign(dev, MSIX, 2, [-1])
    if (host := dut.host_vectors(MSIX)) is not None:
        assert host == 4
    dut.raise_interrupt(MSIX, 2, n=2)
    assert counts(fds) == [0, 0, 0, 0]
    # Re-assigned (to a new eventfd): the latched interrupt arrives once.
    again = efd()
    assign(dev, MSIX, 2, [again])
    assert counts([again, *fds]) == [1, 0, 0, 0, 0]
    dut.raise_interrupt(MSIX, 2)
    assert take(again) == 1


def test_any_negative_fd_deassigns(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    a = efd()
    assign(dev, MSIX, 0, [a])
    assign(dev, MSIX, 0, [-2])
    dev.trigger(MSIX, 0, 1)
    assert take(a) == 0


@pytest.mark.parametrize("bad", ["not-eventfd", "no-such-fd"])
def test_range_failure_is_not_transactional(
    dut: Harness, efd: MakeEventFd, not_an_eventfd: int, bad: str
) -> None:
    dev = dut.device
    old = [efd() for _ in range(4)]
    assign(dev, MSIX, 0, old)
    new = [efd(), efd(), -1, efd()]
    new[2], code = (
        (not_an_eventfd, errno.EINVAL)
        if bad == "not-eventfd"
        else (
            NO_SUCH_FD,
            errno.EBADF,
        )
    )
    fails(code, dev, EVENTFD_TRIGGER, MSIX, 0, 4, new)
    # Vectors 0..2 are left de-assigned (even 0 and 1, which had worked);
    # vector 3 was never reached and keeps its old eventfd.
    dev.trigger(MSIX, 0, 4)
    assert counts(old) == [0, 0, 0, 1]
    assert counts([new[0], new[1], new[3]]) == [0, 0, 0]
    assert dut.device.set_irqs(NONE_TRIGGER, MSIX, 0, 0) == 0  # still enabled


def test_failure_in_enabling_call_disables(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    a = efd()
    fails(errno.EBADF, dev, EVENTFD_TRIGGER, MSIX, 0, 2, [a, NO_SUCH_FD])
    fails(errno.EINVAL, dev, NONE_TRIGGER, MSIX, 0, 0)  # nothing to disable
    other = INTX if dut.shape.intx else MSIX
    assert assign(dev, other, 0, [efd()]) == 0  # no index is active
    assert take(a) == 0


# -- delivery ----------------------------------------------------------------------


def test_loopback_signals_exactly_the_assigned_vectors_once(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    a, c = efd(), efd()
    assign(dev, MSIX, 0, [a, -1, c, -1])
    dev.trigger(MSIX, 0, 4)
    assert counts([a, c]) == [1, 1]
    dev.set_irqs(BOOL_TRIGGER, MSIX, 0, 4, [True, True, False, True])
    assert counts([a, c]) == [1, 0]
    dev.trigger(MSIX, 2, 1)
    assert counts([a, c]) == [0, 1]


def test_interrupts_count_exactly(dut: Harness, efd: MakeEventFd) -> None:
    fds = [efd() for _ in range(3)]
    assign(dut.device, MSIX, 0, fds)
    for vector, n in enumerate((1, 7, 100)):
        dut.raise_interrupt(MSIX, vector, n)
    assert counts(fds) == [1, 7, 100]


def test_disable_reenable_with_same_eventfds_counts_exactly(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    fds = [efd() for _ in range(3)]
    assign(dev, MSIX, 0, fds)
    for vector in range(3):
        dut.raise_interrupt(MSIX, vector, 2)
    dev.disable(MSIX)
    dut.raise_interrupt(MSIX, 1, 5)  # lost: MSI-X is disabled
    assign(dev, MSIX, 0, fds)
    for vector in range(3):
        dut.raise_interrupt(MSIX, vector, 3)
    assert counts(fds) == [5, 5, 5]


def test_closing_our_fd_does_not_detach(dut: Harness) -> None:
    fd = new_eventfd()
    reader = os.dup(fd)
    try:
        assign(dut.device, MSIX, 0, [fd])
        os.close(fd)  # the kernel holds its own reference
        dut.raise_interrupt(MSIX, 0)
        assert take(reader) == 1
    finally:
        os.close(reader)


def test_msi(dut: Harness, efd: MakeEventFd) -> None:
    if not dut.shape.msi_vectors:
        pytest.skip("the device has no MSI capability")
    dev = dut.device
    a = efd()
    assert assign(dev, MSI, 0, [a]) == 0
    dut.raise_interrupt(MSI, 0, 3)
    dev.trigger(MSI, 0, 1)
    assert take(a) == 4
    dev.disable(MSI)


# -- INTx --------------------------------------------------------------------------


def test_intx_automask_unmask_resignal(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    if not dut.shape.intx or not dut.set_intx_line(False):
        pytest.skip("backend cannot drive INTx")
    a = efd()
    assign(dev, INTX, 0, [a])
    dut.set_intx_line(True)
    assert take(a) == 1  # fired and automasked
    dut.set_intx_line(False)
    dut.set_intx_line(True)
    assert take(a) == 0  # masked: nothing more
    dev.unmask(INTX)
    assert take(a) == 1  # still asserted at unmask: signalled again, not lost
    dut.set_intx_line(False)
    dev.unmask(INTX)
    assert take(a) == 0
    dut.set_intx_line(True)
    assert take(a) == 1
    dut.set_intx_line(False)
    dev.unmask(INTX)
    # Masked by the ioctl: an assertion waits for the unmask.
    dev.mask(INTX)
    dut.set_intx_line(True)
    assert take(a) == 0
    dev.unmask(INTX)
    assert take(a) == 1
    # Loopback signals whatever the mask.
    dev.trigger(INTX, 0, 1)
    assert take(a) == 1


def test_intx_bool_mask_and_unmask(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    if not dut.shape.intx or not dut.set_intx_line(False):
        pytest.skip("backend cannot drive INTx")
    a = efd()
    assign(dev, INTX, 0, [a])
    dev.set_irqs(VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_MASK, INTX, 0, 1, [False])
    dut.set_intx_line(True)
    assert take(a) == 1  # a false bool did not mask
    dut.set_intx_line(False)
    dev.set_irqs(VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_UNMASK, INTX, 0, 1, [True])
    dev.set_irqs(VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_MASK, INTX, 0, 1, [True])
    dut.set_intx_line(True)
    assert take(a) == 0
    fails(errno.ENOTTY, dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_MASK, INTX, 0, 1, [a])


# -- ERR and REQ -------------------------------------------------------------------


@pytest.mark.parametrize("index", [ERR, REQ])
def test_err_req_set_and_clear(dut: Harness, efd: MakeEventFd, index: IrqIndex) -> None:
    if index is ERR and not dut.shape.pcie:
        pytest.skip("ERR exists only on PCI Express devices")
    dev = dut.device
    a = efd()
    fails(errno.EINVAL, dev, NONE_TRIGGER, index, 0, 1)  # loopback with nothing set
    assert assign(dev, index, 0, [a]) == 0
    dev.trigger(index, 0, 1)
    dev.set_irqs(BOOL_TRIGGER, index, 0, 1, [True])
    dev.set_irqs(BOOL_TRIGGER, index, 0, 1, [False])
    assert take(a) == 2
    if dut.shape.noresize:
        # 6.1: only -1 clears; other negatives are ignored.
        assert assign(dev, index, 0, [-2]) == 0
    else:
        # 6.12 (seen in the VM): other negatives are EINVAL, and change nothing.
        fails(errno.EINVAL, dev, EVENTFD_TRIGGER, index, 0, 1, [-2])
    dev.trigger(index, 0, 1)
    assert take(a) == 1
    assert assign(dev, index, 0, [-1]) == 0
    fails(errno.EINVAL, dev, NONE_TRIGGER, index, 0, 1)
    assign(dev, index, 0, [a])
    assert dev.set_irqs(NONE_TRIGGER, index, 0, 0) == 0  # DATA_NONE, count 0: clear
    fails(errno.EINVAL, dev, NONE_TRIGGER, index, 0, 1)
    fails(errno.EBADF, dev, EVENTFD_TRIGGER, index, 0, 1, [NO_SUCH_FD])
    assert take(a) == 0


def test_req_signalled_when_the_kernel_wants_the_device(dut: Harness, efd: MakeEventFd) -> None:
    a = efd()
    assign(dut.device, REQ, 0, [a])
    if not dut.request_release():
        pytest.skip("backend cannot make the kernel ask for the device")
    dut.request_release()
    assert take(a) == 2  # again and again until released


# -- close -------------------------------------------------------------------------


def test_close_releases_everything(dut: Harness, efd: MakeEventFd) -> None:
    dev = dut.device
    msix, err, req = efd(), efd(), efd()
    assign(dev, MSIX, 0, [msix])
    if dut.shape.pcie:
        assign(dev, ERR, 0, [err])
    assign(dev, REQ, 0, [req])
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(OSError) as exc:
        dev.set_irqs(NONE_TRIGGER, MSIX, 0, 1)
    assert exc.value.errno == errno.EBADF
    assert counts([msix, err, req]) == [0, 0, 0]
