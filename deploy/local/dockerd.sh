#!/usr/bin/env bash
# Starts dockerd when its socket does not answer, then waits until it does.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
log() { printf '[dockerd] %s\n' "$*" >&2; }

if docker info >/dev/null 2>&1; then
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
