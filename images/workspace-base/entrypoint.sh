#!/bin/bash
# Workspace entrypoint: make the home usable by coder, then run the command (by default: sleep,
# so the container idles at no CPU cost while terminals attach with docker exec). Claude Code
# is set up by the engine after the container starts (root's managed settings pointing it at
# the engine's AI gateway, and ~/.claude.json so it opens at its prompt): no credential is
# ever mounted here.
set -euo pipefail

home=/home/coder
if [[ $(id -u) -eq 0 ]]; then
	# Started as root (e.g. an operator's docker run): fix mounts owned by root, then drop to coder.
	for dir in "$home" "$home/.claude"; do
		[[ -d $dir && $(stat -c %u "$dir") != 1000 ]] && chown -R 1000:1000 "$dir"
	done
	exec setpriv --reuid=1000 --regid=1000 --init-groups --inh-caps=-all "$0" "$@"
fi
exec "$@"
