#!/usr/bin/env bash
# Installs the Debian packages the engine needs on this host (docker-compose: for the
# production deploy and its smoke test), only when something is missing.
set -euo pipefail

log() { printf '[packages] %s\n' "$*" >&2; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v iptables >/dev/null || missing+=(iptables)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v chromium >/dev/null || missing+=(chromium) # the UI's end-to-end test
command -v runsc >/dev/null || missing+=(runsc)       # gVisor, a template's runtime: runsc

if ((${#missing[@]} == 0)); then
	log "all present"
	exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
	log "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
	exit 1
fi
log "installing ${missing[*]}"
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
log "installed in $((SECONDS - start))s"
