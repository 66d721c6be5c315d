#!/usr/bin/env bash
# Builds the browser UI into web/dist when its sources or lockfile changed: `npm ci` (packages
# from the npm registry, exactly as package-lock.json says), then tsc and vite.
set -euo pipefail
cd "$(dirname "$0")/../../web"
log() { printf '[web] %s\n' "$*" >&2; }

command -v npm >/dev/null || { log "npm is missing: install Node.js 20 or newer"; exit 1; }
stamp=dist/.source-hash
hash=$(cat package.json package-lock.json index.html vite.config.ts tsconfig.json \
	$(find src -type f | sort) | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$hash" && -d node_modules ]]; then
	log "up to date"
	exit 0
fi
start=$SECONDS
if [[ ! -d node_modules || package-lock.json -nt node_modules/.package-lock.json ]]; then
	log "npm ci"
	npm ci --no-audit --no-fund --loglevel=error >&2
fi
log "building"
npm run --silent build >&2
echo "$hash" >"$stamp"
log "built web/dist in $((SECONDS - start))s"
