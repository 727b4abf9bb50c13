"""The daemon process: socket, device, signals, systemd, start to exit.

``serve`` takes the listening socket (inherited from systemd or bound here),
opens or adopts the device (after a hand-over, from the fd store), runs a
:class:`irqd.server.daemon.Daemon` until a signal, and tidies up: SIGINT/SIGTERM
stop, SIGHUP reloads the config file, SIGUSR2 hands everything over to the
next process. Under a service manager with an fd store, everything a restart
needs is kept there all the time (irqd.process.livestore), so that a start
after a crash adopts the device instead of resetting it. ``run`` is the CLI's
blocking entry point.
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
from irqd.metrics import metrics_loop
from irqd.process.activation import InheritedFds, inherited_fds, take_listener
from irqd.process.fdstore import (
    EXIT_HANDED_OVER,
    GUARD_NAME,
    LISTENER_NAME,
    LIVE_STATE_NAME,
    STATE_NAME,
    STORED_PREFIXES,
    Carried,
    HandoverError,
    adopt_device,
    stored_names,
    take_carried,
)
from irqd.process.livestore import FdIdentity, fd_identity
from irqd.process.restartjob import restart_pending
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
    except Exception:
        # The daemon failed: what the fd store holds is left for the restart.
        daemon.close(crashed=True)
        raise
    except BaseException:
        daemon.close()
        raise
    else:
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
    return name in (STATE_NAME, LISTENER_NAME, LIVE_STATE_NAME, GUARD_NAME) or name.startswith(
        STORED_PREFIXES
    )


def _identities(inherited: InheritedFds, names: list[str]) -> dict[str, FdIdentity]:
    """What the fd store holds under each of ``names``: the identity of the fd this
    process inherited for it (irqd.process.livestore)."""
    held: dict[str, FdIdentity] = {}
    for name in names:
        fds = inherited.fds.get(name)
        if fds:
            with contextlib.suppress(OSError):
                held[name] = fd_identity(fds[0])
    return held


async def _empty_store(notifier: Notifier, names: list[str]) -> None:
    """Remove ``names`` from the fd store before the device is opened afresh: its
    copies of the old fds would keep the VFIO group busy (one open at a time)."""
    if not names:
        return
    for name in names:
        notifier.notify({"FDSTOREREMOVE": 1, "FDNAME": name})
    try:
        await trio.to_thread.run_sync(notifier.barrier)
    except (TimeoutError, OSError) as exc:
        log.warning("livestore.barrier_failed", error=str(exc))


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
    # What came from the fd store stays there while it is used and is removed
    # once it is not (the live store's first sync): systemd would otherwise keep
    # a client socket open after its session ended.
    stored = stored_names(inherited)
    held = _identities(inherited, stored)
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
        if carried is None and stored:
            # Nothing adopted: whatever the store holds is stale.
            await _empty_store(notifier, stored)
            held = {}
        if device is None and config.wait_for_device and config.device is not None:
            assert source is not None
            waiting = f"waiting for {config.device} to be bound to vfio-pci"
            await wait_for_vfio(config.device, source, waiting=lambda: notifier.status(waiting))
        left = inherited.close_rest()
        if left:
            log.warning("activation.unused_fds", names=left)
        events = carried.events if carried is not None else None
        socket_path = config.socket_path if owns_path else None
        with running_daemon(
            config, device, events, notifier=notifier, socket_path=socket_path
        ) as daemon:
            guard_fd = carried.guard_fd if carried is not None else None
            live_state_fd = carried.live_state_fd if carried is not None else None
            if carried is not None:
                carried.guard_fd = carried.live_state_fd = None  # taken from here on
            marks = daemon.open_guard(guard_fd)
            if carried is not None:
                daemon.adopt(
                    carried.state,
                    carried.eventfds,
                    carried.clients,
                    live=carried.live,
                    marks=marks,
                )
            listener = trio.socket.from_stdlib_socket(raw)
            # Admission is not running yet: the listener is stored by hand here.
            daemon.admission.listener = listener
            if not daemon.start_live(held, live_state_fd):
                # No live store: what came from the store is this process's alone.
                for name in held:
                    notifier.notify({"FDSTOREREMOVE": 1, "FDNAME": name})
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
            # The Prometheus textfile (docs/metrics.md); the file and interval are
            # read each round so that a reload can change them.
            nursery.start_soon(
                metrics_loop,
                daemon.handlers.stats,
                daemon.device.name,
                lambda: (
                    daemon.config.metrics_file if daemon.handover.serving else None,
                    daemon.config.metrics_interval,
                ),
            )
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
                if await _hands_over(signum, notifier):
                    if await daemon.hand_over():
                        notifier.stopping("handed over to the next process")
                        status = EXIT_HANDED_OVER
                        nursery.cancel_scope.cancel()
                        break
                    if signum == signal.SIGUSR2:
                        continue  # called off: serving as before
                    # A restart that cannot hand over is a stop and a start.
                notifier.stopping(f"stopping ({name})")
                log.info("daemon.stopping", signal=name)
                await daemon.stop(f"daemon stopping ({name})")
                nursery.cancel_scope.cancel()
                break
    return status


async def _hands_over(signum: int, notifier: Notifier) -> bool:
    """Whether ``signum`` asks for a hand-over to the next process rather than a stop.

    SIGUSR2 always does. SIGTERM does when it is the stop half of ``systemctl
    restart``: systemd keeps the fd store for the start that follows, and the
    job it runs says so (irqd.process.restartjob).
    """
    if signum == signal.SIGUSR2:
        return True
    return signum == signal.SIGTERM and notifier.enabled and await restart_pending()


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
        # With the traceback: an OSError from deep inside start-up (an ioctl, an
        # adopted fd) is otherwise hard to place.
        log.error("daemon.failed", error=str(exc), errno=exc.errno, exc_info=exc)
        return 1
    return status
