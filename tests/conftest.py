"""Fixtures shared by the whole suite, and its guards: a deadline for every
test (Trio tests are cancelled at it) and, under ``make test``, every test run."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

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


# -- a deadline for every test ------------------------------------------------------
#
# pytest-timeout (pyproject.toml: ``timeout``) fails a plain test with SIGALRM.
# Raised inside ``trio.run`` that would leave Trio's run state behind and fail
# every later Trio test too, so a Trio test gets the same deadline as a cancel
# scope around it instead: it is cancelled, its fixtures tear down, and it
# fails with the tree of its tasks and where each one waits.

#: Seconds a test may go on ignoring its cancellation before the run is ended.
CANCEL_GRACE = 60.0

#: The timeout pytest-timeout gave a Trio test (absent: no deadline, e.g. --timeout=0).
_TRIO_DEADLINE = pytest.StashKey[float]()

#: The terminal's stderr: while a test runs, fd 2 is pytest's capture file.
_STDERR_FD = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STDERR_FD] = os.dup(2)  # here fd 2 is still the terminal


def pytest_unconfigure(config: pytest.Config) -> None:
    if _STDERR_FD in config.stash:
        os.close(config.stash[_STDERR_FD])


class _RunWithDeadline:
    """``trio.run`` for one test item that cancels the test at its timeout."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item

    def __call__(
        self,
        afn: Callable[[], Awaitable[Any]],
        *,
        clock: trio.abc.Clock | None = None,
        instruments: Sequence[trio.abc.Instrument] = (),
    ) -> Any:
        seconds = self.item.stash.get(_TRIO_DEADLINE, None)
        if seconds is None:
            return trio.run(afn, clock=clock, instruments=instruments)
        expired = threading.Event()
        finished = threading.Event()

        async def main() -> Any:
            token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:

                def cancel() -> None:  # in Trio's thread
                    sys.stderr.write(f"Timeout (>{seconds}s): Trio tasks\n{_task_tree()}")
                    scope.cancel()

                def expire() -> None:  # in the timer's thread
                    expired.set()
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(cancel)
                    if not finished.wait(CANCEL_GRACE):
                        # Stuck where no cancellation reaches (a blocking call):
                        # end the run rather than hang; the exit status says so.
                        fd = self.item.config.stash[_STDERR_FD]
                        os.write(fd, f"{self.item.nodeid} ignored its cancellation\n".encode())
                        faulthandler.dump_traceback(fd, all_threads=True)
                        os._exit(1)

                timer = threading.Timer(seconds, expire)
                timer.daemon = True
                timer.start()
                try:
                    return await afn()
                finally:
                    timer.cancel()
            return None

        message = (
            f"Timeout (>{seconds}s): the test was cancelled (pytest-timeout, tests/conftest.py)"
        )
        result = None
        try:
            result = trio.run(main, clock=clock, instruments=instruments)
        except BaseException:
            if not expired.is_set():
                raise
            # What the cancellation made the test raise is not the news.
        finally:
            finished.set()
        if expired.is_set():
            pytest.fail(message, pytrace=False)
        return result


_TRIO_DIR = str(Path(trio.__file__).parent)


def _task_tree() -> str:
    """Every Trio task of this run, indented by nursery, with the await it waits in."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        where = " <- ".join(
            f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{lineno})"
            for frame, lineno in reversed(list(task.iter_await_frames()))
            if not frame.f_code.co_filename.startswith(_TRIO_DIR)  # Trio's own waits
        )
        lines.append(f"{'  ' * depth}{task.name}: {where}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    assert root is not None  # called in Trio's thread, during the run
    walk(root, 0)
    return "\n".join(lines) + "\n"


@pytest.hookimpl(trylast=True)  # after pytest-trio marked the Trio tests
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # Hypothesis runs its own trio.run per example; pytest-timeout's SIGALRM then.
        if item.get_closest_marker("trio") and not hasattr(
            getattr(item, "obj", None), "hypothesis"
        ):
            # pytest-trio takes the first trio marker's runner.
            item.add_marker(pytest.mark.trio(run=_RunWithDeadline(item)), append=False)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    marker = item.get_closest_marker("trio")
    if marker is None or not isinstance(marker.kwargs.get("run"), _RunWithDeadline):
        return None  # pytest-timeout's own timer
    item.stash[_TRIO_DEADLINE] = float(settings.timeout)
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    return True if _TRIO_DEADLINE in item.stash else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # pytest's faulthandler_timeout is one figure for every test: a test marked
    # to run longer has pytest-timeout's own traceback dump instead.
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        seconds = marker.kwargs.get("timeout", marker.args[0] if marker.args else 0)
        if float(seconds) >= float(item.config.getini("faulthandler_timeout") or 0):
            faulthandler.cancel_dump_traceback_later()


# -- under `make test`, every test ------------------------------------------------

#: Set by the Makefile: the run must hold every test, the VM stage and the soak included.
FULL_SUITE = os.environ.get("VFIO_IRQD_FULL_SUITE") == "1"

_DESELECTED = pytest.StashKey[int]()


def pytest_deselected(items: Sequence[pytest.Item]) -> None:
    if items:
        config = items[0].config
        config.stash[_DESELECTED] = config.stash.get(_DESELECTED, 0) + len(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    if not FULL_SUITE:
        return
    problems = []
    deselected = session.config.stash.get(_DESELECTED, 0)
    if deselected:
        problems.append(f"{deselected} tests deselected (-m, -k, --deselect, --lf ...)")
    for marker in ("vm", "soak"):
        if not any(item.get_closest_marker(marker) for item in session.items):
            problems.append(f"no test marked {marker} collected")
    if problems:
        raise pytest.UsageError(
            "make test runs the whole suite, but: " + "; ".join(problems) + ". To run part "
            "of it, call pytest yourself, e.g. .venv/bin/python -m pytest -m 'not vm and not soak'"
        )
