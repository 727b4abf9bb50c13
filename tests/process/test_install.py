"""`make install` staged into DESTDIR, as a package build does: the tree, and that it works.

Each install builds the program's own virtualenv from the checkout, C
extensions included: about 15 s of CPU.
The staged tree cannot run its commands by their #! lines, which name the
final paths; they run with the staged interpreter instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from irqd import __version__

from .test_manpage import tool
from .test_units import systemd_tool

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("vfio-irqd@.service", "vfio-irqd@.socket", "vfio-irqd-sim.service")
SERVICES = ("vfio-irqd@.service", "vfio-irqd-sim.service")
# A loaded machine builds slowly; a hang must still end.
MAKE_TIMEOUT = 600
# An outer make's flags, and the Makefile's variables, which make would take from the environment.
MAKE_VARIABLES = frozenset(
    (
        *("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "DESTDIR", "PREFIX", "BINDIR", "PKGLIBDIR"),
        *("MANDIR", "UNITDIR", "SYSUSERSDIR", "TMPFILESDIR", "PIP_INSTALL_FLAGS", "PYTHON", "VENV"),
    )
)

pytestmark = pytest.mark.slow


def install_python() -> str:
    """A Python that `make install` accepts: 3.11+, with venv, outside home directories.

    The units run with ProtectHome=yes, so an interpreter under /root or /home
    (pyenv, which may be the one running these tests) cannot run the service.
    """
    check = (
        "import ensurepip, os, sys, sysconfig, venv; "
        "exe = os.path.realpath(sys._base_executable); "
        "headers = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); "
        "sys.exit(sys.version_info < (3, 11) or not os.path.exists(headers) "
        "or exe.startswith(('/home/', '/root/', '/run/user/')))"
    )
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and subprocess.run([candidate, "-c", check], check=False).returncode == 0:
            return candidate
    message = (
        "no Python 3.11+ with venv and headers outside /home and /root "
        "(Debian: python3-venv python3-dev; scripts/install-test-tools installs them)"
    )
    if os.environ.get("VFIO_IRQD_CI") == "1":
        pytest.fail(message)
    pytest.skip(message)


def make(*args: str) -> str:
    """Runs make in the checkout, isolated from an outer make's flags and the caller's dirs."""
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES}
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=MAKE_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def exec_starts(unit: Path) -> list[str]:
    return re.findall(r"^ExecStart=(\S+)", unit.read_text(), flags=re.MULTILINE)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


# The build may take MAKE_TIMEOUT on a loaded machine (the suite's default is 120 s).
@pytest.mark.timeout(MAKE_TIMEOUT + 120)
@pytest.mark.parametrize("prefix", ["/usr", "/usr/local"])
def test_make_install_into_destdir_then_uninstall(tmp_path: Path, prefix: str) -> None:
    dest = tmp_path / "dest"
    root = dest / prefix.lstrip("/")
    venv = root / "lib" / "vfio-irqd" / "venv"
    staged_python = venv / "bin" / "python"
    # An earlier install, which this one upgrades: replaced whole.
    venv.mkdir(parents=True)
    (venv / "from-the-last-install").touch()
    make("install", f"DESTDIR={dest}", f"PREFIX={prefix}", f"PYTHON={install_python()}")
    assert not (venv / "from-the-last-install").exists()
    assert sorted(p.name for p in venv.parent.iterdir()) == ["venv"]

    # The command: a link that resolves inside DESTDIR to the virtualenv's script,
    # whose #! names the installed interpreter.
    command = root / "bin" / "vfio-irqd"
    assert command.is_symlink()
    assert not os.readlink(command).startswith("/")
    script = command.resolve(strict=True)
    assert script == (venv / "bin" / "vfio-irqd").resolve()
    assert script.is_relative_to(dest.resolve())
    assert script.read_text().splitlines()[0] == f"#!{prefix}/lib/vfio-irqd/venv/bin/python"
    version = subprocess.run(
        [str(staged_python), "-I", str(command), "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert version.stdout.strip() == f"vfio-irqd {__version__}"
    # From the virtualenv, not the checkout, native extensions included.
    where = subprocess.run(
        [
            str(staged_python),
            "-I",
            "-c",
            "import irqd, irqd._drain, irqd._hotloop, irqproto; "
            "print(irqd.__file__, irqd._hotloop.__file__, irqproto.__file__, sep='\\n')",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    for module in where.stdout.split():
        assert Path(module).is_relative_to(venv), module

    # Nothing installed names the staging directory (#! lines, activate,
    # pyvenv.cfg, the byte code's file names).
    staging = str(dest).encode()
    leaks = [
        p
        for p in files_under(dest)
        if staging in (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
    ]
    assert leaks == []

    # The units, where systemd looks for them under this prefix, start the installed command.
    unitdir = root / "lib" / "systemd" / "system"
    for service in SERVICES:
        assert exec_starts(unitdir / service) == [f"{prefix}/bin/vfio-irqd"]
    listed = subprocess.run(
        [systemd_tool("systemctl"), f"--root={dest}", "list-unit-files", "vfio-irqd*"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert sorted(re.findall(r"^(vfio-irqd\S+)", listed.stdout, flags=re.MULTILINE)) == sorted(
        UNITS
    )
    # systemd-analyze verify on the installed units, with ExecStart= pointing
    # into DESTDIR (it checks that the program exists and is executable).
    check = tmp_path / "verify"
    check.mkdir()
    for unit in UNITS:
        text = (unitdir / unit).read_text()
        (check / unit).write_text(text.replace(f"{prefix}/bin/vfio-irqd", str(command)))
    names = ["vfio-irqd@0000_03_00.0.service", "vfio-irqd@0000_03_00.0.socket"]
    verify = subprocess.run(
        [
            systemd_tool("systemd-analyze"),
            "verify",
            "--man=no",
            *(f"./{n}" for n in names),
            "./vfio-irqd-sim.service",
        ],
        cwd=check,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    # sysusers.d and tmpfiles.d files where those tools read them.
    for program, directory in (
        ("systemd-sysusers", "sysusers.d"),
        ("systemd-tmpfiles", "tmpfiles.d"),
    ):
        config = subprocess.run(
            [systemd_tool(program), f"--root={dest}", "--cat-config"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        installed = root / "lib" / directory / "vfio-irqd.conf"
        assert f"# {installed}\n" in config.stdout
        assert installed.read_text() in config.stdout

    # The man page, where man finds it for this prefix.
    page = root / "share" / "man" / "man8" / "vfio-irqd.8"
    assert page.read_bytes() == (ROOT / "docs" / "vfio-irqd.8").read_bytes()
    env = dict(os.environ, MANPATH=str(root / "share" / "man"))
    found = subprocess.run(
        [tool("man"), "-w", "8", "vfio-irqd"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert found.stdout.strip() == str(page)

    make("uninstall", f"DESTDIR={dest}", f"PREFIX={prefix}")
    assert files_under(dest) == []


def test_other_prefixes_put_the_systemd_files_in_etc() -> None:
    # systemd searches /usr/lib and /usr/local/lib, nothing under /opt.
    plan = make("-n", "install", "DESTDIR=/staging", "PREFIX=/opt/vfio-irqd", "PYTHON=python3")
    for path in (
        "/staging/etc/systemd/system",
        "/staging/etc/sysusers.d/vfio-irqd.conf",
        "/staging/etc/tmpfiles.d/vfio-irqd.conf",
        "/staging/opt/vfio-irqd/share/man/man8/vfio-irqd.8",
        "/staging/opt/vfio-irqd/lib/vfio-irqd/venv",
        "ExecStart=/opt/vfio-irqd/bin/vfio-irqd ",
    ):
        assert path in plan
    assert "/opt/vfio-irqd/lib/systemd" not in plan


def test_only_an_install_into_the_running_system_runs_the_postinst_steps() -> None:
    staged = make("-n", "install", "DESTDIR=/staging", "PREFIX=/usr", "PYTHON=python3")
    live = make("-n", "install", "PREFIX=/usr", "PYTHON=python3")
    steps = (
        "systemd-sysusers '/usr/lib/sysusers.d/vfio-irqd.conf'",
        "systemd-tmpfiles --create '/usr/lib/tmpfiles.d/vfio-irqd.conf'",
        "systemctl daemon-reload",
    )
    for step in steps:
        assert step in live
        assert step not in staged
