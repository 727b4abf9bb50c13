"""``VfioDevice``: a real PCI device bound to vfio-pci, through raw VFIO ioctls.

Opening follows the legacy group/container path that every kernel since 3.6
has (include/uapi/linux/vfio.h, Documentation/driver-api/vfio.rst):

1. ``/sys/bus/pci/devices/BDF/driver`` must be ``vfio-pci``;
2. ``/sys/bus/pci/devices/BDF/iommu_group`` names the group N → ``/dev/vfio/N``;
3. the group must be viable (every device in it bound to vfio-pci or to nothing);
4. a container ``/dev/vfio/vfio`` is attached and given the type1v2 IOMMU
   (``VFIO_SET_IOMMU``; EPERM there means no interrupt remapping);
5. ``VFIO_GROUP_GET_DEVICE_FD`` with the PCI address gives the device fd.

The cdev/iommufd interface (6.6+, ``/dev/vfio/devices/vfioN``) is not used:
where a kernel offers only that, opening fails with a message saying so.

Each usual mistake is its own ``VfioOpenError`` subclass whose message says
what to do; the kernel's errno is kept on it (``.errno``) and as the cause.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from irqd.errors import ConfigError

from . import vfio_ioctl as io
from .base import (
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
    Device,
    IrqIndex,
    IrqInfo,
    SetIrqsData,
)

#: include/uapi/linux/pci_regs.h: the 16-bit COMMAND register and its bus-master bit.
PCI_COMMAND = 0x04
PCI_COMMAND_MASTER = 0x4

SYSFS_PCI_DEVICES = Path("/sys/bus/pci/devices")
DEV_VFIO = Path("/dev/vfio")


#: The keys of ``handover_fds``/``adopt``: every fd that keeps the device open.
HANDOVER_KEYS = ("container", "group", "device")


class VfioAdoptError(ValueError):
    """Fds handed over by a previous daemon process cannot be taken as this device.

    A ``ValueError`` (not a ``ConfigError``): the daemon logs it and opens the
    device afresh instead of refusing to start.
    """


class VfioOpenError(ConfigError):
    """The device could not be opened; the message says what to do about it."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        #: The kernel's errno, when one was behind it.
        self.errno = code


class DeviceNotFoundError(VfioOpenError):
    """No PCI device at that address."""


class NotBoundToVfioError(VfioOpenError):
    """The device is bound to another driver, or to none."""


class NoIommuGroupError(VfioOpenError):
    """The device has no IOMMU group (no IOMMU enabled, or only the cdev interface)."""


class GroupNotViableError(VfioOpenError):
    """Another device in the same IOMMU group is bound to a non-VFIO driver."""


class VfioPermissionError(VfioOpenError):
    """EACCES/EPERM opening ``/dev/vfio/N`` or ``/dev/vfio/vfio``."""


class DeviceBusyError(VfioOpenError):
    """EBUSY: another process holds the group or the device."""


class NoInterruptRemappingError(VfioOpenError):
    """``VFIO_SET_IOMMU`` gave EPERM: the platform has no interrupt remapping."""


def _open(path: Path, bdf: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError as exc:
        raise VfioPermissionError(
            f"{bdf}: {exc.strerror} opening {path}: run the daemon as root, or give its user "
            f'the device (e.g. a udev rule: SUBSYSTEM=="vfio", OWNER="vfio-irqd") and '
            "enough RLIMIT_MEMLOCK",
            exc.errno,
        ) from exc
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceBusyError(
                f"{bdf}: {path} is held by another process (EBUSY); only one process can own "
                "a VFIO group: stop the other user (another vfio-irqd, QEMU, DPDK) first",
                exc.errno,
            ) from exc
        if exc.errno == errno.ENOENT:
            raise VfioOpenError(
                f"{bdf}: {path} does not exist: load the vfio modules "
                "(modprobe vfio-pci) and check that the device is bound to vfio-pci",
                exc.errno,
            ) from exc
        raise


def _group_number(group_fd: int) -> int | None:
    """The N of the ``/dev/vfio/N`` an fd has open; ``None`` if it is no such file."""
    try:
        target = os.readlink(f"/proc/self/fd/{group_fd}")
    except OSError:
        return None
    name = Path(target)
    return int(name.name) if name.parent == DEV_VFIO and name.name.isdigit() else None


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class VfioDevice(Device):
    """One PCI device through VFIO: interrupts, regions and config space.

    Holds three fds (container, group, device); ``close`` releases all of them,
    after which every call fails with EBADF, as it would on a closed fd.
    """

    backend: ClassVar[str] = "vfio"

    def __init__(
        self,
        bdf: str,
        *,
        sysfs_devices: Path = SYSFS_PCI_DEVICES,
        dev_vfio: Path = DEV_VFIO,
    ) -> None:
        self.name = bdf
        self.bdf = bdf
        self._container = -1
        self._group = -1
        self._device = -1
        self.group_number = self._find_group(bdf, sysfs_devices / bdf)
        try:
            self._open(bdf, dev_vfio)
        except BaseException:
            self.close()
            raise
        self.info = io.device_get_info(self._device)
        self._config = io.device_get_region_info(self._device, io.VFIO_PCI_CONFIG_REGION_INDEX)

    # -- opening ---------------------------------------------------------------------

    @staticmethod
    def _find_group(bdf: str, sysdev: Path) -> int:
        if not sysdev.exists():
            raise DeviceNotFoundError(
                f"{bdf}: no such PCI device (nothing at {sysdev}); check the address with lspci -D",
                errno.ENODEV,
            )
        driver_link = sysdev / "driver"
        driver = driver_link.resolve().name if driver_link.exists() else None
        if driver != "vfio-pci":
            bound = f"bound to {driver}" if driver else "bound to no driver"
            raise NotBoundToVfioError(
                f"{bdf}: {bound}, not vfio-pci. Bind it: "
                f"echo vfio-pci > {sysdev}/driver_override; "
                + (f"echo {bdf} > {driver_link}/unbind; " if driver else "")
                + f"echo {bdf} > /sys/bus/pci/drivers_probe "
                "(or driverctl set-override "
                f"{bdf} vfio-pci)",
                errno.ENODEV,
            )
        group_link = sysdev / "iommu_group"
        if not group_link.exists():
            if (sysdev / "vfio-dev").exists():
                raise NoIommuGroupError(
                    f"{bdf}: the kernel offers only the VFIO cdev/iommufd interface "
                    "(/dev/vfio/devices/vfioN), which this build does not use; use a kernel "
                    "with CONFIG_VFIO_GROUP=y",
                    errno.ENODEV,
                )
            raise NoIommuGroupError(
                f"{bdf}: no IOMMU group. Enable the IOMMU in the firmware (VT-d / AMD-Vi) and "
                "on the kernel command line (intel_iommu=on or amd_iommu=on); no-IOMMU mode "
                "is not supported",
                errno.ENODEV,
            )
        return int(group_link.resolve().name)

    def _open(self, bdf: str, dev_vfio: Path) -> None:
        group_path = dev_vfio / str(self.group_number)
        self._group = _open(group_path, bdf)
        status = io.group_get_status(self._group)
        if not status.viable:
            raise GroupNotViableError(
                f"{bdf}: IOMMU group {self.group_number} is not viable: every device in "
                f"/sys/kernel/iommu_groups/{self.group_number}/devices must be bound to "
                "vfio-pci (or to no driver); bind or unbind the others, or move the device "
                "to a slot with its own group",
                errno.EPERM,
            )
        self._container = _open(dev_vfio / "vfio", bdf)
        version = io.get_api_version(self._container)
        if version != io.VFIO_API_VERSION:
            raise VfioOpenError(f"{bdf}: unknown VFIO API version {version}")
        if not io.check_extension(self._container, io.VFIO_TYPE1v2_IOMMU):
            raise VfioOpenError(
                f"{bdf}: the kernel's VFIO container has no type1v2 IOMMU: "
                "modprobe vfio_iommu_type1",
                errno.ENOTSUP,
            )
        io.group_set_container(self._group, self._container)
        try:
            io.set_iommu(self._container, io.VFIO_TYPE1v2_IOMMU)
        except PermissionError as exc:
            raise NoInterruptRemappingError(
                f"{bdf}: VFIO_SET_IOMMU refused (EPERM): the platform has no interrupt "
                "remapping, so a device could forge interrupts. Enable it (VT-d with "
                "interrupt remapping in the firmware; on a VM, intel-iommu,intremap=on), "
                "or accept the risk with the vfio_iommu_type1 module parameter "
                "allow_unsafe_interrupts=1",
                exc.errno,
            ) from exc
        try:
            self._device = io.group_get_device_fd(self._group, bdf)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceBusyError(
                    f"{bdf}: the device is already open (EBUSY): stop its other user",
                    exc.errno,
                ) from exc
            raise

    # -- restart without disarming (irqd.process.fdstore) ------------------------------------

    def handover_fds(self) -> dict[str, int]:
        """The container, group and device fds, by key, for systemd's fd store.

        They stay this object's (the store gets duplicates through SCM_RIGHTS):
        while the store holds them, closing them here does not release the
        device, so MSI-X stays enabled and every eventfd stays assigned.
        """
        self._fd()  # EBADF once closed: nothing to hand over
        return {"container": self._container, "group": self._group, "device": self._device}

    def export_state(self) -> dict[str, Any]:
        """What ``adopt`` checks the fds against: the address and the group number.

        The interrupt setup itself is not in it: the kernel keeps it with the
        device fd, and which vectors are assigned is the vector table's state.
        """
        return {"bdf": self.bdf, "group": self.group_number}

    @classmethod
    def adopt(cls, bdf: str, fds: Mapping[str, int], state: Mapping[str, Any] | None) -> VfioDevice:
        """The device a previous daemon process had open, from its fds, as it left it.

        Nothing is opened, attached, reset or enabled: no ``VFIO_SET_IOMMU``,
        no ``SET_IRQS``. The fds are only checked, with read-only ioctls, to
        be what they claim (a container of this API version, a viable group
        attached to a container, a PCI device fd) and to belong to ``bdf``'s
        group. Owns ``fds`` from the call on: on ``VfioAdoptError`` they are
        closed, which releases the device (the caller then opens it afresh).
        """
        try:
            return cls._adopt(bdf, fds, state)
        except BaseException:
            for fd in fds.values():
                _close_quietly(fd)
            raise

    @classmethod
    def _adopt(
        cls, bdf: str, fds: Mapping[str, int], state: Mapping[str, Any] | None
    ) -> VfioDevice:
        missing = [key for key in HANDOVER_KEYS if key not in fds]
        if missing:
            raise VfioAdoptError(
                f"{bdf}: the handed-over device lacks its {', '.join(missing)} fd "
                f"(got {sorted(fds) or 'none'}); it cannot be adopted"
            )
        extra = sorted(set(fds) - set(HANDOVER_KEYS))
        if extra:
            raise VfioAdoptError(f"{bdf}: unknown handed-over device fds {extra}")
        if state is not None and state.get("bdf") != bdf:
            raise VfioAdoptError(
                f"{bdf}: the handed-over device is {state.get('bdf')!r}, not the configured one"
            )
        container, group, device = (fds[key] for key in HANDOVER_KEYS)
        try:
            version = io.get_api_version(container)
            status = io.group_get_status(group)
            info = io.device_get_info(device)
        except OSError as exc:
            raise VfioAdoptError(
                f"{bdf}: a handed-over fd is not the VFIO object it is named after ({exc.strerror})"
            ) from exc
        if version != io.VFIO_API_VERSION:
            raise VfioAdoptError(f"{bdf}: the handed-over container has API version {version}")
        if not (status.viable and status.container_set):
            raise VfioAdoptError(
                f"{bdf}: the handed-over group is not viable or has no container attached"
            )
        if not info.pci:
            raise VfioAdoptError(f"{bdf}: the handed-over device fd is not a PCI device")
        number = _group_number(group)
        if number is None:
            raise VfioAdoptError(f"{bdf}: the handed-over group fd is not a /dev/vfio/N file")
        if state is not None and state.get("group") != number:
            raise VfioAdoptError(
                f"{bdf}: the handed-over group fd is group {number}, "
                f"the stored state says {state.get('group')!r}"
            )
        self = cls.__new__(cls)
        self.name = self.bdf = bdf
        self._container, self._group, self._device = container, group, device
        self.group_number = number
        self.info = info
        self._config = io.device_get_region_info(device, io.VFIO_PCI_CONFIG_REGION_INDEX)
        return self

    # -- Device ----------------------------------------------------------------------

    def irq_info(self, index: IrqIndex) -> IrqInfo:
        """``VFIO_DEVICE_GET_IRQ_INFO``."""
        flags, count = io.device_get_irq_info(self._fd(), int(index))
        return IrqInfo(index=IrqIndex(index), flags=flags, count=count)

    def set_irqs(
        self, flags: int, index: IrqIndex, start: int, count: int, data: SetIrqsData = None
    ) -> int:
        """``VFIO_DEVICE_SET_IRQS``; ``data`` is packed as the data type in ``flags`` says.

        ``data`` longer than ``count`` is passed whole (argsz covers it, the
        kernel reads ``count`` entries); shorter gives the kernel's EINVAL.
        """
        device = self._fd()
        dtype = flags & VFIO_IRQ_SET_DATA_TYPE_MASK
        payload = b""
        if data is not None and dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            payload = io.pack_eventfds([int(x) for x in data])
        elif data is not None and dtype == VFIO_IRQ_SET_DATA_BOOL:
            payload = io.pack_bools(list(data))
        return io.device_set_irqs(device, flags, int(index), start, count, payload)

    def close(self) -> None:
        """Close the device, the group and the container, in that order. Idempotent.

        The last close of the device file disables the active index and drops
        the ERR/REQ triggers (vfio_pci_core_close_device).
        """
        for attr in ("_device", "_group", "_container"):
            fd = getattr(self, attr)
            # Forget the number before closing it: a closed number is reused at once.
            setattr(self, attr, -1)
            _close_quietly(fd)

    @property
    def closed(self) -> bool:
        return self._device < 0

    def fds(self) -> list[int]:
        """Every fd this object holds on the device (device, group, container)."""
        return [fd for fd in (self._device, self._group, self._container) if fd >= 0]

    # -- regions and config space ----------------------------------------------------

    def region_info(self, index: int) -> io.RegionInfo:
        """``VFIO_DEVICE_GET_REGION_INFO`` (``VFIO_PCI_*_REGION_INDEX``)."""
        return io.device_get_region_info(self._fd(), index)

    def region_read(self, region: io.RegionInfo, offset: int, size: int) -> bytes:
        """``pread`` from a region at its kernel-given offset."""
        return os.pread(self._fd(), size, region.offset + offset)

    def region_write(self, region: io.RegionInfo, offset: int, data: bytes) -> None:
        """``pwrite`` to a region at its kernel-given offset (the whole of ``data``)."""
        written = os.pwrite(self._fd(), data, region.offset + offset)
        if written != len(data):
            raise OSError(errno.EIO, f"short write to region {region.index}: {written}")

    def read_command(self) -> int:
        """The PCI COMMAND register (16-bit, little endian, config offset 4)."""
        (value,) = struct.unpack("<H", self.region_read(self._config, PCI_COMMAND, 2))
        return int(value)

    def set_bus_master(self, enabled: bool = True) -> None:
        """Set or clear ``PCI_COMMAND_MASTER``.

        An MSI/MSI-X message is a DMA write: the device drops it while bus
        mastering is off, and vfio-pci leaves it off after opening the device.
        """
        command = self.read_command()
        wanted = command | PCI_COMMAND_MASTER if enabled else command & ~PCI_COMMAND_MASTER
        if wanted != command:
            self.region_write(self._config, PCI_COMMAND, struct.pack("<H", wanted))

    def _fd(self) -> int:
        if self._device < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self._device

    def __repr__(self) -> str:
        return f"<VfioDevice {self.bdf} group {self.group_number}>"
