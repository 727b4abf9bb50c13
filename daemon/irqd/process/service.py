"""The daemon process: socket, device, signals, systemd, start to exit.

``serve`` takes the listening socket (inherited from systemd or bound here),
opens or adopts the device (after a hand-over, from the fd store), runs a
:class:`irqd.server.daemon.Daemon` until a signal, and tidies up: SIGINT/SIGTERM
stop, SIGHUP reloads the config file, SIGUSR2 hands everything over to the
next process. ``run`` is the CLI's blocking entry point.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import trio

from irqd.config import ServerConfig
from irqd.device.base import Device, IrqIndex
from irqd.device.events import REMOVAL_GRACE_SECONDS
from irqd.device.sim import SimDevice
from irqd.device.uevent import UeventSource, is_device_gone, open_uevent_source, wait_for_vfio
from irqd.errors import ConfigError
from irqd.eventfd import EventFd
from irqd.process.activation import InheritedFds, inherited_fds, take_listener
from irqd.process.fdstore import (
    EXIT_HANDED_OVER,
    LISTENER_NAME,
    STATE_NAME,
    STORED_PREFIXES,
    Carried,
    HandoverError,
    adopt_device,
    stored_names,
    take_carried,
)
from irqd.process.sdnotify import Notifier, watchdog_interval
from irqd.server.daemon import Daemon

log = structlog.get_logger("irqd.process.service")


def open_device(config: ServerConfig) -> Device:
    """The device backend ``config`` names."""
    if config.device is not None:
        # Imported here: the sim-only paths (and the tests) never need the ioctls.
        from irqd.device.vfio import VfioDevice  # noqa: PLC0415

        return VfioDevice(config.device)
    sim = config.sim
    return SimDevice(
        msix_vectors=sim.msix_vectors,
        noresize=sim.noresize,
        msi_vectors=sim.msi_vectors,
        intx=sim.intx,
    )


def bind_listener(path: Path, mode: int) -> socket.socket:
    """A listening Unix socket at ``path`` created with ``mode`` from the start.

    A leftover socket file is replaced only if nothing answers on it: a live
    daemon's socket is never stolen.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()
            log.info("socket.stale_removed", path=str(path))
        else:
            raise ConfigError(f"{path}: another daemon is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # bind() creates the file with the umask applied; setting the umask first
    # means there is no moment at which the socket has looser permissions.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock


def describe(config: ServerConfig, daemon: Daemon) -> dict[str, Any]:
    """What the start-up log line says about this instance."""
    msix = daemon.table.info[IrqIndex.MSIX]
    return {
        "socket": str(config.socket_path),
        "device": daemon.device.name,
        "msix_vectors": msix.count,
        "msix_noresize": msix.noresize,
        "msix_strategy": str(daemon.table.msix_strategy),
        "native_dispatch": daemon.own_loop.dispatcher.native,
        "hot_loop": daemon.hot.name,
    }


@contextlib.contextmanager
def running_daemon(
    config: ServerConfig,
    device: Device | None = None,
    events: dict[IrqIndex, EventFd] | None = None,
    *,
    notifier: Notifier | None = None,
    socket_path: Path | None = None,
) -> Iterator[Daemon]:
    """A ``Daemon`` whose device and fds are released however the block ends.

    ``events``: REQ/ERR eventfds carried over by a hand-over (owned from now on).
    ``socket_path``: the socket file this process removes when it stops.
    """
    device = device if device is not None else open_device(config)
    try:
        daemon = Daemon(
            config,
            device,
            carried_events=dict(events or {}),
            notifier=notifier if notifier is not None else Notifier(None),
            socket_path=socket_path,
        )
    except BaseException:
        for efd in (events or {}).values():
            efd.close()
        device.close()
        raise
    try:
        yield daemon
    finally:
        daemon.close()


def _open_uevents(stack: contextlib.ExitStack, config: ServerConfig) -> UeventSource | None:
    """Kernel uevents for a real device (closed with ``stack``), where they can be had."""
    if config.device is None:
        return None
    try:
        return stack.enter_context(open_uevent_source())
    except Exception as exc:  # pyroute2's NetlinkError is not an OSError
        if config.wait_for_device:
            raise ConfigError(f"--wait needs kernel uevents: {exc}") from exc
        log.warning("uevent.unavailable", error=str(exc), note="removal is seen by REQ")
        return None


def _adopt(carried: Carried, config: ServerConfig) -> tuple[Device | None, Carried | None]:
    """The device a previous process stored, with what it carried; ``(None, None)``
    (logged, ``carried`` closed) when it cannot be adopted: start afresh then."""
    try:
        return adopt_device(carried, lambda: open_device(config), config.device), carried
    except (HandoverError, ValueError, KeyError, TypeError, OSError) as exc:
        log.error("handover.adopt_failed", error=str(exc), note="starting afresh")
        carried.close()
        return None, None


def _from_store(name: str) -> bool:
    return name in (STATE_NAME, LISTENER_NAME) or name.startswith(STORED_PREFIXES)


async def _watch_device(daemon: Daemon, source: UeventSource, bdf: str) -> None:
    """Start the orderly release (irqd.device.events) when a uevent says the device went."""
    while True:
        event = await source.receive()
        reason = is_device_gone(event, bdf)
        if reason is None:
            continue
        log.warning("device.gone", device=bdf, reason=reason, uevent=event.action)
        daemon.events.device_gone(reason)
        if reason == "removed":
            return
        # An unbind may be the first half of a removal: keep listening until
        # the daemon stops, so that clients can be told ``removed``.


async def serve(
    config: ServerConfig,
    *,
    device: Device | None = None,
    notifier: Notifier | None = None,
    inherited: InheritedFds | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run the daemon until cancelled or a signal; returns the exit status.

    ``task_status`` gets the Daemon once it serves. ``notifier`` and
    ``inherited`` default to ``$NOTIFY_SOCKET`` and ``$LISTEN_FDS``.
    Signals: SIGINT/SIGTERM stop (0), SIGHUP reloads the config file, SIGUSR2
    hands everything over to the next process (:data:`EXIT_HANDED_OVER`).
    """
    notifier = notifier if notifier is not None else Notifier.from_environment()
    inherited = inherited if inherited is not None else inherited_fds()
    # What came from the fd store is removed from it once taken: systemd would
    # otherwise keep every client socket open after its session ends.
    stored = stored_names(inherited)
    carried = take_carried(inherited)
    handed_over = False
    with contextlib.ExitStack() as stack:
        raw, owns_path = take_listener(
            inherited, _from_store, lambda: bind_listener(config.socket_path, config.socket_mode)
        )
        stack.callback(raw.close)
        if carried is not None and carried.state.get("socket_path"):
            owns_path = True  # the previous process bound it; this one inherits the duty
        if owns_path:
            # Not after a hand-over: the next process serves on this very file.
            stack.callback(_unlink_unless, config.socket_path, lambda: handed_over)
        source = _open_uevents(stack, config)
        if carried is not None:
            adopted, carried = _adopt(carried, config)
            device = adopted if adopted is not None else device
        if device is None and config.wait_for_device and config.device is not None:
            assert source is not None
            notifier.status(f"waiting for {config.device} to be bound to vfio-pci")
            await wait_for_vfio(config.device, source)
        left = inherited.close_rest()
        if left:
            log.warning("activation.unused_fds", names=left)
        events = carried.events if carried is not None else None
        socket_path = config.socket_path if owns_path else None
        with running_daemon(
            config, device, events, notifier=notifier, socket_path=socket_path
        ) as daemon:
            if carried is not None:
                daemon.adopt(carried.state, carried.eventfds, carried.clients)
            for name in stored:
                notifier.notify({"FDSTOREREMOVE": 1, "FDNAME": name})
            listener = trio.socket.from_stdlib_socket(raw)
            status = await _serve_until_signalled(
                daemon, listener, source, adopted=carried is not None, task_status=task_status
            )
            handed_over = status == EXIT_HANDED_OVER
        log.info("daemon.stopped", handed_over=handed_over, status=status)
    return status


async def _serve_until_signalled(
    daemon: Daemon,
    listener: trio.socket.SocketType,
    source: UeventSource | None,
    *,
    adopted: bool,
    task_status: trio.TaskStatus[Daemon],
) -> int:
    config, notifier = daemon.config, daemon.notifier
    status = 0
    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve, listener)
            # On REQ: clients told device_lost, then this nursery ends (exit 0).
            nursery.start_soon(daemon.events.watch, nursery.cancel_scope)
            if source is not None and config.device is not None:
                daemon.events.removal_grace = REMOVAL_GRACE_SECONDS
                nursery.start_soon(_watch_device, daemon, source, config.device)
            # The device is open and the socket listens: now, and only now, ready.
            notifier.ready(daemon.status_line())
            nursery.start_soon(daemon.status.status_loop)
            interval = watchdog_interval()
            if interval is not None:
                nursery.start_soon(daemon.status.watchdog_loop, interval / 2)
            log.info("daemon.ready", **describe(config, daemon), adopted=adopted)
            task_status.started(daemon)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    daemon.reload()
                    continue
                if signum == signal.SIGUSR2:
                    if not await daemon.hand_over():
                        continue
                    notifier.stopping("handed over to the next process")
                    status = EXIT_HANDED_OVER
                else:
                    notifier.stopping(f"stopping ({name})")
                    log.info("daemon.stopping", signal=name)
                    await daemon.stop(f"daemon stopping ({name})")
                nursery.cancel_scope.cancel()
                break
    return status


def _unlink_unless(path: Path, keep: Callable[[], bool]) -> None:
    if keep():
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def run(config: ServerConfig) -> int:
    """Blocking entry point for the CLI; returns the process exit code.

    0 after SIGTERM/SIGINT (or a released device), :data:`EXIT_HANDED_OVER`
    (75) after a hand-over, 2 for a configuration the device cannot work
    with, 1 for any other failure to start or run.
    """
    try:
        status: int = trio.run(serve, config)
    except ConfigError as exc:
        log.error("daemon.config_error", error=str(exc))
        return 2
    except OSError as exc:
        log.error("daemon.failed", error=str(exc), errno=exc.errno)
        return 1
    return status
