"""The short soak: ``bench/soak.py`` with a few clients for a few hundred cycles.

``make soak`` runs the long one (64 clients, 10,000 measured cycles).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


@pytest.mark.soak
@pytest.mark.timeout(300)  # the soak's own bound is 120 s, its process's 180 s
def test_short_soak_counts_exact_fds_and_memory_flat() -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), "--clients", "8", "--warmup", "100", "--cycles", "300",
         "--kill-every", "40", "--max-seconds", "120"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "soak: OK" in result.stdout
    assert "holder received all: True" in result.stdout
