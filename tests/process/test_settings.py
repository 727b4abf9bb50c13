"""irqd.settings: one precedence rule (flag, then file, then default) for serve and for reload."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from irqd.config import HotLoop, MsixStrategy, ServerConfig
from irqd.configfile import FileSettings
from irqd.limits import ServerLimits
from irqd.policy import AccessPolicy
from irqd.settings import (
    REFUSED_REASON,
    Defaults,
    Flags,
    SettingsError,
    pick,
    reload_plan,
    resolve,
)

BDF = "0000:03:00.0"
# The socket default depends on $VFIO_IRQD_SOCKET; the tests pass their own.
DEFAULTS = Defaults(socket_path=lambda instance: Path(f"/test/{instance}.sock"))
FILE = Path("/etc/vfio-irqd/sim.toml")


def test_pick_is_flag_then_file_then_default() -> None:
    assert pick(1, 2, 3) == 1
    assert pick(None, 2, 3) == 2
    assert pick(None, None, 3) == 3
    # A falsy value given is still given.
    assert pick(0, 2, 3) == 0
    assert pick(None, False, True) is False


def test_nothing_given_is_every_default() -> None:
    config = resolve(Flags(), None, DEFAULTS)
    assert config == ServerConfig(socket_path=Path("/test/sim.sock"))
    assert config.cli_fixed == frozenset()


def test_the_file_beats_the_default_and_the_flag_beats_the_file() -> None:
    file = FileSettings(
        path=FILE,
        socket_mode=0o600,
        log_level="debug",
        log_format="json",
        msix_strategy=MsixStrategy.GROW,
        hot_loop=HotLoop.PYTHON,
        sim_vectors=8,
    )
    from_file = resolve(Flags(), file, DEFAULTS)
    assert (from_file.socket_mode, from_file.log_level, from_file.log_format) == (
        0o600,
        "debug",
        "json",
    )
    assert from_file.msix_strategy is MsixStrategy.GROW and from_file.hot_loop is HotLoop.PYTHON
    assert from_file.sim.msix_vectors == 8 and from_file.config_path == FILE
    flags = Flags(socket_mode=0o666, log_level="error", hot_loop=HotLoop.NATIVE, sim_vectors=4)
    from_flags = resolve(flags, file, DEFAULTS)
    assert (from_flags.socket_mode, from_flags.log_level, from_flags.log_format) == (
        0o666,
        "error",
        "json",
    )
    assert from_flags.hot_loop is HotLoop.NATIVE and from_flags.sim.msix_vectors == 4
    assert from_flags.cli_fixed == {"socket_mode", "log_level", "hot_loop"}


def test_the_socket_path_follows_the_device_unless_given() -> None:
    assert resolve(Flags(device=BDF), None, DEFAULTS).socket_path == Path(f"/test/{BDF}.sock")
    file = FileSettings(device=BDF)
    assert resolve(Flags(), file, DEFAULTS).socket_path == Path(f"/test/{BDF}.sock")
    given = resolve(Flags(socket_path=Path("/x.sock")), file, DEFAULTS)
    assert given.socket_path == Path("/x.sock") and given.cli_fixed == {"socket_path"}


def test_sim_flag_beats_the_files_device() -> None:
    config = resolve(Flags(sim=True), FileSettings(device=BDF), DEFAULTS)
    assert config.device is None and config.socket_path == Path("/test/sim.sock")


def test_wait_from_flag_or_file() -> None:
    assert resolve(Flags(device=BDF, wait=True), None, DEFAULTS).wait_for_device
    assert resolve(Flags(device=BDF), FileSettings(wait=True), DEFAULTS).wait_for_device
    assert not resolve(Flags(device=BDF), FileSettings(wait=False), DEFAULTS).wait_for_device


def test_limits_and_access_come_from_the_file() -> None:
    limits, policy = ServerLimits(max_clients=3), AccessPolicy()
    file = FileSettings(server_limits=limits, access_policy=policy)
    config = resolve(Flags(), file, DEFAULTS)
    assert config.server_limits is limits and config.access_policy is policy


@pytest.mark.parametrize(
    ("flags", "file", "message"),
    [
        (Flags(device=BDF, sim_vectors=4), None, "--sim-vectors: only for the simulated"),
        (Flags(sim_noresize=True), FileSettings(device=BDF), "--sim-noresize: only for"),
        (Flags(wait=True), None, "--wait: waits for a real device"),
        (
            Flags(msix_prearm=4, msix_strategy=MsixStrategy.GROW),
            None,
            "--msix-prearm only applies to --msix-strategy auto or prearm, not grow",
        ),
        (
            Flags(msix_prearm=4),
            FileSettings(msix_strategy=MsixStrategy.DYNAMIC),
            "not dynamic",
        ),
        (Flags(msix_prearm=65), None, "--msix-prearm 65 exceeds the MSI-X table"),
        (
            Flags(msix_strategy=MsixStrategy.DYNAMIC),
            FileSettings(sim_noresize=True),
            "--msix-strategy dynamic needs a kernel without NORESIZE",
        ),
    ],
)
def test_settings_that_cannot_work_together_are_refused(
    flags: Flags, file: FileSettings | None, message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        resolve(flags, file, DEFAULTS)


def running(**changes: object) -> ServerConfig:
    base = ServerConfig(socket_path=Path("/test/sim.sock"), config_path=FILE)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_reload_of_the_same_file_changes_nothing() -> None:
    current = running(log_level="debug", msix_strategy=MsixStrategy.GROW)
    file = FileSettings(path=FILE, log_level="debug", msix_strategy=MsixStrategy.GROW)
    plan = reload_plan(current, file, DEFAULTS)
    assert plan.config == current
    assert plan.log_fields() == {"changed": [], "refused": [], "refused_reason": None, "kept": []}


def test_a_reload_applies_level_access_and_limits() -> None:
    limits, policy = ServerLimits(max_clients=3), AccessPolicy()
    file = FileSettings(path=FILE, log_level="warning", server_limits=limits, access_policy=policy)
    plan = reload_plan(running(), file, DEFAULTS)
    assert plan.changed == ("log.level=warning", "access", "limits")
    assert plan.config.log_level == "warning"
    assert plan.config.server_limits is limits and plan.config.access_policy is policy
    assert plan.refused == () and plan.refused_reason is None


def test_a_key_the_file_dropped_goes_back_to_its_default() -> None:
    current = running(log_level="debug", server_limits=ServerLimits(max_clients=3))
    plan = reload_plan(current, FileSettings(path=FILE), DEFAULTS)
    assert plan.config.log_level == "info" and plan.config.server_limits is None
    assert plan.changed == ("log.level=info", "limits")


def test_a_reload_refuses_what_only_a_restart_can_change() -> None:
    file = FileSettings(
        path=FILE,
        device=BDF,
        socket_path=Path("/elsewhere.sock"),
        socket_mode=0o600,
        msix_strategy=MsixStrategy.GROW,
        msix_prearm=4,
        hot_loop=HotLoop.PYTHON,
        log_format="json",
    )
    plan = reload_plan(running(), file, DEFAULTS)
    assert plan.refused == (
        "device",
        "socket.path",
        "socket.mode",
        "msix.strategy",
        "msix.prearm",
        "hot_loop",
        "log.format",
    )
    assert plan.refused_reason == REFUSED_REASON
    assert plan.config == running()  # nothing of it applied


def test_a_flag_still_beats_the_file_on_reload() -> None:
    fixed = frozenset({"log_level", "socket_mode", "hot_loop"})
    current = running(log_level="debug", socket_mode=0o600, cli_fixed=fixed)
    file = FileSettings(path=FILE, log_level="error", socket_mode=0o666, hot_loop=HotLoop.PYTHON)
    plan = reload_plan(current, file, DEFAULTS)
    assert plan.config == current
    assert plan.kept == ("log.level (given on the command line)",)
    # A restart-only key given as a flag is neither refused nor kept: the flag rules.
    assert plan.refused == () and plan.changed == ()
    # The file agreeing with the flag is nothing to report.
    same = reload_plan(current, replace(file, log_level="debug"), DEFAULTS)
    assert same.kept == ()


# -- the metrics file (irqd.metrics): flag beats file beats default, reloadable -------------

METRICS = Path("/var/lib/prometheus/node-exporter/sim.prom")


def test_the_metrics_file_and_interval_follow_the_rule() -> None:
    assert resolve(Flags(), None, DEFAULTS).metrics_file is None
    assert resolve(Flags(), None, DEFAULTS).metrics_interval == 5.0
    file = FileSettings(metrics_file=METRICS, metrics_interval=30.0)
    from_file = resolve(Flags(), file, DEFAULTS)
    assert (from_file.metrics_file, from_file.metrics_interval) == (METRICS, 30.0)
    flags = Flags(metrics_file=Path("/x.prom"), metrics_interval=1.5)
    from_flags = resolve(flags, file, DEFAULTS)
    assert (from_flags.metrics_file, from_flags.metrics_interval) == (Path("/x.prom"), 1.5)
    assert from_flags.cli_fixed == {"metrics_file", "metrics_interval"}


def test_a_reload_changes_the_metrics_file_unless_a_flag_set_it() -> None:
    file = FileSettings(path=FILE, metrics_file=METRICS, metrics_interval=10.0)
    plan = reload_plan(running(), file, DEFAULTS)
    assert plan.changed == (f"metrics.file={METRICS}", "metrics.interval=10.0")
    assert (plan.config.metrics_file, plan.config.metrics_interval) == (METRICS, 10.0)
    # Dropped from the file: back to no file and the default interval.
    back = reload_plan(plan.config, FileSettings(path=FILE), DEFAULTS)
    assert (back.config.metrics_file, back.config.metrics_interval) == (None, 5.0)
    assert back.changed == ("metrics.file=", "metrics.interval=5.0")
    fixed = running(metrics_file=Path("/x.prom"), cli_fixed=frozenset({"metrics_file"}))
    kept = reload_plan(fixed, file, DEFAULTS)
    assert kept.config.metrics_file == Path("/x.prom")
    assert kept.kept == ("metrics.file (given on the command line)",)
    assert kept.changed == ("metrics.interval=10.0",)
