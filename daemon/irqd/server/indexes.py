"""What the kernel has enabled per IRQ index, and how vectors get there: the MSI-X strategies.

VFIO_DEVICE_SET_IRQS is the only way in. An index is enabled once with a
range of host vectors (``armed``) or, for dynamic MSI-X, vector by vector
(``allocated``); :class:`DeviceIndexes` records what it asked for, so that the
vector table can undo a failure from its own record and a hand-over can carry
it to the next process. How an MSI-X vector is added (docs/design.md, MSI-X
strategies):

* ``dynamic`` (NORESIZE clear, Linux 6.5+): enable once with ``start=0,
  count=1, fd=-1`` (enabling at vector N would allocate N+1 host vectors), then
  one ``count=1`` call per vector. Nothing else is touched.
* ``prearm`` (NORESIZE set): enable a bounded range once with every fd -1, then
  assign single vectors inside it. MSI-X is never disabled while vectors live.
* ``grow`` (NORESIZE set and the vector lies beyond the enabled range): disable,
  enable again with the same eventfds and -1 for gaps (QEMU's
  ``vfio_msix_vector_do_use``, hw/vfio/pci.c). Interrupts in that window are
  lost: the table settles the live vectors before it and tells their
  subscribers after it (:class:`ResizeWatcher`).

INTx, MSI and MSI-X cannot be enabled at the same time
(drivers/vfio/pci/vfio_pci_intrs.c: "another index active" is EINVAL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from irqd.config import DEFAULT_PREARM_CAP, MsixStrategy
from irqd.device.base import Device, IrqIndex, IrqInfo
from irqd.errors import EBUSY, ENOSPC, ConfigError, IrqdError, device_error
from irqd.eventfd import EventFd

log = structlog.get_logger("irqd.server.vectors")

#: INTx, MSI and MSI-X cannot be enabled at the same time (vfio_pci_intrs.c:
#: "another index active" is EINVAL).
EXCLUSIVE_INDEXES = frozenset({IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX})


class ResizeWatcher(Protocol):
    """What a grow needs of the vector table: the live vectors around the window."""

    def resize_live(self, index: IrqIndex) -> dict[int, EventFd]:
        """The enabled vectors of ``index`` and their eventfds, kept across the grow."""

    def resize_starting(self, index: IrqIndex) -> None:
        """Credit what is in the live vectors' eventfds: the window opens."""

    def resize_done(self, index: IrqIndex) -> None:
        """The window closed (or the grow failed): tell the live vectors' holders."""


@dataclass
class _IndexState:
    """What the kernel has for one index, as far as the daemon asked for it."""

    active: bool = False
    #: Host vectors enabled as one range (MSI, or MSI-X when not dynamic).
    armed: int = 0
    #: MSI-X vectors the kernel allocated one by one (dynamic); they stay
    #: allocated after de-assign until the index is disabled.
    allocated: set[int] = field(default_factory=set)

    def reset(self) -> None:
        """The index was disabled: the kernel freed every host vector."""
        self.active = False
        self.armed = 0
        self.allocated = set()


class DeviceIndexes:
    """What the daemon has enabled on the device, per index, and how it enables more."""

    def __init__(
        self,
        device: Device,
        info: dict[IrqIndex, IrqInfo],
        *,
        msix_strategy: MsixStrategy = MsixStrategy.AUTO,
        msix_prearm: int | None = None,
    ) -> None:
        self.device = device
        self.info = info
        self.msix_strategy = resolve_msix_strategy(info[IrqIndex.MSIX], msix_strategy)
        self.msix_prearm = resolve_prearm(info[IrqIndex.MSIX], msix_prearm)
        self._state = {index: _IndexState() for index in IrqIndex}

    def is_active(self, index: IrqIndex) -> bool:
        """Whether the daemon has enabled ``index`` on the device."""
        return self._state[index].active

    def host_vectors(self) -> dict[str, int]:
        """Host interrupt vectors the kernel holds for MSI and MSI-X."""
        result = {}
        for index in (IrqIndex.MSI, IrqIndex.MSIX):
            state = self._state[index]
            result[index.wire_name] = max(state.armed, len(state.allocated))
        return result

    def enable(self, index: IrqIndex, fds: dict[int, EventFd], watcher: ResizeWatcher) -> str:
        """Assign ``fds`` (vector number to eventfd) on the device, enabling the
        index as needed; all or nothing. Returns how (``dynamic``, ``prearm``,
        ``resize``)."""
        if index is IrqIndex.MSIX:
            return self._enable_msix(fds, watcher)
        if index is IrqIndex.MSI:
            return self._enable_ranged(index, fds, self.info[index].count)
        self._assign_each(index, fds)
        self._state[index].active = True
        return "dynamic"

    def release(self, index: IrqIndex, number: int) -> None:
        """De-assign one vector (``OSError`` or ``IrqdError`` if the device refuses)."""
        if index is IrqIndex.INTX:
            # Disable INTx entirely so that MSI or MSI-X can be enabled later.
            self.disable(index)
        else:
            self.device.assign_eventfds(index, number, [-1])

    def close(self) -> None:
        """Disable every index the daemon enabled."""
        for index, state in self._state.items():
            if state.active:
                with contextlib.suppress(OSError):
                    self.device.disable(index)
                state.reset()

    def export_state(self) -> list[list[Any]]:
        """Per index: whether active, the armed range, the allocated vectors."""
        return [
            [int(index), state.active, state.armed, sorted(state.allocated)]
            for index, state in self._state.items()
        ]

    def import_state(self, rows: list[list[Any]]) -> None:
        """Take over what ``export_state`` described, without a device call."""
        for index, active, armed, allocated in rows:
            state = self._state[IrqIndex(index)]
            state.active = bool(active)
            state.armed = int(armed)
            state.allocated = {int(n) for n in allocated}

    def make_room_for(self, index: IrqIndex, in_use: Callable[[IrqIndex], bool]) -> None:
        """Disable an idle conflicting index, or refuse if ``in_use`` says it has vectors."""
        if index not in EXCLUSIVE_INDEXES:
            return
        for other in EXCLUSIVE_INDEXES - {index}:
            if not self._state[other].active:
                continue
            if in_use(other):
                raise IrqdError(
                    EBUSY,
                    f"{other.wire_name} is in use; the kernel enables only one of intx, msi "
                    f"and msix at a time",
                )
            self.disable(other)

    def disable(self, index: IrqIndex) -> None:
        """Disable ``index`` on the device; the kernel frees its host vectors."""
        try:
            self.device.disable(index)
        except OSError as exc:
            raise device_error(exc, f"disable {index.wire_name}") from exc
        finally:
            self._state[index].reset()
        log.info("index.disabled", index=index.wire_name)

    def _enable_msix(self, fds: dict[int, EventFd], watcher: ResizeWatcher) -> str:
        state = self._state[IrqIndex.MSIX]
        strategy = self.msix_strategy
        if strategy is MsixStrategy.DYNAMIC:
            if not state.active:
                # start=0, count=1, fd=-1: enabling at vector N would allocate N+1.
                self._arm(IrqIndex.MSIX, 1)
                state.allocated = {0}
            # Every vector the kernel assigned keeps its host vector, even if a
            # later one fails and the undo de-assigns it: a dynamic MSI-X vector
            # is freed only when MSI-X is disabled (vfio_msi_set_vector_signal,
            # drivers/vfio/pci/vfio_pci_intrs.c).
            self._assign_each(IrqIndex.MSIX, fds, assigned=state.allocated)
            return "dynamic"
        highest = max(fds) + 1
        if not state.active:
            size = max(highest, self.msix_prearm if strategy is MsixStrategy.PREARM else 0)
            self._arm(IrqIndex.MSIX, size, minimum=highest)
            self._assign_each(IrqIndex.MSIX, fds)
            return "prearm" if strategy is MsixStrategy.PREARM else "resize"
        if highest <= state.armed:
            self._assign_each(IrqIndex.MSIX, fds)
            return "prearm"
        self._grow(IrqIndex.MSIX, highest, fds, watcher)
        return "resize"

    def _enable_ranged(self, index: IrqIndex, fds: dict[int, EventFd], count: int) -> str:
        """MSI: always NORESIZE, at most 32 vectors: arm the whole range once."""
        if not self._state[index].active:
            self._arm(index, count, minimum=max(fds) + 1)
        self._assign_each(index, fds)
        return "prearm"

    def _arm(self, index: IrqIndex, size: int, *, minimum: int = 1) -> None:
        """Enable ``index`` with ``size`` host vectors and no eventfd.

        The kernel answers with a positive count when fewer vectors are free;
        it has then freed them and left the index disabled, so try once more
        with that count if it still covers ``minimum``.
        """
        state = self._state[index]
        for _attempt in range(2):
            try:
                got = self.device.assign_eventfds(index, 0, [-1] * size)
            except OSError as exc:
                raise device_error(exc, f"enable {index.wire_name} with {size} vectors") from exc
            if got == 0:
                state.active = True
                state.armed = size
                return
            if got < minimum:
                break
            size = got
        raise IrqdError(
            ENOSPC,
            f"the host has only {got} {index.wire_name} vectors free; {minimum} are needed",
        )

    def _assign_each(
        self, index: IrqIndex, fds: dict[int, EventFd], *, assigned: set[int] | None = None
    ) -> None:
        """One ``count=1`` call per vector, undone in reverse if any fails.

        Each vector the device took is added to ``assigned`` as it is taken; the
        undo leaves that record alone. The vector whose call failed is not added:
        the table's eventfds are valid, so its failure is the host vector's
        allocation, which leaves nothing allocated.
        """
        done: list[int] = []
        try:
            for number, efd in fds.items():
                try:
                    self.device.assign_eventfds(index, number, [efd.fileno()])
                except OSError as exc:
                    raise device_error(exc, f"assign {index.wire_name} vector {number}") from exc
                done.append(number)
                if assigned is not None:
                    assigned.add(number)
        except BaseException:
            for number in reversed(done):
                with contextlib.suppress(OSError):
                    self.device.assign_eventfds(index, number, [-1])
            raise

    def _grow(
        self, index: IrqIndex, size: int, fds: dict[int, EventFd], watcher: ResizeWatcher
    ) -> None:
        """Disable and enable again with a larger range, keeping every eventfd."""
        state = self._state[index]
        live = watcher.resize_live(index)
        old_size = state.armed
        log.warning(
            "msix.resize",
            index=index.wire_name,
            old_size=old_size,
            new_size=size,
            live=sorted(live),
            note="interrupts raised while the index is disabled are lost",
        )
        # Credit what is already in the eventfds before the window opens.
        watcher.resize_starting(index)
        try:
            self._set_range(index, size, live | fds)
        except IrqdError:
            # Put back what was there; the subscribers may have lost interrupts
            # either way, so they are told below all the same.
            with contextlib.suppress(IrqdError):
                self._set_range(index, old_size, live)
            watcher.resize_done(index)
            raise
        watcher.resize_done(index)

    def _set_range(self, index: IrqIndex, size: int, fds: dict[int, EventFd]) -> None:
        state = self._state[index]
        if state.active:
            self.disable(index)
        table = [-1] * size
        for number, efd in fds.items():
            table[number] = efd.fileno()
        try:
            got = self.device.assign_eventfds(index, 0, table)
        except OSError as exc:
            raise device_error(exc, f"enable {index.wire_name} with {size} vectors") from exc
        if got != 0:
            raise IrqdError(
                ENOSPC, f"the host has only {got} {index.wire_name} vectors free; {size} needed"
            )
        state.active = True
        state.armed = size


def resolve_msix_strategy(info: IrqInfo, wanted: MsixStrategy) -> MsixStrategy:
    """The strategy to use for this device's MSI-X, given what was asked for."""
    if wanted is MsixStrategy.AUTO:
        return MsixStrategy.DYNAMIC if info.dynamic else MsixStrategy.PREARM
    if wanted is MsixStrategy.DYNAMIC and info.count and not info.dynamic:
        raise ConfigError(
            "--msix-strategy dynamic: the device reports VFIO_IRQ_INFO_NORESIZE for MSI-X "
            "(dynamic MSI-X needs Linux 6.5+ and a platform that allocates vectors "
            "dynamically); use auto, prearm or grow"
        )
    return wanted


def resolve_prearm(info: IrqInfo, wanted: int | None) -> int:
    """The size of the pre-armed MSI-X range."""
    if wanted is None:
        return max(1, min(info.count, DEFAULT_PREARM_CAP))
    if not 1 <= wanted <= max(info.count, 1):
        raise ConfigError(
            f"--msix-prearm {wanted}: must be between 1 and the MSI-X table size ({info.count})"
        )
    return wanted
