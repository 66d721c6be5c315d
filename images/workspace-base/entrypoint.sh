#!/bin/bash
# Workspace entrypoint: make the home and the Claude credentials usable by coder, skip Claude
# Code's onboarding when a saved config exists, then run the command (by default: sleep, so the
# container idles at no CPU cost while terminals attach with docker exec).
set -euo pipefail

home=/home/coder
if [[ $(id -u) -eq 0 ]]; then
	# Started as root (e.g. an operator's docker run): fix mounts owned by root, then drop to coder.
	for dir in "$home" "$home/.claude"; do
		[[ -d $dir && $(stat -c %u "$dir") != 1000 ]] && chown -R 1000:1000 "$dir"
	done
	exec setpriv --reuid=1000 --regid=1000 --init-groups --inh-caps=-all "$0" "$@"
fi

# Claude Code keeps its settings in ~/.claude.json, outside the claude-auth volume mounted at
# ~/.claude; a copy saved in the volume as config.json restores it (onboarding done, theme...).
if [[ -s $home/.claude/config.json ]]; then
	cp "$home/.claude/config.json" "$home/.claude.json"
fi
exec "$@"
