"""The device broker: device access (``device.*``) and DMA memory (``dma.*``) for clients.

Only one process can own a VFIO group, so the daemon hands out what a
userspace driver needs besides interrupts. Two jobs, one module each:

* irqd.server.device_access: ``device.regions``, ``device.open`` (a dup of the
  device fd) and ``device.reset`` (with the vectors re-applied after it);
* irqd.server.dma_accounts: ``dma.alloc`` / ``dma.free``, buffers mapped in
  the container's IOMMU and accounted per client and in total.

:class:`Broker` is what the request handlers see of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from irqd.device.base import Device
from irqd.device.iommu import IommuInfo
from irqd.limits import ServerLimits
from irqd.server.device_access import Client, DeviceAccess, VectorSource
from irqd.server.dma_accounts import Allocation, DmaAccounts
from irqproto.methods import DmaAllocParams

__all__ = ["Allocation", "Broker", "Client", "VectorSource"]


class Broker:
    """Device access and DMA memory for the daemon's clients."""

    def __init__(self, device: Device, table: VectorSource) -> None:
        """Serve ``device``; ``table`` is the vector table whose vectors a reset re-applies."""
        self.device = device
        #: ``device.*``: regions, the device fd, reset.
        self.access = DeviceAccess(device, table)
        #: ``dma.*``: the clients' DMA buffers.
        self.dma = DmaAccounts(device)

    # -- device access (irqd.server.device_access) ---------------------------------

    def regions(self) -> list[dict[str, Any]]:
        """``device.regions``: every region of the device fd, as the protocol shows it."""
        return self.access.regions()

    def open_device(self, client: Client) -> tuple[dict[str, Any], int]:
        """``device.open``: the regions and a dup of the device fd (the caller's to close)."""
        return self.access.open_device(client)

    def reset(self, client: Client) -> dict[str, Any]:
        """``device.reset``: ``VFIO_DEVICE_RESET``, then re-arm and tell the subscribers."""
        return self.access.reset(client)

    # -- DMA memory (irqd.server.dma_accounts) --------------------------------------

    def iommu(self) -> IommuInfo:
        """The container's IOMMU, read once."""
        return self.dma.iommu()

    def alloc(
        self, client: Client, params: DmaAllocParams, limits: ServerLimits
    ) -> tuple[dict[str, Any], int]:
        """``dma.alloc``: the result and the memfd (the caller's to send and close)."""
        return self.dma.alloc(client, params, limits)

    def free(self, client: Client, allocation_id: int) -> None:
        """``dma.free``: unmap from the IOMMU, then drop the daemon's mapping."""
        self.dma.free(client, allocation_id)

    def release(self, client: Client) -> int:
        """Free every buffer of a client that left; returns the bytes released."""
        return self.dma.release(client)

    def release_all(self) -> None:
        """Unmap every buffer (the device is going away or the daemon stops)."""
        self.dma.release_all()

    def export_state(self) -> list[dict[str, Any]]:
        """Every buffer still mapped in the container, for the next daemon process."""
        return self.dma.export_state()

    def import_state(self, state: Sequence[dict[str, Any]]) -> None:
        """Take over the buffers ``export_state`` listed (owners keep their session ids)."""
        self.dma.import_state(state)

    def total_bytes(self) -> int:
        """Bytes mapped for DMA, every client together (stuck mappings included)."""
        return self.dma.total_bytes()

    def totals(self) -> dict[str, int]:
        """``stats`` ``dma``: ``{"bytes", "mappings"}`` of every client together."""
        return self.dma.totals()

    def client_bytes(self, client: Client) -> int:
        """Bytes of DMA memory ``client`` holds (``stats`` per-client ``dma_bytes``)."""
        return self.dma.client_bytes(client)

    def allocations(self) -> list[Allocation]:
        """Every live allocation, by id."""
        return self.dma.allocations()
