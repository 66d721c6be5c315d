"""A sandbox's disk (engine/host/disks.py) on this host's kernel: made, mounted, bounded,
mounted again after a "reboot", dropped; run in the engine's process and, as the compose
file's unprivileged engine runs it, in a privileged helper container in the host's mount
namespace. The disk hog is tests/test_isolation_disk.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from engine.host.disks import DiskError, Disks, Folder

MIB = 2**20


def _mounted(point: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(point) for line in mounts)


def _fill(folder: Path) -> tuple[int, str]:
    written = 0
    try:
        with open(folder / "fill", "wb") as f:
            while written < 1024 * MIB:
                f.write(b"x" * MIB)
                f.flush()
                os.fsync(f.fileno())
                written += MIB
    except OSError as exc:
        return written, exc.strerror or ""
    return written, "no error"


@pytest.mark.parametrize("helper", ["", "sandbox-base:bookworm"], ids=["engine", "helper"])
def test_a_disk_is_made_bounded_mounted_again_and_dropped(tmp_path: Path, helper: str) -> None:
    disks = Disks(tmp_path / "disks", helper)
    point = disks.make("e1", "abc123", 64 * MIB, [Folder("home"), Folder("tmp", "1777")])
    try:
        assert point == tmp_path / "disks" / "e1" / "abc123" and _mounted(point)
        assert oct((point / "tmp").stat().st_mode & 0o7777) == "0o1777"
        with open("/proc/self/mounts") as mounts:
            options = next(line.split()[3] for line in mounts if line.split()[1] == str(point))
        assert {"nosuid", "nodev"} <= set(options.split(",")), options
        # The bound is the file system's: a write past it fails, the host gives at most it.
        written, error = _fill(point / "tmp")
        assert error == "No space left on device" and 40 * MIB < written <= 64 * MIB
        image = tmp_path / "disks" / "e1" / "abc123.img"
        assert image.stat().st_blocks * 512 <= 64 * MIB
        assert image.stat().st_size == 64 * MIB
        # Again: nothing is lost (the file written stays); a second make is a no-op.
        assert disks.make("e1", "abc123", 64 * MIB, [Folder("home")]) == point
        assert (point / "tmp" / "fill").stat().st_size == written
        assert disks.listed("e1") == ["abc123"] and disks.listed("e2") == []
        # A reboot unmounts it: remount brings it back with what was on it.
        subprocess.run(["umount", str(point)], check=True)
        assert not _mounted(point)
        disks.remount("e1")
        assert _mounted(point) and (point / "tmp" / "fill").exists()
    finally:
        disks.drop("e1", "abc123")
    assert not _mounted(point) and not point.exists() and not image.exists()
    disks.drop("e1", "abc123")  # idempotent
    assert disks.listed("e1") == []


def test_bad_disk_requests_are_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disks = Disks(tmp_path / "disks")
    with pytest.raises(DiskError, match="not a sandbox id"):
        disks.make("e1", "../etc", 64 * MIB, [])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(DiskError, match="SANDBOX_DISK_HELPER_IMAGE"):
        disks.make("e1", "abc123", 64 * MIB, [])
    assert not (tmp_path / "disks").exists()
    with pytest.raises(DiskError, match="did not run"):
        Disks(tmp_path / "disks", "no-such-image:nowhere").listed("e1")


def test_the_doctor_row_makes_and_drops_a_disk(tmp_path: Path) -> None:
    from engine.host.doctor import check_disks
    from engine.settings import Settings

    row = check_disks(Settings(disk_dir=tmp_path))
    assert row.ok, row
    assert str(tmp_path) in row.detail and "free" in row.detail
    assert not list(tmp_path.rglob("*.img"))
    off = check_disks(Settings(disk_dir=tmp_path, disks=False))
    assert not off.ok and "fill the host's disk" in off.detail
