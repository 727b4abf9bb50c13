"""Device backends behind one interface (``Device``): the simulation and, later, VFIO."""

from .base import (
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
    Device,
    IrqIndex,
    IrqInfo,
    SetIrqsData,
)
from .sim import SetIrqsCall, SimDevice

__all__ = [
    "VFIO_IRQ_INFO_AUTOMASKED",
    "VFIO_IRQ_INFO_EVENTFD",
    "VFIO_IRQ_INFO_MASKABLE",
    "VFIO_IRQ_INFO_NORESIZE",
    "VFIO_IRQ_SET_ACTION_MASK",
    "VFIO_IRQ_SET_ACTION_TRIGGER",
    "VFIO_IRQ_SET_ACTION_TYPE_MASK",
    "VFIO_IRQ_SET_ACTION_UNMASK",
    "VFIO_IRQ_SET_DATA_BOOL",
    "VFIO_IRQ_SET_DATA_EVENTFD",
    "VFIO_IRQ_SET_DATA_NONE",
    "VFIO_IRQ_SET_DATA_TYPE_MASK",
    "Device",
    "IrqIndex",
    "IrqInfo",
    "SetIrqsCall",
    "SetIrqsData",
    "SimDevice",
]
