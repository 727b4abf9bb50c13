"""The systemd scenario's steps, in order: run by guest/systemd_main.py, each
required by the host test (tests/vm/test_systemd.py)."""

#: device_access comes before the interrupts: it enables bus mastering, without
#: which the device sends no MSI-X message.
STEPS = (
    "install",
    "bind",
    "activate",
    "security",
    "info",
    "device_access",
    "subscribe",
    "host_fire",
    "trigger",
    "dma",
    "reload",
    "watchdog",
    "restart",
    "sigusr2",
    "sigkill",
    "journal",
    "remove",
)
#: What a step needs before it (``--only``): the install, the binding, a running unit.
NEEDS = ("install", "bind", "activate")
