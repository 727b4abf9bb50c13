"""``VfioDevice`` before any ioctl: the sysfs checks and their advice, the uAPI numbers.

The ioctls themselves run against the real kernel in tests/vm (the device
conformance suite with ``IRQD_DEVICE_BACKEND=vfio``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from irqd.device import vfio_ioctl as io
from irqd.device.vfio import (
    DeviceNotFoundError,
    NoIommuGroupError,
    NotBoundToVfioError,
    VfioDevice,
    VfioOpenError,
)
from irqd.errors import ConfigError

BDF = "0000:03:00.0"


def fake_device(root: Path, driver: str | None, group: int | None, cdev: bool = False) -> Path:
    devices = root / "devices"
    dev = devices / BDF
    dev.mkdir(parents=True)
    if driver is not None:
        (root / "drivers" / driver).mkdir(parents=True)
        (dev / "driver").symlink_to(root / "drivers" / driver)
    if group is not None:
        (root / "groups" / str(group)).mkdir(parents=True)
        (dev / "iommu_group").symlink_to(root / "groups" / str(group))
    if cdev:
        (dev / "vfio-dev").mkdir()
    return devices


def open_fails(devices: Path, tmp_path: Path) -> VfioOpenError:
    with pytest.raises(VfioOpenError) as exc:
        VfioDevice(BDF, sysfs_devices=devices, dev_vfio=tmp_path / "dev-vfio")
    return exc.value


def test_no_such_device(tmp_path: Path) -> None:
    err = open_fails(tmp_path / "devices", tmp_path)
    assert isinstance(err, DeviceNotFoundError)
    assert "lspci -D" in str(err)
    assert isinstance(err, ConfigError)  # serve exits 2 with the message


def test_bound_to_another_driver(tmp_path: Path) -> None:
    err = open_fails(fake_device(tmp_path, "e1000e", 7), tmp_path)
    assert isinstance(err, NotBoundToVfioError)
    assert "bound to e1000e, not vfio-pci" in str(err)
    assert "driver_override" in str(err)
    assert "unbind" in str(err)


def test_bound_to_nothing(tmp_path: Path) -> None:
    err = open_fails(fake_device(tmp_path, None, 7), tmp_path)
    assert isinstance(err, NotBoundToVfioError)
    assert "bound to no driver" in str(err)
    assert "unbind" not in str(err)


def test_no_iommu_group(tmp_path: Path) -> None:
    err = open_fails(fake_device(tmp_path, "vfio-pci", None), tmp_path)
    assert isinstance(err, NoIommuGroupError)
    assert "intel_iommu=on" in str(err)


def test_only_the_cdev_interface(tmp_path: Path) -> None:
    err = open_fails(fake_device(tmp_path, "vfio-pci", None, cdev=True), tmp_path)
    assert isinstance(err, NoIommuGroupError)
    assert "CONFIG_VFIO_GROUP" in str(err)


def test_group_node_missing(tmp_path: Path) -> None:
    err = open_fails(fake_device(tmp_path, "vfio-pci", 7), tmp_path)
    assert str(tmp_path / "dev-vfio" / "7") in str(err)
    assert "modprobe vfio-pci" in str(err)


def test_ioctl_numbers_match_the_header() -> None:
    # include/uapi/linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + n) = _IO(';', 100 + n).
    assert io.VFIO_GET_API_VERSION == 0x3B64
    assert io.VFIO_SET_IOMMU == 0x3B66
    assert io.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert io.VFIO_DEVICE_GET_REGION_INFO == 0x3B6C
    assert io.VFIO_DEVICE_SET_IRQS == 0x3B6E
    assert io.VFIO_DEVICE_RESET == 0x3B6F


def test_set_irqs_payloads() -> None:
    assert io.pack_eventfds([3, -1]) == (3).to_bytes(4, "little") + b"\xff\xff\xff\xff"
    assert io.pack_bools([True, False, 1]) == b"\x01\x00\x01"
