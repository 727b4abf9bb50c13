"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

from irqd.config import HotLoop
from irqd.hotpath import native as hotloop


@pytest.fixture(params=[HotLoop.NATIVE, HotLoop.PYTHON], ids=["native", "python"])
def hot_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> HotLoop:
    """Runs a test once with each hot loop: a daemon started with the default
    ``hot_loop = auto`` then gets the native thread, or the Trio dispatcher as
    on a machine where the extension was not built.

    Modules whose daemons must pass the same tests in both modes use it with
    ``pytestmark = pytest.mark.usefixtures("hot_loop")``.
    """
    choice: HotLoop = request.param
    if choice is HotLoop.PYTHON:
        monkeypatch.setattr(hotloop, "native_available", lambda: False)
    else:
        assert hotloop.native_available(), "irqd._hotloop is not built"
    return choice
