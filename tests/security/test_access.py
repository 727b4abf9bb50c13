"""Access control end to end, with a real second uid (``nobody``) on the socket.

The interpreter lives under /root, which ``nobody`` may not enter, so the second
uid cannot exec Python; instead the test process forks and the child drops to
``nobody`` with setgroups/setgid/setuid before it connects. The kernel records
the child's credentials at ``connect()`` (SO_PEERCRED), exactly as for any
other process of that uid.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

from irqd.config import ServerConfig, SimConfig
from irqd.device.base import IrqIndex
from irqd.policy import AccessPolicy
from irqd.process.service import serve
from irqd.server.daemon import Daemon
from irqproto.blocking import Client
from irqproto.errors import RpcError

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory ``nobody`` can reach (pytest's tmp_path is under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="irqd-access-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def as_nobody(work: Callable[[], Any], groups: list[int] | None = None) -> Any:
    """Run ``work`` in a forked child that is uid/gid ``nobody`` (with ``groups`` as
    its supplementary groups); returns its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Trio here, only blocking sockets
        code = 0
        try:
            os.close(read_end)
            os.setgroups(groups or [])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = {"ok": work()}
        except BaseException as exc:
            result = {"error": repr(exc)}
            code = 1
        finally:
            with os.fdopen(write_end, "w") as out:
                json.dump(result, out)
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as incoming:
        data = incoming.read()
    os.waitpid(pid, 0)
    outcome = json.loads(data)
    if "error" in outcome:
        raise AssertionError(f"child failed: {outcome['error']}")
    return outcome["ok"]


def attempt(path: str, *calls: tuple[str, list[Any]], hello: bool = True) -> list[Any]:
    """Each call's result, or ``[code, message]`` for an error."""
    out: list[Any] = []
    try:
        client = Client(path, client_name="nobody", hello=hello, timeout=5)
    except RpcError as exc:
        return [[exc.code, exc.message]]
    with client:
        out.append(["pid", os.getpid(), "uid", os.getuid()])
        for method, params in calls:
            try:
                if method == "claim":
                    fd = client.claim(*params)
                    os.close(fd)
                    out.append("claimed")
                else:
                    out.append(client.call(method, params))
            except RpcError as exc:
                out.append([exc.code, exc.message])
    return out


async def start(path: Path, policy: AccessPolicy | None, nursery: trio.Nursery) -> Daemon:
    config = ServerConfig(
        socket_path=path / "irqd.sock",
        sim=SimConfig(msix_vectors=8),
        socket_mode=0o666,  # the file lets anyone in: the policy is what decides
        access_policy=policy,
    )
    daemon: Daemon = await nursery.start(serve, config)
    return daemon


async def test_by_default_a_stranger_is_refused_with_eacces_and_logged(
    world_dir: Path, nursery: trio.Nursery
) -> None:
    daemon = await start(world_dir, None, nursery)
    path = str(daemon.config.socket_path)
    with structlog.testing.capture_logs() as logs:
        result = await trio.to_thread.run_sync(as_nobody, lambda: attempt(path))
    ((code, message),) = result
    assert code == "EACCES"
    assert "uid 65534 may not connect" in message
    (denied,) = [e for e in logs if e["event"] == "access.denied"]
    assert denied["uid"] == NOBODY
    assert denied["pid"] > 0
    assert denied["action"] == "connect"
    assert not daemon.sessions
    # root, as the default allows, goes on as usual
    stats = await trio.to_thread.run_sync(lambda: attempt(path, ("stats", []))[1])
    assert stats["clients"][0]["uid"] == 0


async def test_the_policy_decides_per_action_and_per_vector(
    world_dir: Path, nursery: trio.Nursery
) -> None:
    policy = AccessPolicy.from_mapping(
        {
            "connect": ["root", f"uid:{NOBODY}"],
            "stats": ["root"],
            "trigger": ["root"],
            "vectors": [
                {"index": "msix", "vectors": [1], "subscribe": ["root"]},
                {"index": "msix", "vectors": [2, 3], "claim": ["root"]},
            ],
        }
    )
    daemon = await start(world_dir, policy, nursery)
    path = str(daemon.config.socket_path)
    with structlog.testing.capture_logs() as logs:
        result = await trio.to_thread.run_sync(
            as_nobody,
            lambda: attempt(
                path,
                ("subscribe", ["msix", [0]]),
                ("subscribe", ["msix", [0, 1]]),
                ("claim", ["msix", 4]),
                ("claim", ["msix", 2]),
                ("trigger", ["msix", [0]]),
                ("sim.eventfds", ["msix", [0]]),
                ("stats", []),
                ("device.info", []),
            ),
        )
    ident, sub0, sub01, claim4, claim2, trig, simfds, stats, info = result
    child_pid = ident[1]
    assert ident[3] == NOBODY
    assert sub0["vectors"] == [0]
    assert sub01[0] == "EACCES"
    assert sub01[1] == "uid 65534 may not subscribe to msix vector 1 (allowed: uid:0)"
    assert claim4 == "claimed"
    assert claim2[0] == "EACCES"
    assert trig[0] == simfds[0] == stats[0] == "EACCES"
    assert "read stats" in stats[1]
    assert info["msix"]["count"] == 8
    denied = [e for e in logs if e["event"] == "access.denied"]
    assert [e["method"] for e in denied] == [
        "subscribe",
        "claim",
        "trigger",
        "sim.eventfds",
        "stats",
    ]
    assert {(e["pid"], e["uid"]) for e in denied} == {(child_pid, NOBODY)}
    # A refused subscribe changed nothing (all or nothing): vector 0 was the
    # child's alone and went away with it, vector 1 was never enabled.
    with trio.fail_after(5):
        await daemon.wait_sessions(0)
    assert daemon.table.enabled(IrqIndex.MSIX) == []
    as_root = await trio.to_thread.run_sync(
        lambda: attempt(path, ("device.info", []), ("subscribe", ["msix", [1]]))
    )
    assert as_root[1]["msix"]["enabled"] == []
    assert as_root[2]["vectors"] == [1]  # root may


async def test_socket_group_membership_through_supplementary_groups(
    world_dir: Path, nursery: trio.Nursery
) -> None:
    # nobody with the socket's group as a supplementary group gets in by default.
    daemon = await start(world_dir, None, nursery)
    path = str(daemon.config.socket_path)
    gid = daemon.config.socket_path.stat().st_gid
    assert gid != NOBODY
    result = await trio.to_thread.run_sync(
        lambda: as_nobody(lambda: attempt(path, ("device.info", [])), groups=[gid])
    )
    assert result[0][3] == NOBODY
    assert result[1]["msix"]["count"] == 8


def test_peer_credentials_carry_supplementary_groups() -> None:
    from irqd.hotpath.session import _peer_groups  # noqa: PLC0415  private helper under test

    a, b = socket.socketpair()
    with a, b:
        groups = _peer_groups(trio.socket.from_stdlib_socket(a))
        assert groups == frozenset(os.getgroups())
