"""The host's check of the NVMe backing file (vmkit.check_nvme_image), without a VM.

The VM test trusts it to catch a block the guest's driver did not write as it
said, so it must reject every kind of wrong block and accept the right ones.
"""

from __future__ import annotations

from pathlib import Path

from . import vmkit

BLOCKS = 64


def image_with(tmp_path: Path, changes: dict[int, bytes]) -> Path:
    pattern = vmkit.nvme_pattern()
    path = tmp_path / "nvme.img"
    data = bytearray(pattern.image(BLOCKS * pattern.BLOCK))
    for lba, block in changes.items():
        data[lba * pattern.BLOCK : (lba + 1) * pattern.BLOCK] = block
    path.write_bytes(bytes(data))
    return path


def test_accepts_what_was_written(tmp_path: Path) -> None:
    pattern = vmkit.nvme_pattern()
    image = image_with(tmp_path, {5: pattern.block(5, 3), 6: pattern.block(6, 1)})
    verdict = vmkit.check_nvme_image(image, {"written": [[5, 3], [6, 1]], "uncertain": []})
    assert verdict["bad"] == []
    assert verdict["checked"] == BLOCKS
    assert verdict["written_checked"] == 2


def test_rejects_stale_wrong_and_torn_blocks(tmp_path: Path) -> None:
    pattern = vmkit.nvme_pattern()
    torn = pattern.block(9, 2)[:256] + pattern.block(9, 1)[256:]
    image = image_with(
        tmp_path,
        {
            5: pattern.block(5, 2),  # stale: generation 3 was reported
            7: pattern.block(8, 0),  # another block's contents
            9: torn,
            20: pattern.block(20, 1),  # written, but nobody said so
        },
    )
    report = {"written": [[5, 3], [7, 1], [9, 2]], "uncertain": []}
    verdict = vmkit.check_nvme_image(image, report)
    assert sorted(bad[0] for bad in verdict["bad"]) == [5, 7, 9, 20]


def test_skips_the_ranges_of_killed_runs(tmp_path: Path) -> None:
    pattern = vmkit.nvme_pattern()
    image = image_with(tmp_path, {33: pattern.block(33, 4)})
    verdict = vmkit.check_nvme_image(image, {"written": [], "uncertain": [[32, 8]]})
    assert verdict["bad"] == []
    assert verdict["uncertain"] == 8
    assert verdict["checked"] == BLOCKS - 8
