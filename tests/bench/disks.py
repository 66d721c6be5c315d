"""The cost of a sandbox's own disk (engine/host/disks.py) on write-heavy work: the same
workspace container writing to a Docker volume on the host's file system (today's without
disks, the baseline) and to a volume bound to a folder of a loop-mounted ext4 disk, as every
sandbox's volumes are, in the same run. Two workloads, as the candidate: one big file written
and synced, and many small files written then synced (an npm install's or a git checkout's
pattern)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

from engine.host.disks import Disks, Folder

IMAGE = "workspace-python:latest"
LABEL = {"io.sandbox-engine.bench": "disks"}
WORKLOADS = {
    "write 256 MiB and fsync": (
        "dd if=/dev/zero of=/w/big bs=1M count=256 conv=fsync status=none && rm /w/big"
    ),
    "5,000 files of 4 KiB, then sync": (
        'python3 -c "import os\n'
        "os.makedirs('/w/many', exist_ok=True)\n"
        "for i in range(5000): open(f'/w/many/{i}', 'wb').write(b'x' * 4096)\n"
        'os.sync()" && rm -rf /w/many'
    ),
}


def _timed(container: Any, command: str) -> float:
    started = time.perf_counter()
    done = container.exec_run(["sh", "-c", command])
    elapsed = time.perf_counter() - started
    assert done.exit_code == 0, done.output.decode()[-500:]
    return elapsed


def run(quick: bool) -> dict[str, Any]:
    rounds = 3 if quick else 7
    client = docker.from_env(timeout=300)
    root = Path(tempfile.mkdtemp(prefix="bench-disks-"))
    disks = Disks(root)
    made: list[Any] = []
    volumes: list[Any] = []
    try:
        point = disks.make("bench", "benchdisk", 2 * 2**30, [Folder("w", "1777")])
        plain = client.volumes.create(labels=LABEL)
        bound = client.volumes.create(
            driver_opts={"type": "none", "o": "bind", "device": f"{point}/w"}, labels=LABEL
        )
        volumes += [plain, bound]
        containers = {}
        for name, volume in (("docker volume", plain), ("own disk", bound)):
            c = client.containers.run(
                IMAGE, ["sleep", "infinity"], detach=True, labels=LABEL,
                volumes={volume.name: {"bind": "/w", "mode": "rw"}}, network_mode="none",
            )  # fmt: skip
            made.append(c)
            c.exec_run(["chmod", "1777", "/w"], user="root")
            containers[name] = c
        out: dict[str, Any] = {}
        for kind, command in WORKLOADS.items():
            samples: dict[str, list[float]] = {name: [] for name in containers}
            for c in containers.values():
                _timed(c, command)  # once untimed: the page cache and the disk's blocks warm
            for _ in range(rounds):  # alternated, so drift on the machine hits both
                for name, c in containers.items():
                    samples[name].append(_timed(c, command))
            medians = {name: statistics.median(s) for name, s in samples.items()}
            out[kind] = {
                "docker_volume_median_s": medians["docker volume"],
                "own_disk_median_s": medians["own disk"],
                "ratio": medians["own disk"] / medians["docker volume"],
                "n": rounds,
            }
        return out
    finally:
        for c in made:
            c.remove(force=True)
        for v in volumes:
            v.remove(force=True)
        disks.drop("bench", "benchdisk")
        client.close()


def report(r: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| write-heavy work | Docker volume median | own disk median | ratio |",
        "|---|---|---|---|",
    ]
    for kind, b in r.items():
        lines.append(
            f"| {kind} ({b['n']} rounds) | {b['docker_volume_median_s'] * 1000:.0f} ms"
            f" | {b['own_disk_median_s'] * 1000:.0f} ms | {b['ratio']:.2f}x |"
        )
    return lines


if __name__ == "__main__":  # python -m tests.bench.disks (QUICK=1: 3 rounds)
    import os

    print("\n".join(report(run(os.environ.get("QUICK") == "1"))))
