"""``VfioDevice``'s side of a hand-over (irqd.process.fdstore) without a device: export and adopt.

Adopting real fds is run against the kernel in tests/vm (guest/main.py's
``handover`` step); here the checks that come before any kernel state is
touched: which fds are needed, what is refused, and that refused fds are
closed (the daemon then opens the device afresh).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from irqd.device.base import AdoptError, IrqIndex, StoredDevice, Unsupported
from irqd.device.vfio import HANDOVER_KEYS, VfioAdoptError, VfioDevice
from irqd.process.fdstore import Carried, HandoverError, adopt_device, device_fds

BDF = "0000:03:00.0"


@pytest.fixture
def pipes() -> Iterator[dict[str, int]]:
    """Three fds that are open but no VFIO objects, one per handover key.

    ``adopt`` owns (and here closes) the read ends it is given; a test that
    does not give them away closes them itself. Only the write ends are closed
    here: closing a number twice could close whatever reused it.
    """
    writers: list[int] = []
    fds: dict[str, int] = {}
    for key in HANDOVER_KEYS:
        r, w = os.pipe()
        writers.append(w)
        fds[key] = r
    yield fds
    for fd in writers:
        os.close(fd)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def shell(fds: dict[str, int]) -> VfioDevice:
    """A ``VfioDevice`` holding ``fds`` without having opened anything."""
    device = VfioDevice.__new__(VfioDevice)
    device.name = device.bdf = BDF
    device.group_number = 7
    device._container, device._group, device._device = (fds[k] for k in HANDOVER_KEYS)
    return device


def test_exports_its_three_fds_and_identity(pipes: dict[str, int]) -> None:
    device = shell(pipes)
    assert device.handover_fds() == pipes
    assert device.export_state() == {"bdf": BDF, "group": 7}
    # The hand-over code sees a backend that can take part.
    assert device_fds(device) == pipes
    device.close()
    assert not any(is_open(fd) for fd in pipes.values())


def test_a_closed_device_has_nothing_to_hand_over(pipes: dict[str, int]) -> None:
    device = shell(pipes)
    device._device = -1
    with pytest.raises(OSError) as info:
        device.handover_fds()
    assert info.value.errno == errno.EBADF
    device.close()
    os.close(pipes["device"])


def test_adopt_refuses_a_missing_fd_by_name_and_closes_the_rest(pipes: dict[str, int]) -> None:
    given = {k: v for k, v in pipes.items() if k != "device"}
    with pytest.raises(VfioAdoptError, match=r"lacks its device fd"):
        VfioDevice.adopt(BDF, given, {"bdf": BDF, "group": 7})
    assert not any(is_open(fd) for fd in given.values())


def test_adopt_refuses_fds_that_are_not_vfio_objects(pipes: dict[str, int]) -> None:
    with pytest.raises(VfioAdoptError, match=r"not the VFIO object"):
        VfioDevice.adopt(BDF, pipes, {"bdf": BDF, "group": 7})
    assert not any(is_open(fd) for fd in pipes.values())


def test_adopt_refuses_another_device(pipes: dict[str, int]) -> None:
    with pytest.raises(VfioAdoptError, match=r"is '0000:04:00\.0', not the configured"):
        VfioDevice.adopt(BDF, pipes, {"bdf": "0000:04:00.0", "group": 7})
    assert not any(is_open(fd) for fd in pipes.values())


def test_adopt_refuses_unknown_fds(pipes: dict[str, int]) -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(VfioAdoptError, match=r"unknown .*\['extra'\]"):
        VfioDevice.adopt(BDF, {**pipes, "extra": r}, None)
    assert not any(is_open(fd) for fd in [r, *pipes.values()])


def test_a_refused_adoption_starts_afresh_instead_of_failing_the_daemon() -> None:
    # serve() catches ValueError/HandoverError around adopt_device and opens
    # the device afresh; a ConfigError would make it exit 2 instead.
    assert issubclass(VfioAdoptError, ValueError)
    carried = Carried({"device": {"kind": "VfioDevice", "name": BDF, "state": None}})
    with pytest.raises(HandoverError, match="simulation is configured"):
        adopt_device(carried, lambda: pytest.fail("must not open"), None)
    carried.device_fds = {}
    with pytest.raises(VfioAdoptError, match="lacks its container, group, device fd"):
        adopt_device(carried, lambda: pytest.fail("must not open"), BDF)


def test_a_real_device_refuses_to_give_back_assigned_eventfds(pipes: dict[str, int]) -> None:
    # sim.eventfds: the kernel does not hand an assigned eventfd back.
    device = shell(pipes)
    with pytest.raises(Unsupported, match="only on the simulated device"):
        device.assigned_fd(IrqIndex.MSIX, 0)
    device.close()


def test_adopt_stored_without_a_configured_address_closes_the_fds(
    pipes: dict[str, int],
) -> None:
    stored = StoredDevice(configured=None, state=None, fds=dict(pipes))
    with pytest.raises(AdoptError, match="simulation is configured"):
        VfioDevice.adopt_stored(stored, lambda: pytest.fail("must not open"))
    assert stored.fds == {} and not any(is_open(fd) for fd in pipes.values())


def test_state_of_earlier_versions_names_the_class_and_is_still_adopted(
    pipes: dict[str, int],
) -> None:
    # Before the backend name was written, ``kind`` was the class name.
    carried = Carried({"device": {"kind": "VfioDevice", "name": BDF, "state": None}})
    carried.device_fds = dict(pipes)
    with pytest.raises(VfioAdoptError, match="not the VFIO object it is named after"):
        adopt_device(carried, lambda: pytest.fail("must not open"), BDF)
    assert carried.device_fds == {} and not any(is_open(fd) for fd in pipes.values())
