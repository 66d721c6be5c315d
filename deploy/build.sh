#!/usr/bin/env bash
# Builds the production images from this checkout, with nothing pulled from a registry:
#   sandbox-engine:<tag>   the API, reaper and Pulumi toolchain (deploy/Dockerfile)
#   sandbox-traefik:<tag>  Traefik from the toolchain (deploy/traefik/Dockerfile)
# The tag is $SANDBOX_IMAGE_TAG (default: local). Needs `make setup` done (toolchain, base image).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[deploy] %s\n' "$*" >&2; }

tag=${SANDBOX_IMAGE_TAG:-local}
stage=deploy/.build
for exe in pulumi pulumi-language-python pulumi-language-python-exec \
	pulumi-resource-pulumi-python traefik; do
	[[ -x .toolchain/bin/$exe ]] || { log ".toolchain/bin/$exe is missing: run make setup"; exit 1; }
done
# What the images are made of; an image already built from exactly this is kept.
inputs=$({
	find engine api stacks templates -type f -not -path '*/__pycache__/*' | sort | xargs sha256sum
	sha256sum Pulumi.yaml pyproject.toml deploy/Dockerfile deploy/traefik/Dockerfile .dockerignore
	readlink -f .toolchain/bin/*
	docker image inspect -f '{{.Id}}' sandbox-base:bookworm
} | sha256sum | cut -c1-16)
label=io.sandbox-engine.build-hash
current() { docker image inspect -f "{{index .Config.Labels \"$label\"}}" "$1" 2>/dev/null || true; }
if [[ $(current "sandbox-engine:$tag") == "$inputs" && $(current "sandbox-traefik:$tag") == "$inputs" ]]; then
	log "sandbox-engine:$tag and sandbox-traefik:$tag are up to date"
	exit 0
fi
start=$SECONDS
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/wheels/deps" "$stage/wheels/app"
cp -L .toolchain/bin/* "$stage/bin/"
# The dependencies' wheels are kept per pyproject.toml (building them takes most of a minute);
# the engine's own wheel apart, so the dependencies' image layer stays cached between builds.
deps=${SANDBOX_CACHE_DIR:-$HOME/.cache/sandbox-engine}/wheels/$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -d $deps ]]; then
	log "wheels of the engine's dependencies"
	.venv/bin/pip wheel --quiet --disable-pip-version-check --wheel-dir "$deps.tmp" .
	rm -f "$deps".tmp/sandbox_engine-*.whl
	mv "$deps.tmp" "$deps"
fi
cp "$deps"/*.whl "$stage/wheels/deps/"
log "the engine's wheel"
.venv/bin/pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$stage/wheels/app" .
export DOCKER_BUILDKIT=0 # this dockerd has no BuildKit builder; the classic one is enough
build() { # image, dockerfile, context: the build's output goes to a log, shown on failure
	local out="$stage/build-${1%%:*}.log"
	log "building $1"
	docker build --label "$label=$inputs" -f "$2" -t "$1" "$3" >"$out" 2>&1 ||
		{ tail -n 30 "$out" >&2; exit 1; }
}
build "sandbox-engine:$tag" deploy/Dockerfile .
build "sandbox-traefik:$tag" deploy/traefik/Dockerfile "$stage"
log "built in $((SECONDS - start))s: sandbox-engine:$tag, sandbox-traefik:$tag"
