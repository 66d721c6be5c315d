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
log "starting dockerd (log: .state/dockerd.log)"
setsid nohup dockerd >"$root/.state/dockerd.log" 2>&1 </dev/null &
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
