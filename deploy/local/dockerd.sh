#!/usr/bin/env bash
# Starts dockerd when its socket does not answer, then waits until it does.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
log() { printf '[dockerd] %s\n' "$*" >&2; }

# gVisor's runsc, registered with dockerd as the runtime "runsc" (templates' `runtime: runsc`)
# in /etc/docker/daemon.json, next to whatever else it holds. Its arguments: the ptrace
# platform (KVM is not there in every VM, and hangs in this one); the container's own network
# namespace used as it is (--network=host: this runsc cannot take over the namespaces Docker
# 28 makes); the root file system shared with dockerd, not a private overlay, so that copying
# files in and out (tasks, Claude Code's settings, archives) sees what the sandbox sees. Not
# --oci-seccomp: this runsc (Debian 12's) then applies Docker's profile to the container's
# first process so that PostgreSQL and Redis cannot start their threads or children and a
# tmux pane cannot take its terminal (docs/security.md); the terminal installs a filter of its
# own instead (images/workspace-base/confine.c).
runsc_args=${SANDBOX_RUNSC_ARGS:---platform=ptrace --network=host --overlay2=none --file-access=shared}
register_runsc() {
	command -v runsc >/dev/null || return 0
	[[ $(id -u) -eq 0 ]] || return 0
	python3 - "$(command -v runsc)" "$runsc_args" <<'PY'
import json, os, sys
path = "/etc/docker/daemon.json"
config = json.load(open(path)) if os.path.exists(path) else {}
wanted = {"path": sys.argv[1], "runtimeArgs": sys.argv[2].split()}
if config.get("runtimes", {}).get("runsc") != wanted:
    config.setdefault("runtimes", {})["runsc"] = wanted
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".new", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(path + ".new", path)
    print("written")
PY
}
registered=$(register_runsc)
if docker info >/dev/null 2>&1; then
	if [[ -n $registered ]] || ! docker info --format '{{json .Runtimes}}' | grep -q '"runsc"'; then
		if [[ $(id -u) -eq 0 ]] && command -v runsc >/dev/null && pidof dockerd >/dev/null; then
			# dockerd reloads its runtimes on SIGHUP: nothing restarts.
			kill -HUP "$(pidof dockerd)"
			sleep 1
			log "runtime runsc registered (/etc/docker/daemon.json, reloaded)"
		fi
	fi
	log "running"
	exit 0
fi
if [[ -n ${DOCKER_HOST:-} && ${DOCKER_HOST} != unix:///var/run/docker.sock ]]; then
	log "DOCKER_HOST=$DOCKER_HOST does not answer; not starting a local daemon for a remote one"
	exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
	log "dockerd is not running and starting it needs root: sudo dockerd &"
	exit 1
fi
mkdir -p "$root/.state"
# Every sandbox has a bridge network of its own. Docker's default pools hold about 30 networks
# (/16s and /20s); a sandbox needs a handful of addresses, so /26s: 1024 networks in one /16.
pool=${SANDBOX_DOCKER_ADDRESS_POOL:-base=10.213.0.0/16,size=26}
# live-restore: containers keep running while dockerd restarts (an upgrade, a crash), so a
# candidate's terminal session and processes survive it.
log "starting dockerd (address pool $pool, live-restore; log: .state/dockerd.log)"
setsid nohup dockerd --default-address-pool "$pool" --live-restore \
	>"$root/.state/dockerd.log" 2>&1 </dev/null &
for _ in $(seq 1 120); do
	if docker info >/dev/null 2>&1; then
		log "running ($(docker version --format '{{.Server.Version}}'))"
		exit 0
	fi
	sleep 0.5
done
log "dockerd did not answer within 60s; last lines of .state/dockerd.log:"
tail -n 20 "$root/.state/dockerd.log" >&2
exit 1
