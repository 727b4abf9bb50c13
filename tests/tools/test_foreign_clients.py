"""The clients in C and JavaScript (``clients/``), written from docs/protocol.md alone.

Each is built or installed here and run against a real daemon on the
simulated device: it says hello, subscribes, receives ``irq`` notifications
and checks the exact counts itself (its exit status is the verdict). The C
client also fetches eventfds with ``sim.eventfds`` (SCM_RIGHTS) and fires
them; Node cannot receive fds, so ``vfio-irqd sim fire`` fires for it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import DEADLINE, ROOT, Lines, cli, env, reap, require_tools, running_daemon

C_SOURCES = ROOT / "clients" / "c"
JS_DIR = ROOT / "clients" / "js"
#: The flags the C client must build cleanly with.
CFLAGS = ["-Wall", "-Wextra", "-Werror", "-O2"]


@pytest.fixture(scope="module")
def c_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/c built with ``cc -Wall -Wextra -Werror -O2``."""
    require_tools("cc")
    binary = tmp_path_factory.mktemp("c-client") / "irqd-c-client"
    build = subprocess.run(
        ["cc", *CFLAGS, "-o", str(binary), "irqd_client.c", "mp.c"],
        cwd=C_SOURCES,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, f"cc failed:\n{build.stderr}"
    assert build.stderr == "", build.stderr  # no warnings either
    return binary


@pytest.fixture(scope="module")
def js_client() -> Path:
    """clients/js with its locked dependencies installed by ``npm ci``."""
    require_tools("node", "npm")
    install = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"
    return JS_DIR / "irqd-client.js"


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    """A simulated-device daemon's socket."""
    path = tmp_path / "irqd.sock"
    with running_daemon(path):
        yield path


class Client:
    """A foreign client process; its stdout lines are JSON records."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
        )
        assert self.proc.stdout is not None
        self._lines = Lines(self.proc.stdout)

    def record(self) -> dict[str, object]:
        """The next JSON line, waiting up to the deadline."""
        try:
            line = self._lines.next(DEADLINE)
        except TimeoutError:
            raise AssertionError("no output in time") from None
        if line is None:
            self.proc.wait(DEADLINE)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"exited {self.proc.returncode} early: {err}")
        record: dict[str, object] = json.loads(line)
        return record

    def finish(self) -> dict[str, object]:
        """Wait for the exit; the ``done`` record of a passing run."""
        done = self.record()
        try:
            status = self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        err = self.proc.stderr.read() if self.proc.stderr else ""
        assert status == 0, f"exit {status}: {err}"
        assert done["event"] == "done", done
        return done

    def kill(self) -> None:
        """Make sure it is gone and its pipes are closed (every test ends with this)."""
        reap(self.proc, self._lines)


def sim_fire(sock: Path, count: int, *vectors: int) -> None:
    """``vfio-irqd sim fire --count COUNT VECTORS``."""
    fired = cli("sim", "fire", "--socket", str(sock), "--count", str(count), *map(str, vectors))
    assert fired.returncode == 0, fired.stderr


def test_c_client_fires_through_scm_rights(c_client: Path, sock: Path) -> None:
    vectors = ["0", "1", "2", "63"]
    client = Client([str(c_client), "--socket", str(sock), "--expect", "2000", "--fire", *vectors])
    try:
        assert client.record()["event"] == "subscribed"
        done = client.finish()
    finally:
        client.kill()
    assert done["totals"] == {"0": 2000, "1": 2000, "2": 2000, "63": 2000}


def test_c_client_counts_what_another_process_fires(c_client: Path, sock: Path) -> None:
    client = Client([str(c_client), "--socket", str(sock), "--expect", "500", "5", "9"])
    try:
        assert client.record()["how"] == "dynamic"
        sim_fire(sock, 500, 5, 9)
        done = client.finish()
    finally:
        client.kill()
    assert done["totals"] == {"5": 500, "9": 500}


def test_js_client_counts_exactly(js_client: Path, sock: Path) -> None:
    client = Client(["node", str(js_client), "--socket", str(sock), "--expect", "700", "3", "4"])
    try:
        record = client.record()
        assert (record["event"], record["vectors"]) == ("subscribed", [3, 4])
        sim_fire(sock, 700, 3, 4)
        done = client.finish()
    finally:
        client.kill()
    assert done["totals"] == {"3": 700, "4": 700}


def test_c_and_js_clients_share_vectors_on_a_noresize_device(
    c_client: Path, js_client: Path, tmp_path: Path
) -> None:
    # Both subscribe to vector 6, each to one more of its own, on a kernel
    # model with NORESIZE (prearm): every subscriber gets every interrupt.
    path = tmp_path / "nr.sock"
    with running_daemon(path, "--sim-noresize"):
        c = Client([str(c_client), "--socket", str(path), "--expect", "300", "6", "7"])
        js = Client(["node", str(js_client), "--socket", str(path), "--expect", "300", "6", "8"])
        try:
            assert c.record()["how"] == "prearm"
            assert js.record()["event"] == "subscribed"
            sim_fire(path, 300, 6, 7, 8)
            assert c.finish()["totals"] == {"6": 300, "7": 300}
            assert js.finish()["totals"] == {"6": 300, "8": 300}
        finally:
            c.kill()
            js.kill()
