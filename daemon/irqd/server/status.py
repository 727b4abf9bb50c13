"""What systemd hears while the daemon runs: ``STATUS=``, the watchdog's ``WATCHDOG=1``,
and (each status period) the live fd store's record brought up to date."""

from __future__ import annotations

import structlog
import trio

from irqd.device.base import Device, IrqIndex
from irqd.hotpath.interface import HotLoop
from irqd.hotpath.python import PollLoop
from irqd.process.sdnotify import Notifier
from irqd.server.handover import HandoverController
from irqd.server.sessions import SessionSet
from irqd.server.vectors import VectorTable

log = structlog.get_logger("irqd.server.status")

#: How often ``STATUS=`` is looked at (and sent only when it changed).
STATUS_PERIOD = 1.0

#: Longest the watchdog waits (blocking) for a hot loop's thread to answer a
#: poke; one that does not is stuck, and the ping is withheld.
HOT_THREAD_ANSWER_S = 0.25


class Status:
    """The status line and the watchdog, from the daemon's parts."""

    def __init__(
        self,
        device: Device,
        table: VectorTable,
        sessions: SessionSet,
        loops: tuple[PollLoop, HotLoop],
        handover: HandoverController,
    ) -> None:
        """``loops``: the daemon's own loop and the hot loop, both proven alive."""
        self.device = device
        self.table = table
        self.sessions = sessions
        self.own, self.hot = loops
        self.handover = handover

    @property
    def notifier(self) -> Notifier:
        return self.handover.notifier

    def line(self) -> str:
        """The one-line summary for ``STATUS=`` (``systemctl status``)."""
        # REQ and ERR are the daemon's own; the line counts the device's interrupts.
        enabled = sum(
            len(self.table.enabled(i)) for i in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX)
        )
        host = sum(self.table.host_vectors().values())
        clients = len(self.sessions)
        return (
            f"{self.device.name}: {clients} client{'s' * (clients != 1)}, "
            f"{enabled} vector{'s' * (enabled != 1)} enabled, {host} host vectors, "
            f"msix {self.table.msix_strategy}"
        )

    async def status_loop(self, period: float = STATUS_PERIOD) -> None:
        """Keep ``STATUS=`` current: looked at every ``period``, sent when it changed."""
        last = ""
        while True:
            line = self.line()
            if line != last and self.handover.serving:
                self.notifier.status(line)
                last = line
            # The live-state record's totals and counters, kept fresh while no
            # request comes (a no-op without a live store, or when unchanged).
            self.handover.record()
            await trio.sleep(period)

    async def watchdog_loop(self, period: float) -> None:
        """``WATCHDOG=1`` every ``period`` for as long as the loops go round.

        Each period both loops are poked (the daemon's own through its
        heartbeat eventfd, the hot loop through its own means), and a ping is
        sent only if both went round since. A loop that hangs (or died)
        therefore stops the pings, and systemd's ``WatchdogSec=`` restarts the
        service.
        """
        self._poke()
        stalled = False
        while True:
            await trio.sleep(period)
            alive = self.own.responds()
            # During a hand-over the hot loop is stopped (then closed); the
            # daemon's own loop alone speaks for the process then.
            if alive and self.handover.serving:
                # Blocking, on purpose and briefly, for a thread: a live one
                # answers in microseconds. Waiting through Trio instead (a
                # worker thread or an eventfd) would let a test's autojumping
                # clock run out before a real thread could be scheduled at all.
                alive = self.hot.responds(min(period, HOT_THREAD_ANSWER_S))
            if alive:
                self.notifier.watchdog()
                stalled = False
            elif not stalled and self.handover.serving:
                stalled = True
                log.error(
                    "watchdog.stalled",
                    rounds=self.own.rounds,
                    hot_rounds=self.hot.rounds,
                    period_s=period,
                )
            self._poke()

    def _poke(self) -> None:
        self.own.poke()
        if self.handover.serving:
            self.hot.poke()
