"""Device access for clients (``device.*``): the regions, the device fd, and reset.

Only one process can own a VFIO group, so the daemon hands out what a
userspace driver needs besides interrupts:

* ``device.regions`` / ``device.open``: where each region sits in the device
  fd, and a dup of that fd (permission ``drive``: whoever holds it can do
  anything the kernel lets the owner do, so it is for trusted drivers only);
* ``device.reset``: ``VFIO_DEVICE_RESET``. The kernel keeps every interrupt
  trigger across it (``vfio_pci_ioctl_reset`` in drivers/vfio/pci/vfio_pci_core.c
  zaps the BAR mappings, and ``pci_try_reset_function`` saves and restores
  config space with the MSI/MSI-X state), but what the device raised during
  the reset is gone, and a platform that failed to restore the MSI-X table
  would leave subscribers deaf. So the broker re-applies every assigned
  vector from the vector table (the desired state), sends each subscriber a
  ``resized`` with ``possible_loss`` for its vectors, and fires a loopback
  trigger so that they look at their device.

Everything runs synchronously on the Trio thread, like the vector table.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from irqd.device.base import Device, IrqIndex
from irqd.errors import EIO, ENODEV, ENOSPC, IrqdError, device_error
from irqd.server.vector_record import Vector

__all__ = ["Client", "DeviceAccess", "VectorSource"]

log = structlog.get_logger("irqd.server.broker")

#: Indexes whose vectors the broker re-applies after a reset; ERR and REQ are
#: the daemon's own (irqd.device.events) and are kept by the kernel.
_REARM_INDEXES = frozenset({IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX})


class _Peer(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...


class VectorSource(Protocol):
    """What a reset needs of the vector table: the desired state of every vector."""

    def vectors(self) -> list[Vector]:
        """Every enabled vector with its eventfd, subscribers and claim."""


class Client(Protocol):
    """What the broker needs of a session: who it is, and a way to tell it of a resize."""

    @property
    def id(self) -> int:
        """The session's number, unique in this daemon."""

    @property
    def peer(self) -> _Peer:
        """The credentials the kernel recorded at connect."""

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        """Queue a ``resized`` notification; must not block."""


class DeviceAccess:
    """``device.regions``, ``device.open`` and ``device.reset`` for the daemon's clients."""

    def __init__(self, device: Device, table: VectorSource) -> None:
        """Serve ``device``; ``table`` is the vector table whose vectors a reset re-applies."""
        self.device = device
        self.table = table

    def regions(self) -> list[dict[str, Any]]:
        """``device.regions``: every region of the device fd, as the protocol shows it."""
        try:
            return [region.to_wire() for region in self.device.regions()]
        except OSError as exc:
            raise device_error(exc, "VFIO_DEVICE_GET_REGION_INFO") from exc

    def open_device(self, client: Client) -> tuple[dict[str, Any], int]:
        """``device.open``: the regions and a dup of the device fd (the caller's to close)."""
        regions = self.regions()
        try:
            fd = os.dup(self.device.device_fd())
        except OSError as exc:
            code = ENOSPC if exc.errno in (errno.EMFILE, errno.ENFILE) else EIO
            raise IrqdError(code, f"cannot pass the device fd: {exc.strerror}") from exc
        peer = client.peer
        log.warning(
            "device.opened",
            client=client.id,
            pid=peer.pid,
            uid=peer.uid,
            gid=peer.gid,
            note="the client holds the VFIO device fd",
        )
        return {"regions": regions}, fd

    def reset(self, client: Client) -> dict[str, Any]:
        """``device.reset``: ``VFIO_DEVICE_RESET``, then re-arm and tell the subscribers."""
        peer = client.peer
        bound = log.bind(client=client.id, pid=peer.pid, uid=peer.uid, gid=peer.gid)
        if not self.device.resettable:
            bound.warning("device.reset_refused", reason="no VFIO_DEVICE_FLAGS_RESET")
            raise IrqdError(
                ENODEV,
                f"{self.device.name} cannot be reset: it does not report "
                "VFIO_DEVICE_FLAGS_RESET (no reset method the kernel can use)",
            )
        bound.warning("device.reset")
        try:
            self.device.reset()
        except OSError as exc:
            bound.error("device.reset_failed", error=str(exc))
            raise device_error(exc, "VFIO_DEVICE_RESET") from exc
        rearmed = self._rearm()
        bound.info("device.reset_done", rearmed=rearmed)
        return {}

    def _rearm(self) -> int:
        """Re-apply every assigned vector, tell each subscriber, wake everyone.

        Returns how many vectors were re-applied. A vector the kernel refuses
        is logged; its subscribers are told all the same.
        """
        live = [v for v in self.table.vectors() if v.index in _REARM_INDEXES]
        rearmed = 0
        for vector in live:
            try:
                self.device.assign_eventfds(vector.index, vector.number, [vector.eventfd.fileno()])
            except (OSError, ValueError) as exc:
                log.error(
                    "device.rearm_failed",
                    index=vector.index.wire_name,
                    vector=vector.number,
                    error=str(exc),
                )
            else:
                rearmed += 1
        told: dict[tuple[int, IrqIndex], tuple[Client, list[int]]] = {}
        for vector in live:
            holders: list[Any] = list(vector.subscribers)
            if vector.claimed_by is not None:
                holders.append(vector.claimed_by)
            for holder in holders:
                entry = told.setdefault((id(holder), vector.index), (holder, []))
                entry[1].append(vector.number)
        for (_, index), (holder, numbers) in told.items():
            holder.post_resized(index, numbers, True)
        # A loopback trigger makes every subscriber look at its device now.
        for vector in live:
            with contextlib.suppress(OSError):
                self.device.trigger(vector.index, vector.number, 1)
        return rearmed
