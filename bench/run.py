"""Forwarding latency and throughput of the daemon on the simulated device.

Prints figures; asserts only that counts were exact. Run with ``make bench``.

For each N in (1, 64, 2048) vectors registered (subscribed by a second client,
so every one sits in the epoll set), one client subscribes to vector 0, writes
its eventfd and waits for the ``irq`` notification: the round trip from
eventfd write to receipt, p50/p90/p99 over many samples. Then a burst phase
measures interrupts/s and notifications/s delivered with exact totals.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from irqproto.blocking import Client


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            with Client(str(path), client_name="bench-probe"):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("daemon did not come up")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(path: Path, registered: int, samples: int, burst: int) -> dict[str, float]:
    with (
        Client(str(path), client_name="bench-registrar") as registrar,
        Client(str(path), client_name="bench-probe") as probe,
    ):
        if registered > 1:
            registrar.subscribe("msix", list(range(1, registered)))
        probe.subscribe("msix", [0])
        (efd,) = probe.sim_eventfds("msix", [0])
        try:
            latencies = []
            for _ in range(samples):
                start = time.perf_counter_ns()
                os.eventfd_write(efd, 1)
                note = probe.next_notification(timeout=5)
                latencies.append((time.perf_counter_ns() - start) / 1000)
                assert getattr(note, "counts", None) == ((0, 1),), note
            start_s = time.perf_counter()
            for _ in range(burst):
                os.eventfd_write(efd, 1)
            received = 0
            notifications = 0
            while received < burst:
                note = probe.next_notification(timeout=5)
                notifications += 1
                received += dict(getattr(note, "counts", ()))[0]
            elapsed = time.perf_counter() - start_s
            assert received == burst, (received, burst)
        finally:
            os.close(efd)
    return {
        "p50_us": statistics.median(latencies),
        "p90_us": percentile(latencies, 0.90),
        "p99_us": percentile(latencies, 0.99),
        "irqs_per_s": burst / elapsed,
        "notifications_per_s": notifications / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--burst", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="irqd-bench-") as tmp:
        path = Path(tmp) / "irqd.sock"
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "irqd",
                "serve",
                "--sim",
                "--sim-vectors",
                "2048",
                "--socket",
                str(path),
                "--log-level",
                "warning",
            ],
        )
        try:
            wait_for_socket(path, daemon)
            print(
                f"{'registered':>10} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} "
                f"{'irq/s':>10} {'notif/s':>10}"
            )
            for registered in (1, 64, 2048):
                r = measure(path, registered, args.samples, args.burst)
                print(
                    f"{registered:>10} {r['p50_us']:>8.1f} {r['p90_us']:>8.1f} "
                    f"{r['p99_us']:>8.1f} {r['irqs_per_s']:>10.0f} "
                    f"{r['notifications_per_s']:>10.0f}"
                )
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
