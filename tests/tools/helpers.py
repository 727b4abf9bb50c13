"""Helpers for tests that run ``vfio-irqd`` and other programs as real processes.

Shared by the tests of this package.
Nothing here waits a fixed time: every wait polls a condition up to a deadline.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import pytest

from irqd.tools.demo import wait_for_socket

#: Upper bound for anything that should take well under a second.
DEADLINE = 30.0

#: The repository's root.
ROOT = Path(__file__).resolve().parents[2]

#: Installs tmux, cc, node and npm from Debian's packages when missing (as root).
INSTALL_TOOLS = ROOT / "scripts" / "install-test-tools"

_T = TypeVar("_T")


def env() -> dict[str, str]:
    """The environment for children: unbuffered, without a default socket."""
    out = dict(os.environ, PYTHONUNBUFFERED="1")
    out.pop("VFIO_IRQD_SOCKET", None)
    return out


class Lines:
    """The lines of a child's stream, readable with a deadline (a reader thread feeds them).

    ``close`` waits for the end of the stream and closes it: a pipe left to the
    garbage collector is a ResourceWarning, which the suite treats as an error.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._stream = stream
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next(self, timeout: float = DEADLINE) -> str | None:
        """The next line, ``None`` at end of stream; ``TimeoutError`` if none in time."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line within {timeout} s; so far: {self.seen}") from None
        if line is not None:
            self.seen.append(line)
        return line

    def rest(self, timeout: float = DEADLINE) -> list[str]:
        """Every remaining line up to end of stream."""
        out: list[str] = []
        while (line := self.next(timeout)) is not None:
            out.append(line)
        return out

    def close(self) -> None:
        """Once the child has exited: wait for end of stream, then close the stream."""
        self._thread.join(DEADLINE)
        if not self._thread.is_alive():
            self._stream.close()


def reap(proc: subprocess.Popen[str], *readers: Lines) -> None:
    """Kill ``proc`` if it still runs, wait for it, and close every pipe it had."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for reader in readers:
        reader.close()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def irqd_argv(*args: str) -> list[str]:
    """The argv of ``vfio-irqd ARGS`` with this interpreter."""
    return [sys.executable, "-m", "irqd", *args]


def cli(*args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    """Run ``vfio-irqd ARGS`` to completion, capturing its output."""
    return subprocess.run(
        irqd_argv(*args), capture_output=True, text=True, timeout=timeout, env=env(), check=False
    )


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> int:
    """Signal ``proc`` and wait for it (killing it if it hangs); its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


def poll_until(predicate: Callable[[], _T | None], what: str, timeout: float = DEADLINE) -> _T:
    """Call ``predicate`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@contextlib.contextmanager
def running_daemon(sock: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """``vfio-irqd serve --sim`` on ``sock`` while the block runs; must exit 0 on SIGINT."""
    proc = subprocess.Popen(
        irqd_argv("serve", "--sim", "--socket", str(sock), "--log-format", "json", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        wait_for_socket(sock, time.monotonic() + DEADLINE, alive=proc)
        yield proc
    finally:
        status = stop(proc)
        out, err = proc.communicate()
    assert status == 0, f"daemon exited {status}\nstdout:\n{out}\nstderr:\n{err}"


def require_tools(*tools: str) -> None:
    """Make sure the programs ``tools`` are on PATH, or skip the test.

    Missing tools are installed with ``scripts/install-test-tools`` when we
    are root (as in CI). A test is skipped only when we are not root and
    cannot install them, and never under ``VFIO_IRQD_CI=1``: there a missing
    tool is a failure, so CI cannot pass without running the test.
    """
    missing = [t for t in tools if shutil.which(t) is None]
    if missing and os.geteuid() == 0:
        subprocess.run(["bash", str(INSTALL_TOOLS), *missing], check=False, timeout=900)
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            pytest.fail(f"{', '.join(missing)} missing and {INSTALL_TOOLS} could not install it")
    if not missing:
        return
    message = (
        f"{', '.join(missing)} not installed; as root, {INSTALL_TOOLS.relative_to(ROOT)} "
        "installs it from Debian's packages"
    )
    if os.environ.get("VFIO_IRQD_CI") == "1":
        pytest.fail(f"{message} (VFIO_IRQD_CI=1: not skipping)")
    pytest.skip(message)
