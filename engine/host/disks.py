"""A disk of its own for every sandbox: a sparse file holding an ext4 file system of the
template's ``disk_limit``, loop-mounted on the host, its folders bound into the sandbox's
volumes (docs/security.md, "Disk"). A write past the limit fails with "no space left on
device" inside the sandbox, and the host's free space drops by no more than the limit: the
file system is the bound, not a count the engine keeps.

Layout under ``SANDBOX_DISK_DIR``: ``<engine>/<sandbox>.img`` and its mount point
``<engine>/<sandbox>/`` (``_`` for stacks made without an engine: the plain CLI), one folder
per volume in it. The commands (``truncate``, ``mkfs.ext4``, ``mount``) run in the engine's
process when it is root on the host (``make run``), or else in a one-shot privileged
container of ``SANDBOX_DISK_HELPER_IMAGE`` that enters dockerd's mount namespace (the
engine in a container: deploy/docker-compose.prod.yml) — nothing else of the host is
touched either way.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import EngineError
from engine.units import format_memory

if TYPE_CHECKING:
    from engine.model.templates import Template
    from engine.settings import Settings

# One sh script for every operation; $1 is the operation. Errors exit non-zero with a line
# on stderr. Mount options: no devices or set-uid files from a candidate's disk; blocks a
# candidate frees go back to the host (discard punches holes in the sparse file); the inode
# tables are not zeroed in the background (that would fill the sparse file for nothing).
SCRIPT = r"""
set -eu
op=$1; dir=$2; shift 2
mounted() { grep -qs " $1 " /proc/self/mounts; }
attach() {
  mkdir -p "$2"
  mounted "$2" || mount -o loop,nosuid,nodev,noatime,discard,noinit_itable "$1" "$2"
}
case $op in
make)
  sid=$1 size=$2; shift 2
  mkdir -p "$dir"
  img=$dir/$sid.img mnt=$dir/$sid
  if [ ! -e "$img" ]; then
    rm -f "$img.new"
    truncate -s "$size" "$img.new"
    mkfs.ext4 -q -F -m 0 -L "sbx-$sid" -E lazy_itable_init=1,lazy_journal_init=1 "$img.new"
    mv "$img.new" "$img"
  fi
  attach "$img" "$mnt"
  for entry in "$@"; do
    sub=${entry%:*} mode=${entry##*:}
    [ -d "$mnt/$sub" ] || { mkdir "$mnt/$sub"; chmod "$mode" "$mnt/$sub"; }
  done
  ;;
drop)
  sid=$1 img=$dir/$1.img mnt=$dir/$1
  if mounted "$mnt"; then umount "$mnt" 2>/dev/null || umount -l "$mnt"; fi
  [ ! -d "$mnt" ] || rmdir "$mnt"
  rm -f "$img" "$img.new"
  ;;
list)
  [ -d "$dir" ] || exit 0
  for img in "$dir"/*.img; do [ -e "$img" ] && basename "$img" .img; done; exit 0
  ;;
remount)
  [ -d "$dir" ] || exit 0
  for img in "$dir"/*.img; do [ -e "$img" ] && attach "$img" "${img%.img}"; done; exit 0
  ;;
check)
  for tool in truncate mkfs.ext4 mount umount; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 3; }
  done
  mkdir -p "$dir"; df -k -P "$dir" | tail -n 1
  ;;
esac
"""

SANDBOX = re.compile(r"^[a-z0-9]{6,30}$")


class DiskError(EngineError):
    """The host could not make, mount or remove a sandbox's disk."""


@dataclass(frozen=True)
class Folder:
    """A folder of the disk (one per volume) and its mode: the scratch folders (/tmp) are
    everyone's, sticky; a volume Docker fills from the image gets its owner from it."""

    name: str
    mode: str = "0755"


class Disks:
    def __init__(self, root: Path, helper_image: str = "") -> None:
        self.root = root
        self.helper_image = helper_image

    def mount_point(self, instance: str, sandbox_id: str) -> Path:
        """Where the sandbox's disk is mounted on the host (its volumes' folders are in it)."""
        return self.root / (instance or "_") / sandbox_id

    def make(self, instance: str, sandbox_id: str, size: int, folders: list[Folder]) -> Path:
        """Make (or, after a reboot, mount again) the sandbox's disk of ``size`` bytes with
        its folders; returns the mount point. Idempotent."""
        _check_id(sandbox_id)
        args = [sandbox_id, str(size), *(f"{f.name}:{f.mode}" for f in folders)]
        self._run("make", instance, args, what=f"making the {format_memory(size)} disk")
        return self.mount_point(instance, sandbox_id)

    def drop(self, instance: str, sandbox_id: str) -> None:
        """Unmount and delete the sandbox's disk and everything on it. Idempotent."""
        _check_id(sandbox_id)
        self._run("drop", instance, [sandbox_id], what="removing the disk")

    def listed(self, instance: str) -> list[str]:
        """The sandboxes this engine holds a disk for."""
        out = self._run("list", instance, [], what="listing the disks")
        return [line for line in out.split() if SANDBOX.match(line)]

    def remount(self, instance: str) -> None:
        """Mount every disk of this engine that is not (after a reboot of the host)."""
        self._run("remount", instance, [], what="mounting the disks again")

    def check(self) -> str:
        """A line for ``make doctor``: where disks are made and the free space there; raises
        DiskError when the tools or the mount are missing."""
        fields = self._run("check", "", [], what="checking the disk tools").split()
        free = int(fields[3]) * 1024 if len(fields) > 3 and fields[3].isdigit() else 0
        return f"loop-mounted ext4 per sandbox in {self.root} ({format_memory(free)} free there)"

    def _run(self, op: str, instance: str, args: list[str], *, what: str) -> str:
        folder = str(self.root / (instance or "_")) if op != "check" else str(self.root)
        argv = ["sh", "-c", SCRIPT, "disk", op, folder, *args]
        if self.helper_image:
            out, err, code = _in_helper(self.helper_image, argv)
        else:
            if os.geteuid() != 0:
                raise DiskError(
                    f"{what}: the engine is not root on this host; set "
                    "SANDBOX_DISK_HELPER_IMAGE to run the disk commands in a helper container "
                    "(docs/operations.md, Disks)"
                )
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired as exc:
                raise DiskError(f"{what}: no answer in 120 s") from exc
            out, err, code = done.stdout, done.stderr, done.returncode
        if code != 0:
            raise DiskError(f"{what} in {folder}: {err.strip() or f'exit status {code}'}")
        return out


class SandboxDisks:
    """The disks of one engine's sandboxes, as its stacks use them: none when SANDBOX_DISKS
    is off (every method then does nothing). ``instance`` gives the engine's id, known once
    the engine has its database."""

    def __init__(self, settings: Settings, instance: Callable[[], str]) -> None:
        self.on = settings.disks
        self.default_limit = settings.disk_limit
        self.disks = Disks(settings.disk_path, settings.disk_helper_image)
        self.instance = instance

    def make(
        self, template: Template, sandbox_id: str, progress: Callable[[str], None] | None = None
    ) -> str:
        """The sandbox's disk made and mounted: its mount point; "" off."""
        from engine.model.spec import disk_folders

        if not self.on:
            return ""
        size = template.disk_limit or self.default_limit
        folders = [Folder(name, mode) for name, mode in disk_folders(template)]
        point = self.disks.make(self.instance(), sandbox_id, size, folders)
        if progress is not None:
            progress(f"disk: {format_memory(size)} of its own (ext4 on a loop device)")
        return str(point)

    def path(self, sandbox_id: str) -> str:
        """Where the sandbox's disk is (or would be) mounted; "" off."""
        return str(self.disks.mount_point(self.instance(), sandbox_id)) if self.on else ""

    def drop(self, sandbox_id: str) -> None:
        if self.on:
            self.disks.drop(self.instance(), sandbox_id)

    def listed(self) -> list[str]:
        return self.disks.listed(self.instance()) if self.on else []

    def remount(self) -> None:
        if self.on:
            self.disks.remount(self.instance())


def _check_id(sandbox_id: str) -> None:
    if not SANDBOX.match(sandbox_id):
        raise DiskError(f"no disk for {sandbox_id!r}: not a sandbox id")


# The helper enters dockerd's mount namespace: the one Docker resolves the volumes' folders
# in (the host's, on a server; PID 1's is not always open to root, as in some VMs).
ENTER_DOCKERD = r"""
for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ] && pid=${p#/proc/}; done
[ -n "${pid:-}" ] || { echo "no dockerd process is visible" >&2; exit 4; }
exec nsenter --target "$pid" --mount -- "$@"
"""


def _in_helper(image: str, argv: list[str]) -> tuple[str, str, int]:
    """Run the script in dockerd's mount namespace from a one-shot container with the
    capabilities that takes (the engine itself is unprivileged; the Docker socket it is given
    is root's anyway)."""
    import docker
    import docker.errors

    client = None
    try:
        client = docker.from_env(timeout=180)
        container = client.containers.run(
            image,
            ["sh", "-c", ENTER_DOCKERD, "helper", *argv],
            entrypoint=[],
            user="0",
            # What entering a mount namespace and loop-mounting take, nothing more (not
            # --privileged: it asks for every capability, more than some hosts' root has).
            cap_add=["SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE"],
            security_opt=["seccomp=unconfined", "apparmor=unconfined"],
            device_cgroup_rules=["b 7:* rwm", "c 10:237 rwm"],  # loop devices, loop-control
            pid_mode="host",
            network_mode="none",
            labels={"io.sandbox-engine.role": "disk-helper"},
            detach=True,
        )
        try:
            code = int(container.wait(timeout=150).get("StatusCode", 1))
            out = container.logs(stdout=True, stderr=False).decode(errors="replace")
            err = container.logs(stdout=False, stderr=True).decode(errors="replace")
        finally:
            container.remove(force=True)
    except docker.errors.DockerException as exc:
        raise DiskError(f"the disk helper ({image}) did not run: {exc}") from exc
    finally:
        if client is not None:
            client.close()
    return out, err, code
