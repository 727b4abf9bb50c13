"""Fixtures of the device conformance suite: a device of a given shape, and eventfds."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from .harness import DeviceShape, Harness, new_eventfd, selected_backend

MakeHarness = Callable[[DeviceShape], Harness]
MakeEventFd = Callable[[], int]


@pytest.fixture
def make_harness() -> Iterator[MakeHarness]:
    """Build devices of any shape with the selected backend; all closed at teardown."""
    backend = selected_backend()
    made: list[Harness] = []

    def make(shape: DeviceShape) -> Harness:
        harness = backend.make(shape)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.fixture(params=[False, True], ids=["dynamic", "noresize"])
def dut(request: pytest.FixtureRequest, make_harness: MakeHarness) -> Harness:
    """The device under test: an MSI-X table of 8, NORESIZE clear or set.

    The simulation takes the default shape; a real device has its own (and
    skips the NORESIZE setting its kernel does not have).
    """
    noresize: bool = request.param
    return make_harness(selected_backend().dut_shape(noresize))


@pytest.fixture
def efd() -> Iterator[MakeEventFd]:
    """Make real eventfds (non-blocking); all closed at teardown."""
    fds: list[int] = []

    def make() -> int:
        fd = new_eventfd()
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)
