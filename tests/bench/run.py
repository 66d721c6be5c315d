"""`make bench` (`QUICK=1`: fewer repeats, in under 3 minutes): every benchmark, each with its
baseline measured in the same run. Results go to .bench/<timestamp>.json (git-ignored) and,
as markdown tables, to stdout — docs/benchmarks.md holds a copy with the machine it ran on.

1. cold create and destroy through the API (workspace-only and backend-python) against the
   Docker SDK making the same objects (tests/bench/creates.py);
2. pooled create through the API (creates.py);
3. 20 creates at once, and the engine's memory per stack operation in flight (creates.py);
4. terminal echo round trip and output throughput against a raw `docker exec` attach
   (tests/bench/terminal.py);
5. GET list and GET one at a fixed 200 requests a second with 100 live sandboxes
   (tests/bench/load.py);
6. the AI gateway: a streamed Messages API request through it against the same request sent
   to the upstream directly, and 50 streams at once (tests/bench/gateway.py);
7. gVisor against runc: cold create, terminal echo, a CPU-bound and a system-call-heavy
   workload in a sandbox of each runtime (tests/bench/runtimes.py);
8. a sandbox's own disk against a Docker volume on write-heavy work (tests/bench/disks.py);
9. HTTPS through the egress proxy against open egress (tests/bench/egress.py);
10. the swarm backend on the lab swarm against one host: 30 creates at once with one and two
    engines, cold and pooled create p50 (tests/bench/swarm.py; needs make swarm-lab).

Arguments select parts (all of them without): ``creates`` (1, 2), ``engine`` (3, 4, 5),
``gateway`` (6), ``runtimes`` (7), ``disks`` (8), ``egress`` (9), ``swarm`` (10), e.g.
``python -m tests.bench.run runtimes``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from typing import Any

from tests.bench import creates, disks, egress, gateway, load, runtimes, swarm, terminal
from tests.bench.harness import ROOT, engine_process

PARTS = ("creates", "engine", "gateway", "runtimes", "disks", "egress", "swarm")


def main() -> None:
    quick = os.environ.get("QUICK") == "1"
    parts = sys.argv[1:] or list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        sys.exit(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    started = time.monotonic()
    results: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.platform()}",
        "quick": quick,
    }
    if "creates" in parts:
        results["cold"] = creates.cold(quick)
        results["pooled"] = creates.pooled(quick)
    if "engine" in parts:
        with engine_process() as engine:
            results["concurrency"], ids = creates.concurrent(engine)
            results["terminal"] = terminal.run(engine, quick, sandbox=ids[0])
            results["load"] = load.run(engine, quick, ids=ids)
    if "gateway" in parts:
        results["gateway"] = gateway.run(quick)
    if "runtimes" in parts:
        results["runtimes"] = runtimes.run(quick)
    if "disks" in parts:
        results["disks"] = disks.run(quick)
    if "egress" in parts:
        results["egress"] = egress.run(quick)
    if "swarm" in parts:
        results["swarm"] = swarm.run(quick)
    results["seconds"] = time.monotonic() - started
    out = ROOT / ".bench" / f"{results['at'].replace(':', '')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\n{out} ({results['seconds']:.0f} s)")


def _s(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def report(r: dict[str, Any]) -> str:
    """The results as the markdown tables of docs/benchmarks.md (the parts that ran)."""
    lines = [f"{r['machine']}, {r['at']}{', QUICK=1' if r['quick'] else ''}"]
    if "cold" in r:
        lines += _creates(r)
    if "concurrency" in r:
        lines += _engine(r)
    if "gateway" in r:
        lines += gateway.report(r["gateway"])
    if "runtimes" in r:
        lines += runtimes.report(r["runtimes"])
    if "disks" in r:
        lines += disks.report(r["disks"])
    if "egress" in r:
        lines += egress.report(r["egress"])
    if "swarm" in r:
        lines += swarm.report(r["swarm"])
    return "\n".join(lines)


def _creates(r: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| benchmark | engine median | engine p95 | docker median | docker p95 | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, b in r["cold"].items():
        e, d = b["engine"], b["docker"]
        lines.append(
            f"| {name} | {_s(e['median'])} | {_s(e['p95'])} | {_s(d['median'])}"
            f" | {_s(d['p95'])} | {b['ratio_median']:.1f}x |"
        )
    for name, b in r["pooled"].items():
        e = b["engine"]
        lines += [
            "",
            f"{name}: p50 {_s(e['p50'])}, p95 {_s(e['p95'])}, p99 {_s(e['p99'])},"
            f" max {_s(e['max'])} ({e['n']} claims)",
        ]
    return lines


def _engine(r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    c = r["concurrency"]
    lines += [
        "",
        f"{c['creates']} creates at once: all running in {_s(c['all_running_s'])}"
        f" (the Docker SDK, {c['creates']} threads: {_s(c['docker_all_made_s'])};"
        f" {c['ratio']:.1f}x), {c['errors']} errors;"
        f" engine memory {c['engine_rss_idle_mb']:.0f} MB idle,"
        f" {c['engine_rss_peak_mb']:.0f} MB at peak:"
        f" {c['mb_per_operation_in_flight']:.0f} MB per stack operation in flight"
        f" ({c['stack_operations_at_once']} at once)",
    ]
    t = r["terminal"]
    echo, tp = t["echo_ms"], t["throughput"]
    lines += [
        "",
        "| terminal | engine p50 | engine p99 | docker exec p50 | docker exec p99 | ratio |",
        "|---|---|---|---|---|---|",
        f"| echo round trip ({echo['engine']['n']} keystrokes) | {echo['engine']['p50']:.2f} ms"
        f" | {echo['engine']['p99']:.2f} ms | {echo['docker']['p50']:.2f} ms"
        f" | {echo['docker']['p99']:.2f} ms | {echo['ratio_median']:.1f}x |",
        f"| output throughput ({tp['produced_bytes_per_run'] / 1e6:.0f} MB) |"
        f" {tp['engine']['mb_per_s']['median']:.1f} MB/s | | "
        f"{tp['docker']['mb_per_s']['median']:.1f} MB/s | | "
        f"{tp['ratio_median_mb_per_s']:.2f}x |",
    ]
    ld = r["load"]
    lines += [
        "",
        f"API at {ld['endpoints']['GET /healthz']['target_rps']} requests/s for"
        f" {ld['seconds_per_endpoint']} s each, {ld['sandboxes']} live sandboxes:",
        "",
        "| endpoint | p50 | p95 | p99 | max | achieved/s | errors | engine CPU/request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in ld["endpoints"].items():
        lat = e["latency_ms"]
        lines.append(
            f"| {name} | {lat['p50']:.1f} ms | {lat['p95']:.1f} ms | {lat['p99']:.1f} ms"
            f" | {lat['max']:.1f} ms | {e['achieved_rps']:.0f} | {e['errors']}"
            f" | {e['engine_cpu_ms_per_request']:.2f} ms |"
        )
    lines += [
        "",
        f"engine memory with {ld['sandboxes']} live sandboxes:"
        f" {ld['rss_mb_idle_with_sandboxes']:.0f} MB (engine and its shared provider)",
    ]
    return lines


if __name__ == "__main__":
    main()
