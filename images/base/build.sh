#!/usr/bin/env bash
# The offline base image: a Debian bookworm root filesystem made by debootstrap and imported into
# Docker as sandbox-base:bookworm. Every other image starts FROM it. Reused when present; the
# root filesystem tarball is cached outside the work tree so a rebuild is an import, not a download.
set -euo pipefail

image=${SANDBOX_BASE_IMAGE:-sandbox-base:bookworm}
suite=bookworm
# The Debian mirror this host's apt already uses (DEBIAN_MIRROR overrides it).
host_mirror() {
	local uri
	uri=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
		grep -v security | head -n 1)
	[[ -n $uri ]] || uri=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' \
		/etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null)
	echo "${uri%/}"
}
mirror=${DEBIAN_MIRROR:-$(host_mirror)}
cache_root=${SANDBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sandbox-engine}
tarball="$cache_root/rootfs/debian-$suite-minbase.tar"
log() { printf '[base-image] %s\n' "$*" >&2; }

if docker image inspect "$image" >/dev/null 2>&1; then
	log "$image: present"
	exit 0
fi

if [[ ! -s $tarball ]]; then
	command -v debootstrap >/dev/null || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
	[[ -n $mirror ]] || { log "no Debian mirror in this host's apt sources: set DEBIAN_MIRROR"; exit 1; }
	[[ $(id -u) -eq 0 ]] || { log "debootstrap needs root"; exit 1; }
	mkdir -p "$(dirname "$tarball")"
	work=$(mktemp -d "$cache_root/rootfs/debootstrap.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	log "debootstrap $suite (minbase) from $mirror"
	start=$SECONDS
	debootstrap --variant=minbase --include=ca-certificates "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 ||
		{ tail -n 20 "$work/log" >&2; exit 1; }
	# Keep the image small and reproducible-ish: no apt lists, no caches, no logs.
	rm -rf "$work"/root/var/lib/apt/lists/* "$work"/root/var/cache/apt/*.bin "$work"/root/var/log/*
	tar -C "$work/root" --numeric-owner -cf "$tarball.tmp" .
	mv "$tarball.tmp" "$tarball"
	log "root filesystem ready in $((SECONDS - start))s"
fi

log "importing $image"
docker import \
	--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
	--change 'ENV LANG=C.UTF-8' \
	--change 'CMD ["/bin/bash"]' \
	--message "debootstrap --variant=minbase $suite" \
	"$tarball" "$image" >/dev/null
log "$image: $(docker image inspect --format '{{.Size}}' "$image" | numfmt --to=iec) imported"
