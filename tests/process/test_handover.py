"""Restart without disarming: the test plays systemd's fd store between two daemon processes."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import trio

from irqproto.trio_client import TrioClient, open_client

from .fakesystemd import LAUNCHER, FakeManager, child_env, daemon_argv, run_daemons

#: Until SIGINT, 2000 rounds a second over vectors 0-3.
FIRE_ARGS = ["--count", "0", "--rate", "2000", "0", "1", "2", "3"]

#: Guards against a hang; nothing waits for a fixed time.
DEADLINE = 15


async def read_counts(client: TrioClient, got: dict[int, int]) -> None:
    """Add the counts of the next notification (if it is ``irq``) to ``got``."""
    batch = await client.next_notification()
    for vector, count in getattr(batch, "counts", ()):
        got[vector] = got.get(vector, 0) + count


async def settle(client: TrioClient, got: dict[int, int], expected: dict[int, int]) -> None:
    """Read until the totals reach ``expected``; more than that fails."""
    while got != expected:
        assert all(got.get(v, 0) <= n for v, n in expected.items()), (got, expected)
        await read_counts(client, got)
    assert got == expected


@pytest.mark.parametrize("hot_loop", ["native", "python"])
async def test_restart_through_the_fd_store_loses_no_interrupt_and_drops_no_client(
    tmp_path: Path, hot_loop: str
) -> None:
    sock = await run_daemons(
        tmp_path,
        lambda manager, sock, procs: restart_with_clients(manager, sock, tmp_path, procs, hot_loop),
    )
    assert not sock.exists()


async def restart_with_clients(
    manager: FakeManager, sock: Path, tmp_path: Path, procs: list[trio.Process], hot_loop: str
) -> None:
    env = child_env(manager)
    with trio.fail_after(DEADLINE):
        with (tmp_path / "old.log").open("wb") as logs:  # the child has its own copy
            old = await trio.lowlevel.open_process(
                [sys.executable, *daemon_argv(sock, hot_loop)], env=env, stdout=logs
            )
        procs.append(old)
        await manager.wait_for("READY", "1")
        async with (
            open_client(str(sock), client_name="a") as a,
            open_client(str(sock), client_name="b") as b,
        ):
            await a.subscribe("msix", [0, 1, 2])
            await b.subscribe("msix", [1, 2, 3])
            before = {c["name"]: c["id"] for c in (await a.stats())["clients"]}
            # The test's own handle on the "hardware": the sim's vector eventfds.
            hw = dict(zip([0, 1, 2, 3], await a.sim_eventfds("msix", [0, 1, 2, 3]), strict=True))
            for fd in hw.values():
                os.eventfd_write(fd, 5)
            # Another process fires all the while, until the new daemon is ready.
            with (tmp_path / "fire.out").open("wb") as out:
                fire = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "irqd",
                        "sim",
                        "fire",
                        "--socket",
                        str(sock),
                        *FIRE_ARGS,
                    ],
                    env=env,
                    stdout=out,
                )
            procs.append(fire)
            got_a: dict[int, int] = {}
            got_b: dict[int, int] = {}
            # Hand over while the other process is firing: once its interrupts arrive.
            while got_a.get(0, 0) <= 5:
                await read_counts(a, got_a)
            # The old process keeps running until its fds are in the store.
            old.send_signal(signal.SIGUSR2)
            assert await old.wait() == 75
            # As systemd: the store keeps its fds while the next process gets copies.
            stored = manager.copy_store()
            names = [name for name, _ in stored]
            assert names[-1] == "state"
            # Each name once: the hand-over's FDSTORE=1 of a file the live store
            # holds already was ignored, as systemd does.
            assert len(names) == len(set(names)), names
            # event-req: the daemon's own REQ eventfd, kept assigned across the restart.
            assert {"listener", "vector-2-0", "vector-2-3", "event-req"} <= set(names)
            assert {"live-state", "guard"} <= set(names)
            # a and b (the firing process's connection too while it lives: the
            # new process closes it if the hand-over left it out).
            carried = {f"client-{sid}" for sid in before.values()}
            assert carried <= set(names), names
            # Nobody runs the device now: these wait in the eventfds.
            for fd in hw.values():
                os.eventfd_write(fd, 7)
            fds = [fd for _, fd in stored]
            mark = len(manager.messages)
            with (tmp_path / "new.log").open("wb") as out:
                new = await trio.lowlevel.open_process(
                    [sys.executable, "-c", LAUNCHER, *daemon_argv(sock, hot_loop)],
                    env=env
                    | {"HANDOVER_FDS": ",".join(map(str, fds)), "LISTEN_FDNAMES": ":".join(names)},
                    pass_fds=fds,
                    stdout=out,
                )
            procs.append(new)
            for fd in fds:
                os.close(fd)
            await manager.wait_for("READY", "1", since=mark)
            # The new process keeps what it adopted in the store (a crash now must
            # not reset the device) and removed only the hand-over's sealed state.
            removed = {
                m["FDNAME"] for m in manager.messages[mark:] if m.get("FDSTOREREMOVE") == "1"
            }
            assert "state" in removed and not removed & (set(names) - {"state"}) - {
                name for name in names if name.startswith("client-") and name not in carried
            }, removed
            assert set(manager.names()) == set(names) - removed
            fire.send_signal(signal.SIGINT)
            assert await fire.wait() == 0
            fired = (tmp_path / "fire.out").read_text()
            rounds = {int(v): int(n) for v, n in re.findall(r"v(\d+) (\d+)", fired)}
            assert set(rounds) == {0, 1, 2, 3} and len(set(rounds.values())) == 1, fired
            for fd in hw.values():
                os.eventfd_write(fd, 1)
                os.close(fd)
            total = {v: 5 + 7 + 1 + rounds[v] for v in rounds}
            # Same connections, nothing lost, nothing twice.
            await settle(a, got_a, {v: total[v] for v in (0, 1, 2)})
            await settle(b, got_b, {v: total[v] for v in (1, 2, 3)})
            after = {c["name"]: c["id"] for c in (await a.stats())["clients"]}
            assert after == before
            # The protocol state came along: unsubscribe answers, and it flushes.
            assert (await b.unsubscribe("msix", [3]))["vectors"] == [3]
        new.send_signal(signal.SIGTERM)
        assert await new.wait() == 0
