"""The one place that picks the hot loop: the ``hot_loop`` setting made concrete.

Everything else holds a :class:`irqd.hotpath.interface.HotLoop` and never asks
which one it is.
"""

from __future__ import annotations

from irqd.config import HotLoop as HotLoopChoice
from irqd.errors import ConfigError
from irqd.hotpath import native
from irqd.hotpath.interface import HotLoop
from irqd.hotpath.python import PythonHotLoop
from irqd.stats import LatencyHistogram

__all__ = ["open_hot_loop", "resolve_hot_loop"]


def resolve_hot_loop(wanted: HotLoopChoice) -> HotLoopChoice:
    """``AUTO`` made concrete; ``ConfigError`` if ``NATIVE`` is asked for but not built."""
    if wanted is HotLoopChoice.PYTHON:
        return wanted
    if native.native_available():
        return HotLoopChoice.NATIVE
    if wanted is HotLoopChoice.NATIVE:
        raise ConfigError(
            "hot_loop = native, but the extension irqd._hotloop is not built "
            "(reinstall with gcc and the Python headers present, or use hot_loop = python)"
        )
    return HotLoopChoice.PYTHON


def open_hot_loop(wanted: HotLoopChoice, latency: LatencyHistogram) -> HotLoop:
    """The hot loop ``wanted`` asks for, recording delivery latency in ``latency``."""
    if resolve_hot_loop(wanted) is HotLoopChoice.NATIVE:
        return native.NativeHotLoop(latency)
    return PythonHotLoop(latency)
