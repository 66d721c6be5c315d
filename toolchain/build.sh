#!/usr/bin/env bash
# Builds the Pulumi CLI, the Python language host and Traefik from the Go module proxy,
# caches them outside the work tree keyed by version, and links them into .toolchain/bin.
#
#   toolchain/build.sh            build what is missing, then link
#   toolchain/build.sh --print    print the cache directory and exit
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
# shellcheck source=versions.env
. "$here/versions.env"

cache_root=${SANDBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sandbox-engine}
# The key covers the versions and every file that decides what gets built.
key=$(cat "$here/versions.env" "$here/build.sh" "$here"/*/go.mod "$here"/*/go.sum | sha256sum | cut -c1-12)
cache="$cache_root/toolchain/pulumi-v$PULUMI_VERSION-traefik-v$TRAEFIK_VERSION-$key"

if [[ ${1:-} == --print ]]; then
	echo "$cache"
	exit 0
fi

log() { printf '[toolchain] %s\n' "$*" >&2; }

build() { # build <module-dir> <output-name> <package> <ldflags>
	local dir=$1 out=$2 pkg=$3 ldflags=$4
	if [[ -x "$cache/bin/$out" ]]; then
		log "$out: cached"
		return
	fi
	log "$out: building $pkg (first time on this machine: several minutes)"
	local start=$SECONDS
	(cd "$here/$dir" && GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w $ldflags" \
		-o "$cache/bin/$out.tmp" "$pkg")
	mv "$cache/bin/$out.tmp" "$cache/bin/$out"
	log "$out: built in $((SECONDS - start))s"
}

command -v go >/dev/null || { log "go is not installed: install Go >= 1.26 (Debian: golang-go is too old)"; exit 1; }
mkdir -p "$cache/bin"

sdk_stamp=github.com/pulumi/pulumi/sdk/v3/go/common/version.Version
build pulumi pulumi github.com/pulumi/pulumi/pkg/v3/cmd/pulumi "-X $sdk_stamp=v$PULUMI_VERSION"
build langhost pulumi-language-python \
	github.com/pulumi/pulumi/sdk/v3/python/cmd/pulumi-language-python "-X $sdk_stamp=v$LANGHOST_SDK_VERSION"
build traefik traefik github.com/traefik/traefik/v3/cmd/traefik \
	"-X github.com/traefik/traefik/v3/pkg/version.Version=v$TRAEFIK_VERSION"

# The two scripts that ship beside the language host come from the sdk/v3 module of the
# pinned release. Module cache files are read-only and lose their exec bits: install with 755.
if [[ ! -x "$cache/bin/pulumi-language-python-exec" || ! -x "$cache/bin/pulumi-resource-pulumi-python" ]]; then
	sdk_dir=$(cd "$here/pulumi" && go list -m -f '{{.Dir}}' github.com/pulumi/pulumi/sdk/v3)
	if [[ -z $sdk_dir || ! -d $sdk_dir ]]; then
		(cd "$here/pulumi" && go mod download github.com/pulumi/pulumi/sdk/v3)
		sdk_dir=$(cd "$here/pulumi" && go list -m -f '{{.Dir}}' github.com/pulumi/pulumi/sdk/v3)
	fi
	install -m 755 "$sdk_dir/python/cmd/pulumi-language-python-exec" "$cache/bin/"
	install -m 755 "$sdk_dir/python/dist/pulumi-resource-pulumi-python" "$cache/bin/"
	log "language host scripts installed from sdk/v$PULUMI_VERSION"
fi

# A stable path for PATH: .toolchain/bin holds links into the cache.
mkdir -p "$root/.toolchain/bin"
for f in "$cache"/bin/*; do
	[[ $f == *.tmp ]] && continue
	ln -sfn "$f" "$root/.toolchain/bin/$(basename "$f")"
done
log "ready: $("$root/.toolchain/bin/pulumi" version), traefik v$TRAEFIK_VERSION, in $cache"
