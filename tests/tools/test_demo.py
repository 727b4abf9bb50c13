"""``make run`` (``python -m irqd.tools.demo``): it runs, shows interrupts, and cleans up."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest

#: Generous: the demo itself needs about a second beyond --duration.
DEADLINE = 60.0


def _demo(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "irqd.tools.demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _workdir(output: str) -> Path:
    match = re.search(r"--socket (\S+)/sim\.sock", output)
    assert match, output
    return Path(match.group(1))


def _irq_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("watch   | msix  v")]


@pytest.mark.slow
def test_demo_with_duration_shows_interrupts_and_cleans_up() -> None:
    proc = _demo("--duration", "1.5")
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "vfio-irqd status --socket" in out  # the banner tells what to try by hand
    assert "daemon.ready" in out
    assert "watch   | subscribed to msix 0-2" in out
    assert _irq_lines(out), out
    assert re.search(r"fire    \| fired msix: v0 \d+, v1 \d+, v2 \d+", out), out
    assert "watch   | shutdown:" in out
    assert re.search(r"demo    \| [1-9]\d* interrupts seen by watch", out), out
    assert not _workdir(out).exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    proc = _demo()
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, args=(proc.stdout,), daemon=True).start()
    seen: list[str] = []
    try:
        # Wait (bounded) for the first interrupt to reach the watcher, then signal.
        while not _irq_lines("".join(seen)):
            line = lines.get(timeout=DEADLINE)
            assert line is not None, "".join(seen)
            seen.append(line)
        proc.send_signal(sig)
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=DEADLINE)) is not None:
        seen.append(line)
    out = "".join(seen)
    assert "demo    | stopping" in out
    assert "watch   | shutdown:" in out
    assert not _workdir(out).exists()
