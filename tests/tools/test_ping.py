"""``vfio-irqd ping``: the loop on a scripted client, and the command against a real daemon."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from irqd.tools.ping import VectorPing, format_ping, ping, ping_json
from irqproto.errors import RpcError
from irqproto.notifications import IrqNotification, ShutdownNotification

from .helpers import cli, running_daemon

# -- the loop, on a scripted client --------------------------------------------------------------


class ScriptedClient:
    """Answers each trigger as told, on a fake clock that only moves when waited on.

    ``answers[vector]`` is a list of what happens to each successive trigger
    of that vector: a delay in seconds until its ``irq`` arrives, or ``None``
    for a trigger that never comes back.
    """

    def __init__(self, answers: dict[int, list[float | None]], index: str = "msix") -> None:
        self.index = index
        self.answers = {v: deque(a) for v, a in answers.items()}
        self.now = 0.0
        self.scheduled: list[tuple[float, object]] = []  # (due, notification)
        self.triggers: list[int] = []
        self.unmasks = 0

    def clock(self) -> float:
        return self.now

    def trigger(self, index: str, vectors: Sequence[int]) -> None:
        assert index == self.index
        [vector] = vectors
        self.triggers.append(vector)
        delay = self.answers[vector].popleft()
        if delay is not None:
            note = IrqNotification(index, ((vector, 1),))
            self.scheduled.append((self.now + delay, note))

    def unmask(self, index: str = "intx") -> None:
        self.unmasks += 1
        if index != "intx":
            raise RpcError("EINVAL", "only intx")

    def schedule(self, at: float, note: object) -> None:
        self.scheduled.append((at, note))

    def next_notification(self, timeout: float | None = None) -> object:
        self.scheduled.sort(key=lambda item: item[0])
        if self.scheduled and (timeout is None or self.scheduled[0][0] <= self.now + timeout):
            due, note = self.scheduled.pop(0)
            self.now = max(self.now, due)
            return note
        if timeout is None:
            raise AssertionError("would wait forever")
        self.now += timeout
        raise TimeoutError


def test_every_trigger_comes_back() -> None:
    client = ScriptedClient({0: [0.001, 0.003, 0.002], 5: [0.010, 0.010, 0.010]})
    results = ping(client, "msix", [0, 5], count=3, timeout=1.0, clock=client.clock)
    # One at a time, round by round.
    assert client.triggers == [0, 5, 0, 5, 0, 5]
    assert [(r.vector, r.sent, r.returned, r.ok) for r in results] == [
        (0, 3, 3, True),
        (5, 3, 3, True),
    ]
    assert results[0].rtts == pytest.approx([0.001, 0.003, 0.002])
    lines = format_ping("msix", results, 1.0)
    assert lines[0] == ("msix 0: 3/3 came back   rtt min 1.000 ms  median 2.000 ms  max 3.000 ms")
    assert lines[-1] == "ok: all 6 triggers came back"


def test_a_lost_trigger_fails_the_vector() -> None:
    client = ScriptedClient({1: [None, 0.004]})
    results = ping(client, "msix", [1], count=2, timeout=1.0, clock=client.clock)
    [r] = results
    assert (r.sent, r.returned, r.ok) == (2, 1, False)
    assert r.rtts == pytest.approx([0.004])
    report = format_ping("msix", results, 1.0)
    assert report[0].startswith("msix 1: 1/2 came back   rtt min 4.000 ms")
    assert report[0].endswith("1 not back within 1 s")
    assert report[-1] == "FAIL: 1 of 2 triggers did not come back"
    assert ping_json("msix", results, 1.0)["ok"] is False


def test_queued_irqs_are_drained_before_each_trigger() -> None:
    # An irq that is already queued (the device fired on its own) when the
    # trigger is sent must not end the wait: only one after it may.
    client = ScriptedClient({2: [0.007]})
    client.schedule(0.0, IrqNotification("msix", ((2, 4),)))
    [r] = ping(client, "msix", [2], count=1, timeout=1.0, clock=client.clock)
    assert r.rtts == pytest.approx([0.007])


def test_other_notifications_and_indexes_are_ignored() -> None:
    client = ScriptedClient({0: [0.005]})
    client.schedule(0.001, ShutdownNotification("test"))
    client.schedule(0.002, IrqNotification("msi", ((0, 1),)))
    [r] = ping(client, "msix", [0], count=1, timeout=1.0, clock=client.clock)
    assert r.rtts == pytest.approx([0.005])


def test_intx_is_unmasked_after_each_round_trip() -> None:
    client = ScriptedClient({0: [0.001, 0.001]}, index="intx")
    [r] = ping(client, "intx", [0], count=2, timeout=1.0, clock=client.clock)
    assert r.ok
    assert client.unmasks == 2


def test_json_report() -> None:
    results = [VectorPing(3, sent=2, rtts=[0.0001, 0.0003]), VectorPing(4, sent=1)]
    assert ping_json("msix", results, 0.5) == {
        "index": "msix",
        "timeout_s": 0.5,
        "ok": False,
        "vectors": [
            {
                "vector": 3,
                "sent": 2,
                "returned": 2,
                "rtt_us": {"min": 100.0, "median": 200.0, "max": 300.0},
            },
            {"vector": 4, "sent": 1, "returned": 0, "rtt_us": None},
        ],
    }


# -- the command, against a real daemon ----------------------------------------------------------


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    """A simulated-device daemon's socket."""
    path = tmp_path / "irqd.sock"
    with running_daemon(path):
        yield path


def test_ping_reports_each_vector(sock: Path) -> None:
    result = cli("ping", "--socket", str(sock), "--count", "3", "0", "7")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("msix 0: 3/3 came back   rtt min ")
    assert lines[1].startswith("msix 7: 3/3 came back   rtt min ")
    assert lines[2] == "ok: all 6 triggers came back"


def test_ping_json(sock: Path) -> None:
    result = cli("ping", "--socket", str(sock), "--json", "--count", "4", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    [vector] = report["vectors"]
    assert (vector["vector"], vector["sent"], vector["returned"]) == (2, 4, 4)
    rtt = vector["rtt_us"]
    assert 0 < rtt["min"] <= rtt["median"] <= rtt["max"]


def test_ping_on_a_noresize_device_that_grows(tmp_path: Path) -> None:
    # Beyond the pre-armed range the daemon grows MSI-X (resized, possible_loss,
    # a loopback irq); ping still gets every one of its own triggers back.
    path = tmp_path / "nr.sock"
    with running_daemon(path, "--sim-noresize", "--msix-prearm", "2"):
        result = cli("ping", "--socket", str(path), "--count", "2", "1", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "ok: all 4 triggers came back"


def test_ping_errors(sock: Path, tmp_path: Path) -> None:
    beyond = cli("ping", "--socket", str(sock), "64")  # the simulated table has 64
    assert beyond.returncode == 1
    assert "EINVAL" in beyond.stderr
    assert "Traceback" not in beyond.stderr
    gone = cli("ping", "--socket", str(tmp_path / "none.sock"), "0")
    assert gone.returncode == 1
    assert "no daemon is listening" in gone.stderr
    usage = cli("ping", "--socket", str(sock), "--count", "0", "1")
    assert usage.returncode == 2
