"""vfio-irqd(8): lint-clean, rendered by man, and in step with the command line it describes."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from irqd import __version__
from irqd.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "vfio-irqd.8"
INSTALL = ROOT / "scripts" / "install-test-tools"
SECTIONS = (
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "COMMANDS",
    "OPTIONS",
    "FILES",
    "SIGNALS",
    "EXIT STATUS",
    "ENVIRONMENT",
    "EXAMPLES",
    "SEE ALSO",
)


def tool(name: str) -> str:
    """The tool's path; skips only off CI and without root (scripts/install-test-tools)."""
    path = shutil.which(name)
    if path is not None:
        return path
    if os.environ.get("VFIO_IRQD_CI") == "1":
        pytest.fail(f"{name} is missing in CI: `make test` runs {INSTALL} first")
    if os.geteuid() != 0:
        pytest.skip(f"{name} is missing; as root, {INSTALL} installs it from Debian's packages")
    pytest.fail(f"{name} is missing: run {INSTALL} (make test does)")


def man(*args: str) -> subprocess.CompletedProcess[str]:
    # As lintian runs it (its groff-message check): UTF-8, 80 columns, no
    # preprocessor guessing from the environment.
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    env.pop("MANPAGER", None)
    env.pop("PAGER", None)
    return subprocess.run(
        [tool("man"), *args], capture_output=True, text=True, env=env, check=False, timeout=60
    )


def test_mandoc_lint_finds_nothing() -> None:
    # -W style is the lowest level: every style, warning and error message.
    result = subprocess.run(
        [tool("mandoc"), "-T", "lint", "-W", "style", str(PAGE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_groff_through_man_warns_about_nothing() -> None:
    # lintian's check: any message from groff (a bad escape, a line that cannot
    # be broken or adjusted) is a finding.
    result = man("--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(PAGE))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout


def rendered() -> str:
    """The page as ``man -l`` shows it, in plain ASCII without overstrikes."""
    result = man("-E", "ascii", "-l", str(PAGE))
    assert result.returncode == 0, result.stderr
    return re.sub(r".\x08", "", result.stdout)


def test_man_renders_every_section() -> None:
    text = rendered()
    headings = [line for line in text.splitlines() if re.fullmatch(r"[A-Z][A-Z ]*", line)]
    assert headings == list(SECTIONS)
    assert text.splitlines()[0].split() == [
        "VFIO-IRQD(8)",
        "System",
        "Manager's",
        "Manual",
        "VFIO-IRQD(8)",
    ]


def test_the_page_names_the_version_it_describes() -> None:
    title = next(line for line in PAGE.read_text().splitlines() if line.startswith(".TH "))
    assert f'"vfio\\-irqd {__version__}"' in title


def plain(roff: str) -> str:
    """Source text with the escapes this page uses turned into what they print."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    text = re.sub(r"\\[%&|]", "", text)
    return text.replace("\\-", "-").replace("\\~", " ")


def headings() -> dict[str, str]:
    """Each ``.SH`` and ``.SS`` of the page by its title, with its text up to the next one."""
    found: dict[str, str] = {}
    title = ""
    for line in PAGE.read_text().splitlines():
        if line.startswith((".SS ", ".SH ")):
            title = plain(line[4:]).strip('"')
            found[title] = ""
        elif title:
            found[title] += plain(line) + "\n"
    return found


def commands(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Each leaf command (``serve``, ..., ``sim fire``) with its parser."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers and path:
        yield path, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from commands(sub, f"{path} {name}".strip())


def long_options(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """What ``--help`` lists: each long option with its choices, less ``--help`` itself."""
    listed: dict[str, list[str]] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                listed[option] = [str(c) for c in action.choices or ()]
    return listed


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_and_long_option_of_the_cli_is_on_the_page() -> None:
    parser = build_parser()
    sections = headings()
    synopsis = sections["SYNOPSIS"]
    leaves = dict(commands(parser))
    assert "serve" in leaves
    assert "sim fire" in leaves
    for path, sub in leaves.items():
        assert f"vfio-irqd\n.B {path}\n" in synopsis, f"{path} is not in SYNOPSIS"
        titles = [t for t in sections if t == path or t.startswith(f"{path} ")]
        assert len(titles) == 1, f"no .SS for {path!r} under COMMANDS"
        text = sections[titles[0]]
        options = long_options(sub)
        for option, choices in options.items():
            assert mentions(text, option), f"{path} {option} is not in its section"
            for choice in choices:
                assert mentions(text, choice), f"{path} {option} {choice} is not in its section"
        # And the other way round: the section names no option the command lost.
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
        assert named <= set(options), f"{path}'s section names {named - set(options)}"
    for option in long_options(parser):
        assert mentions(sections["OPTIONS"], option), f"{option} is not in OPTIONS"
