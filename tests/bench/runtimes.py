"""gVisor (runsc) against runc in the same run, on the same workspace-only template (1 CPU,
1 GiB, 256 processes), through the same engine; the runc sandbox is the baseline:

- cold create to ``running`` and destroy to ``destroyed`` through the API, the two runtimes
  alternating round by round (after a warm-up of each);
- terminal echo round trip over the engine's WebSocket (tests/bench/terminal.py's machinery):
  one typed letter until the shell echoes it, p50 and p99;
- a CPU-bound workload, twice: a pure Python loop, and a small compile (``gcc -O2`` of a
  generated C file of 100 functions: the driver, cc1, as and ld, so some process starts too);
- a system-call-heavy one: ``git status`` over a repository of 5,000 committed files in the
  workspace's home (its named volume, as a candidate's checkout would be): an ``lstat`` per
  file, the index read, the directories read.

The workloads run in one running sandbox of each runtime, by ``docker exec`` as the workspace
user, alternating runtime by runtime each round; each is timed inside the sandbox (the exec's
own start is left out) and, as a check, from outside around the exec.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker

from engine.model.templates import load
from tests.bench.harness import (
    LIVE,
    Engine,
    api_client,
    create_running,
    destroy_all,
    engine_process,
    summary,
    wait_state,
)
from tests.bench.terminal import WebSocketChannel, attach, detach_all, echo_round_trips

RUNTIMES = ("runc", "runsc")
TEMPLATE = {"runc": "web", "runsc": "web-runsc"}
FILES = 5000
FUNCTIONS = 100  # in the C file compiled

# Run inside the workspace as its user: ``setup`` (the repository and the C file), or one
# workload timed ``rounds`` times; prints the seconds of each as JSON.
WORKLOAD = r"""
import json, os, subprocess, sys, time
kind, rounds, files, functions = sys.argv[1], *map(int, sys.argv[2:5])
top = os.path.expanduser("~/bench-runtimes")
repo = os.path.join(top, "repo")
def git(*args):
    subprocess.run(["git", "-C", repo, *args], check=True, stdout=subprocess.DEVNULL)
def setup():
    os.makedirs(repo, exist_ok=True)
    for i in range(files):
        folder = os.path.join(repo, f"d{i // 100:02d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"f{i:05d}.txt"), "w") as f:
            f.write(f"file {i}\n" * 4)
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "files")
    with open(os.path.join(top, "prog.c"), "w") as f:
        for i in range(functions):
            f.write(f"int f{i}(int x) {{ int s = {i}; for (int j = 0; j < x; j++)"
                    f" s = s * 31 + (j ^ {i}) + (s >> 3); return s; }}\n")
        f.write("int main(int argc, char **argv) { int s = 0;\n")
        f.write("".join(f"  s += f{i}(argc * {i + 1});\n" for i in range(functions)))
        f.write("  return s & 1; }\n")
def cpu():
    n = 0
    for i in range(4_000_000):
        n += i * i % 7
def compile_():
    subprocess.run(["gcc", "-O2", "-o", os.path.join(top, "prog"), os.path.join(top, "prog.c")],
                   check=True)
def status():
    out = subprocess.run(["git", "-C", repo, "status", "--porcelain"], check=True,
                         capture_output=True).stdout
    assert out == b"", out[:200]
work = {"setup": setup, "cpu": cpu, "compile": compile_, "git-status": status}[kind]
took = []
for _ in range(rounds):
    t = time.perf_counter()
    work()
    took.append(time.perf_counter() - t)
print(json.dumps(took))
"""
WORKLOADS = {
    "cpu": "CPU: a Python loop (4 million multiplications)",
    "compile": f"CPU: a small compile (gcc -O2, {FUNCTIONS} functions)",
    "git-status": f"system calls: git status over {FILES:,} files",
}


@contextmanager
def runtime_templates() -> Iterator[Path]:
    """A templates folder: the workspace-only ``web`` (runc, dockerd's default) and
    ``web-runsc``, the same under gVisor."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-bench-runtimes-"))
    try:
        web = (LIVE / "web.yaml").read_text()
        (folder / "web.yaml").write_text(web)
        (folder / "web-runsc.yaml").write_text(
            web.replace("name: web", "name: web-runsc") + "runtime: runsc\n"
        )
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cold_rounds(engine: Engine, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Create to ``running`` and destroy to ``destroyed`` through the API, one at a time, the
    runtimes alternating; the first round of each is a warm-up."""
    out: dict[str, dict[str, list[float]]] = {rt: {"create": [], "destroy": []} for rt in RUNTIMES}
    with api_client(engine) as http:
        for i in range(repeats + 1):
            for rt in RUNTIMES:
                started = time.perf_counter()
                (sid,) = create_running(http, TEMPLATE[rt], 1, 1)
                created = time.perf_counter() - started
                started = time.perf_counter()
                http.delete(f"/api/v1/sandboxes/{sid}").raise_for_status()
                wait_state(http, sid, "destroyed")
                if i:
                    out[rt]["create"].append(created)
                    out[rt]["destroy"].append(time.perf_counter() - started)
                time.sleep(1.0)  # the stack reserve refills, as between real requests
    return out


def _host_threads(container: Any) -> int:
    """The container's tasks as the host counts them (its pids cgroup): under runsc the
    Sentry's threads, which its pids limit bounds."""
    for folder in (f"pids/docker/{container.id}", f"docker/{container.id}"):  # v1, v2
        current = Path("/sys/fs/cgroup", folder, "pids.current")
        if current.exists():
            return int(current.read_text())
    return int(container.stats(stream=False).get("pids_stats", {}).get("current", 0))


def _exec(container: Any, user: str, kind: str, rounds: int) -> tuple[list[float], float]:
    """The workload's inside timings, and the seconds around the whole exec. A runsc
    container that ends under an exec never answers it: the exec is given 10 minutes."""
    argv = ["python3", "-c", WORKLOAD, kind, str(rounds), str(FILES), str(FUNCTIONS)]
    answer: list[Any] = []
    started = time.perf_counter()
    waiter = threading.Thread(
        target=lambda: answer.append(container.exec_run(argv, user=user)), daemon=True
    )
    waiter.start()
    waiter.join(timeout=600)
    outside = time.perf_counter() - started
    container.reload()
    if not answer or answer[0].exit_code != 0:
        state = {k: container.attrs["State"].get(k) for k in ("Status", "OOMKilled", "ExitCode")}
        raise RuntimeError(
            f"{kind} failed ({answer[0].exit_code if answer else 'no answer in 600 s'}) in"
            f" {container.name} ({container.attrs['HostConfig']['Runtime']}, {state},"
            f" {container.attrs['RestartCount']} restarts):"
            f" {answer[0].output.decode()[-500:] if answer else ''}"
        )
    if container.attrs["RestartCount"]:
        raise RuntimeError(f"{container.name} restarted during {kind}: {container.attrs['State']}")
    return [float(s) for s in json.loads(answer[0].output.decode().splitlines()[-1])], outside


def run(quick: bool) -> dict[str, Any]:
    cold_repeats = 2 if quick else 5
    echoes = 300 if quick else 1000
    rounds = 3 if quick else 7
    workspace = load(LIVE / "web.yaml").workspace
    client = docker.from_env(timeout=300)
    results: dict[str, Any] = {"rounds": rounds, "files": FILES}
    try:
        with (
            runtime_templates() as folder,
            engine_process(SANDBOX_TEMPLATES_DIR=str(folder), SANDBOX_RUNTIME="runc") as engine,
            api_client(engine) as http,
        ):
            cold = cold_rounds(engine, cold_repeats)
            ids = {rt: create_running(http, TEMPLATE[rt], 1, 1)[0] for rt in RUNTIMES}
            try:
                containers = {}
                for rt, sid in ids.items():
                    containers[rt] = client.containers.get(
                        http.get(f"/api/v1/sandboxes/{sid}").json()["workspace"]
                    )
                    got = containers[rt].attrs["HostConfig"]["Runtime"]
                    if got != rt:
                        raise RuntimeError(f"{TEMPLATE[rt]}: runtime {got}, not {rt}")
                kernels = {
                    rt: c.exec_run(["uname", "-r"]).output.decode().strip()
                    for rt, c in containers.items()
                }
                echo: dict[str, list[float]] = {}
                for rt, sid in ids.items():
                    url = engine.base_url.replace("http", "ws", 1)
                    url += f"/api/v1/ws/terminal/{sid}?token={engine.member_key}"
                    ch = WebSocketChannel(url)
                    try:
                        attach(ch)
                        echo_round_trips(ch, 20)  # warm-up
                        echo[rt] = echo_round_trips(ch, echoes)
                    finally:
                        ch.close()
                        time.sleep(0.5)
                        detach_all(client, containers[rt].name, workspace.user)
                setup = {
                    rt: _exec(c, workspace.user, "setup", 1)[0][0] for rt, c in containers.items()
                }
                inside: dict[str, dict[str, list[float]]] = {
                    kind: {rt: [] for rt in RUNTIMES} for kind in WORKLOADS
                }
                outside: dict[str, dict[str, list[float]]] = {
                    kind: {rt: [] for rt in RUNTIMES} for kind in WORKLOADS
                }
                for kind in WORKLOADS:
                    for c in containers.values():  # one untimed run of each: caches warm
                        _exec(c, workspace.user, kind, 1)
                    for _ in range(rounds):
                        for rt, c in containers.items():
                            took, around = _exec(c, workspace.user, kind, 1)
                            inside[kind][rt] += took
                            outside[kind][rt].append(around)
                threads = {rt: _host_threads(c) for rt, c in containers.items()}
            finally:
                # Without the repository: a destroy archives the home first, and its git
                # summary over 5,000 files could take the Sentry past its pids limit
                # (docs/benchmarks.md); the destroys here are not what is measured.
                for c in containers.values():
                    c.exec_run(["rm", "-rf", "bench-runtimes"], user=workspace.user,
                               workdir="/home/coder")  # fmt: skip
                destroy_all(http, list(ids.values()), concurrency=2)
    finally:
        client.close()

    def compare(samples: dict[str, list[float]]) -> dict[str, Any]:
        a, b = summary(samples["runc"]), summary(samples["runsc"])
        return {"runc": a, "runsc": b, "ratio_median": b["median"] / a["median"]}

    results["kernel"] = kernels
    results["cold_create"] = compare({rt: cold[rt]["create"] for rt in RUNTIMES})
    results["destroy"] = compare({rt: cold[rt]["destroy"] for rt in RUNTIMES})
    e = {rt: summary(echo[rt]) for rt in RUNTIMES}
    results["echo_ms"] = {
        **e,
        "ratio_p50": e["runsc"]["p50"] / e["runc"]["p50"],
        "ratio_p99": e["runsc"]["p99"] / e["runc"]["p99"],
    }
    results["setup_s"] = setup
    results["host_threads_after"] = threads
    results["workloads"] = {
        kind: {**compare(inside[kind]), "exec_seconds": compare(outside[kind])}
        for kind in WORKLOADS
    }
    return results


def _s(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def report(r: dict[str, Any]) -> list[str]:
    """The runtimes' comparison as the markdown table of docs/benchmarks.md."""
    e = r["echo_ms"]
    lines = [
        "",
        f"runsc (gVisor) against runc, workspace-only sandboxes (1 CPU); kernel"
        f" {r['kernel']['runc']} / {r['kernel']['runsc']}:",
        "",
        "| | runc median | runc p95 | runsc median | runsc p95 | runsc/runc |",
        "|---|---|---|---|---|---|",
    ]
    for name, b, n in (
        ("cold create to running", r["cold_create"], r["cold_create"]["runc"]["n"]),
        ("destroy to destroyed", r["destroy"], r["destroy"]["runc"]["n"]),
    ):
        lines.append(
            f"| {name} ({n} each) | {_s(b['runc']['median'])} | {_s(b['runc']['p95'])}"
            f" | {_s(b['runsc']['median'])} | {_s(b['runsc']['p95'])}"
            f" | {b['ratio_median']:.1f}x |"
        )
    lines += [
        f"| terminal echo p50 ({e['runc']['n']} keystrokes) | {e['runc']['p50']:.2f} ms |"
        f" | {e['runsc']['p50']:.2f} ms | | {e['ratio_p50']:.1f}x |",
        f"| terminal echo p99 | {e['runc']['p99']:.2f} ms | | {e['runsc']['p99']:.2f} ms |"
        f" | {e['ratio_p99']:.1f}x |",
    ]
    for kind, label in WORKLOADS.items():
        w = r["workloads"][kind]
        lines.append(
            f"| {label} ({w['runc']['n']} runs) | {_s(w['runc']['median'])}"
            f" | {_s(w['runc']['p95'])} | {_s(w['runsc']['median'])}"
            f" | {_s(w['runsc']['p95'])} | {w['ratio_median']:.1f}x |"
        )
    s = r["setup_s"]
    lines += [
        "",
        f"writing and committing the {r['files']:,} files (once): {_s(s['runc'])} under runc,"
        f" {_s(s['runsc'])} under runsc ({s['runsc'] / s['runc']:.1f}x); the workspace's"
        f" tasks as the host counts them after the workloads (its pids limit is 256):"
        f" {r['host_threads_after']['runc']} under runc,"
        f" {r['host_threads_after']['runsc']} under runsc (the Sentry's threads)",
    ]
    return lines


if __name__ == "__main__":
    results = run(os.environ.get("QUICK") == "1")
    print(json.dumps(results, indent=2))
    print("\n".join(report(results)))
