"""/etc/vfio-irqd/<instance>.toml: the schema, clear errors (exit 2), flags over the file."""

from __future__ import annotations

from pathlib import Path

import pytest

import irqd.process.service
import irqd.tools.cli
from irqd.config import HotLoop, MsixStrategy, ServerConfig
from irqd.configfile import ConfigFileError, load_settings
from irqd.limits import ServerLimits
from irqd.policy import AccessPolicy
from irqd.tools.cli import main

FULL = """
wait = false

hot_loop = "python"

[socket]
path = "/run/vfio-irqd/test.sock"
mode = "0640"

[msix]
strategy = "prearm"
prearm = 16

[sim]
vectors = 32
noresize = true
msi_vectors = 4

[limits]
max_clients = 8
idle_timeout = 60.5

[access]
connect = ["root"]

[log]
level = "warning"
format = "json"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "irqd.toml"
    path.write_text(text)
    return path


def test_every_key_is_read(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL))
    assert settings.socket_path == Path("/run/vfio-irqd/test.sock")
    assert settings.socket_mode == 0o640
    assert settings.msix_strategy is MsixStrategy.PREARM and settings.msix_prearm == 16
    assert (settings.sim_vectors, settings.sim_noresize, settings.sim_msi_vectors) == (32, True, 4)
    assert isinstance(settings.server_limits, ServerLimits)
    assert settings.server_limits.max_clients == 8
    assert isinstance(settings.access_policy, AccessPolicy)
    assert (settings.log_level, settings.log_format, settings.wait) == ("warning", "json", False)
    assert settings.hot_loop is HotLoop.PYTHON
    device = load_settings(write(tmp_path, 'device = "03:00.0"\nwait = true\n'))
    assert (device.device, device.wait) == ("0000:03:00.0", True)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[msix]\nstrategy = 'fast'\n", "msix.strategy", "must be one of auto, dynamic"),
        ("[msix]\nprearm = 0\n", "msix.prearm", "0 is out of range (1..2048)"),
        ("[msix]\nstrategy = 'grow'\nprearm = 4\n", "msix.prearm", "only applies to"),
        ("[socket]\nmode = '999'\n", "socket.mode", "not an octal mode"),
        ("[socket]\npath = 'relative.sock'\n", "socket.path", "must be an absolute path"),
        ("[sim]\nvectors = true\n", "sim.vectors", "must be an integer, not a boolean"),
        ("device = '0000:03:00.0'\n[sim]\nvectors = 4\n", "sim", "only for the simulated"),
        ("device = 'eth0'\n", "device", "is not a PCI address"),
        ("[log]\nlevel = 'chatty'\n", "log.level", "must be one of debug, info"),
        ("hot_loop = 'c'\n", "hot_loop", "must be one of auto, native, python"),
        ("[log]\ncolour = true\n", "log.colour", "unknown key"),
        ("socket = 3\n", "socket", "must be a table"),
        ("typo = 1\n", "typo", "unknown key"),
        ("[limits]\nmax_clients = 0\n", "limits.max_clients", "must be a positive int"),
        ("[limits]\nmax_bananas = 1\n", "limits.max_bananas", "unknown key"),
        ("[access]\nconnect = 'root'\n", "access.connect", ""),
    ],
)
def test_a_bad_file_names_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigFileError) as caught:
        load_settings(path)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{path}: {key}: ")
    assert reason in caught.value.reason


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="no such file"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigFileError, match="not valid TOML"):
        load_settings(write(tmp_path, "[msix\n"))


def test_serve_with_a_bad_file_says_so_in_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[msix]\nstrategy = 'fast'\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"vfio-irqd: {path}: msix.strategy: must be one of auto, dynamic, prearm, grow, "
        "not 'fast'\n"
    )


def test_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ServerConfig] = []

    def run(config: ServerConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(irqd.process.service, "run", run)
    # Logging is configured process-wide with caching; not from a test.
    monkeypatch.setattr(irqd.tools.cli, "configure_logging", lambda *a, **k: None)
    path = write(tmp_path, FULL)
    argv = ["serve", "--config", str(path), "--msix-prearm", "8", "--log-level", "debug"]
    assert main(argv) == 0
    assert main([*argv, "--hot-loop", "native"]) == 0
    config, flagged = seen
    assert config.hot_loop is HotLoop.PYTHON  # the file
    assert flagged.hot_loop is HotLoop.NATIVE
    assert config.msix_prearm == 8  # the flag
    assert config.msix_strategy is MsixStrategy.PREARM  # the file
    assert config.socket_path == Path("/run/vfio-irqd/test.sock")
    assert config.socket_mode == 0o640 and config.sim.msix_vectors == 32
    assert config.log_level == "debug" and config.log_format == "json"
    assert config.config_path == path
    assert config.cli_fixed == {"msix_prearm", "log_level"}
    # A combination that cannot work is refused whichever side each part came from.
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--config", str(path), "--msix-strategy", "grow"])
    assert caught.value.code == 2
    assert isinstance(config.access_policy, AccessPolicy)


def test_the_metrics_table(tmp_path: Path) -> None:
    text = '[metrics]\nfile = "/var/lib/node-exporter/irqd.prom"\ninterval = 2\n'
    settings = load_settings(write(tmp_path, text))
    assert settings.metrics_file == Path("/var/lib/node-exporter/irqd.prom")
    assert settings.metrics_interval == 2.0
    for bad, reason in (
        ('file = "irqd.prom"', "metrics.file: must be an absolute path"),
        ("interval = 0", "metrics.interval: 0 must be a positive number"),
        ('interval = "5"', "metrics.interval: must be a number of seconds"),
        ("every = 5", "metrics.every: unknown key"),
    ):
        with pytest.raises(ConfigFileError, match=reason):
            load_settings(write(tmp_path, f"[metrics]\n{bad}\n"))
