#!/usr/bin/env bash
# A Docker Swarm of N nodes on this one machine, for the swarm backend's tests and for trying
# it: each node is a dockerd of its own in a network namespace of its own (its own hostname,
# data-root, exec-root, socket, containerd and cgroup parent), the namespaces joined by a bridge
# on the host. Node 1 is the manager, the others workers. Each node's Docker API listens on
# TCP with mutual TLS (deploy/swarm/certs.sh) — the engine's only way in — and on a Unix socket
# for root on this machine.
#
#   deploy/swarm/lab.sh up [N]    # (make swarm-lab) builds and joins N nodes (3), loads images
#   deploy/swarm/lab.sh down      # (make swarm-lab-down) stops and removes all of it
#   deploy/swarm/lab.sh status    # the nodes as the manager sees them
#   deploy/swarm/lab.sh kill K    # node K's dockerd killed (a node lost); `start K` brings it back
#
# `up` writes .state/swarm-lab/env: the settings `SANDBOX_BACKEND=swarm` needs (sourced by
# `make run` and the swarm tests). Nothing of the lab is left after `down`: no process,
# namespace, interface, mount, firewall rule, cgroup or file.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
state=$root/.state/swarm-lab
run=/run/sandbox-lab
data=/var/lib/sandbox-lab
bridge=swlab0
subnet_prefix=10.214.0
overlay_pool=10.215.0.0/16
# The images sandboxes of the lab use: loaded into every node that lacks them (see docs/cluster.md).
images=${SANDBOX_LAB_IMAGES:-workspace-base:latest workspace-python:latest service-postgres:latest}
log() { printf '[swarm-lab] %s\n' "$*" >&2; }

node_addr() { echo "$subnet_prefix.$((10 + $1))"; }
node_sock() { echo "unix://$run/n$1/docker.sock"; }
ndocker() { local k=$1; shift; docker -H "$(node_sock "$k")" "$@"; }
count() { cat "$state/nodes" 2>/dev/null || echo 0; }
# The swarm's edge: Traefik on the manager, reading the swarm through its swarm provider; the
# engine connects it to each published sandbox's overlay (docs/cluster.md).
edge_name=sandbox-swarm-edge
edge_port=8089

need_root() {
	[[ $(id -u) -eq 0 ]] || { log "needs root (network namespaces, a dockerd per node)"; exit 1; }
}

start_node() {
	local k=$1 addr ns=sbxlab-n$1
	addr=$(node_addr "$k")
	mkdir -p "$run/n$k" "$data/n$k"
	# `ip netns exec` remounts /sys, hiding the cgroup hierarchies: mount them again inside;
	# `unshare --uts`: a hostname of its own (Swarm names nodes by it).
	# DOCKER_SERVICE_PREFER_OFFLINE_IMAGE: a task uses the node's own copy of its image, loaded
	# by the engine, without asking a registry first (there is none here).
	ip netns exec "$ns" unshare --uts -- env DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 \
		bash -c '
			set -e
			hostname "$1"
			mount -t tmpfs cgroup /sys/fs/cgroup
			for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
				mkdir -p /sys/fs/cgroup/$c; mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
			done
			mkdir -p /sys/fs/cgroup/systemd
			mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
			shift
			exec setsid dockerd "$@"
		' _ "lab-n$k" \
		--data-root "$data/n$k/docker" --exec-root "$run/n$k/exec" --pidfile "$run/n$k/dockerd.pid" \
		-H "$(node_sock "$k")" -H "tcp://$addr:2376" --tlsverify \
		--tlscacert "$state/certs/n$k/ca.pem" --tlscert "$state/certs/n$k/cert.pem" \
		--tlskey "$state/certs/n$k/key.pem" \
		--cgroup-parent "sandbox-lab-n$k" --default-address-pool base=10.216.0.0/16,size=26 \
		>"$state/n$k.log" 2>&1 </dev/null &
	for _ in $(seq 1 120); do
		ndocker "$k" info >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	log "node $k: dockerd did not answer within 60 s; last lines of $state/n$k.log:"
	tail -n 20 "$state/n$k.log" >&2
	return 1
}

firewall_node() {
	# The node firewall (engine/host/node_firewall.py) in the node's namespace: its sandboxes
	# reach the engine's AI gateway on this host, and not this host's other addresses.
	local k=$1 blocks=()
	for a in $(hostname -I); do
		[[ $a == *:* || $a == "$subnet_prefix.1" ]] || blocks+=(--block "$a")
	done
	ip netns exec "sbxlab-n$k" "$root/.venv/bin/sandbox-engine" firewall node \
		--engine-address "$subnet_prefix.1" "${blocks[@]}" >/dev/null
}

stop_node() {
	local k=$1 pid
	pid=$(cat "$run/n$k/dockerd.pid" 2>/dev/null || true)
	[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
	kill "${2:--TERM}" "$pid" 2>/dev/null || true
	for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
	kill -KILL "$pid" 2>/dev/null || true
}

load_images() {
	# One `docker save` of every image some node lacks (shared layers once), streamed into
	# each node that lacks one at the same time.
	local n=$1 k id wanted=() targets=()
	for image in $images; do
		id=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null) || {
			log "image $image is not on this host (make images)"
			return 1
		}
		for k in $(seq 1 "$n"); do
			if [[ $(ndocker "$k" image inspect --format '{{.Id}}' "$image" 2>/dev/null) != "$id" ]]; then
				[[ " ${wanted[*]} " == *" $image "* ]] || wanted+=("$image")
				[[ " ${targets[*]} " == *" $k "* ]] || targets+=("$k")
			fi
		done
	done
	[[ ${#wanted[@]} -eq 0 ]] && return 0
	log "loading ${wanted[*]} into node(s) ${targets[*]}"
	local t0=$SECONDS pipes=() cmd
	for k in "${targets[@]}"; do pipes+=(">(docker -H $(node_sock "$k") load -q >/dev/null)"); done
	cmd="docker save ${wanted[*]} | tee ${pipes[*]} >/dev/null"
	eval "$cmd"
	# tee returns before the loads end: wait until every node has every image.
	for _ in $(seq 1 600); do
		local done=1
		for k in "${targets[@]}"; do
			for image in "${wanted[@]}"; do
				ndocker "$k" image inspect "$image" >/dev/null 2>&1 || done=0
			done
		done
		[[ $done -eq 1 ]] && break
		sleep 0.5
	done
	log "images loaded in $((SECONDS - t0)) s"
}

# Traefik on the manager node: the toolchain's binary (a static Go program) in an image the
# node has, the node's own Docker socket for its swarm provider (it lists services and tasks
# there); its entrypoint published on the node's address. A real cluster runs the project's
# Traefik image (deploy/traefik) the same way (docs/cluster.md).
start_edge() {
	local exe
	exe=$(readlink -f "$root/.toolchain/bin/traefik" 2>/dev/null || true)
	[[ -n $exe && -x $exe ]] || { log "traefik is missing in .toolchain/bin (make toolchain)"; exit 1; }
	ndocker 1 run -d --name "$edge_name" --restart unless-stopped --user 0:0 \
		--label io.sandbox-engine.role=edge \
		-v "$exe:/usr/local/bin/traefik:ro" -v "$run/n1/docker.sock:/var/run/docker.sock" \
		-p "$(node_addr 1):$edge_port:8000" --entrypoint /usr/local/bin/traefik \
		workspace-base:latest \
		--entrypoints.web.address=:8000 --entrypoints.traefik.address=127.0.0.1:8082 --ping=true \
		--providers.swarm.endpoint=unix:///var/run/docker.sock \
		--providers.swarm.exposedbydefault=false --providers.swarm.refreshseconds=2 \
		--global.checknewversion=false --global.sendanonymoususage=false \
		--log.level=INFO --log.nocolor=true >/dev/null
	log "edge (traefik) on $(node_addr 1):$edge_port"
}

up() {
	need_root
	local n=${1:-3}
	if [[ $(count) -gt 0 ]]; then
		log "a lab of $(count) nodes is already up (deploy/swarm/lab.sh down first)"
		status
		return 0
	fi
	command -v dockerd >/dev/null || { log "dockerd is missing (make services)"; exit 1; }
	if ip link show "$bridge" >/dev/null 2>&1 || [[ -d $run ]]; then
		# One lab per machine: what another checkout (or a killed run) left goes first.
		log "removing a lab left on this machine"
		down
	fi
	mkdir -p "$state" "$run"
	echo "$n" >"$state/nodes"
	local t0=$SECONDS
	bash "$root/deploy/swarm/certs.sh" "$state/certs" engine
	ip link add "$bridge" type bridge
	ip addr add "$subnet_prefix.1/24" dev "$bridge"
	ip link set "$bridge" up
	# Docker's FORWARD policy is DROP, and bridged frames pass it (br_netfilter): the nodes'
	# own traffic between each other (Swarm's control, gossip and VXLAN) is let through.
	iptables -I FORWARD -i "$bridge" -o "$bridge" -j ACCEPT
	for k in $(seq 1 "$n"); do
		ip netns add "sbxlab-n$k"
		ip link add "swlab-n$k" type veth peer name eth0 netns "sbxlab-n$k"
		ip link set "swlab-n$k" master "$bridge" up
		ip -n "sbxlab-n$k" addr add "$(node_addr "$k")/24" dev eth0
		ip -n "sbxlab-n$k" link set eth0 up
		ip -n "sbxlab-n$k" link set lo up
		ip -n "sbxlab-n$k" route add default via "$subnet_prefix.1"
		bash "$root/deploy/swarm/certs.sh" "$state/certs" node "n$k" "$(node_addr "$k")"
	done
	for k in $(seq 1 "$n"); do start_node "$k" & done
	wait
	for k in $(seq 1 "$n"); do ndocker "$k" info >/dev/null || exit 1; done
	ndocker 1 swarm init --advertise-addr "$(node_addr 1)" --listen-addr "$(node_addr 1):2377" \
		--default-addr-pool "$overlay_pool" --default-addr-pool-mask-length 26 >/dev/null
	local token
	token=$(ndocker 1 swarm join-token -q worker)
	for k in $(seq 2 "$n"); do
		ndocker "$k" swarm join --token "$token" --advertise-addr "$(node_addr "$k")" \
			--listen-addr "$(node_addr "$k"):2377" "$(node_addr 1):2377" >/dev/null
	done
	log "swarm of $n nodes joined in $((SECONDS - t0)) s"
	for k in $(seq 1 "$n"); do firewall_node "$k"; done
	load_images "$n"
	start_edge
	cat >"$state/env" <<EOF
SANDBOX_BACKEND=swarm
SANDBOX_SWARM_MANAGER=tcp://$(node_addr 1):2376
SANDBOX_SWARM_TLS=$state/certs/engine
SANDBOX_SWARM_EDGE=$edge_name
SANDBOX_SWARM_EDGE_URL=http://$(node_addr 1):$edge_port
SANDBOX_GATEWAY_PEERS=$subnet_prefix.0/24
EOF
	# This host's firewall answers the nodes on the AI gateway's ports (their sandboxes reach
	# it through them); `make services` keeps that while the env file is there.
	SANDBOX_GATEWAY_PEERS=$subnet_prefix.0/24 "$root/.venv/bin/sandbox-engine" firewall apply >/dev/null
	log "up in $((SECONDS - t0)) s; settings in $state/env"
	status
}

down() {
	need_root
	local n k
	n=$(count)
	[[ $n -eq 0 ]] && n=$(ls -d "$run"/n* 2>/dev/null | wc -l)
	for k in $(seq 1 "$n"); do stop_node "$k" & done
	wait
	# Whatever a killed dockerd left running (its containerd, shims) is in the namespace.
	for k in $(seq 1 "$n"); do
		local pids
		pids=$(ip netns pids "sbxlab-n$k" 2>/dev/null || true)
		[[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
	done
	sleep 0.5
	for k in $(seq 1 "$n"); do
		ip netns del "sbxlab-n$k" 2>/dev/null || true
		ip link del "swlab-n$k" 2>/dev/null || true
		for hierarchy in /sys/fs/cgroup/*/; do
			[[ -d $hierarchy/sandbox-lab-n$k ]] || continue
			find "$hierarchy/sandbox-lab-n$k" -depth -type d -exec rmdir {} + 2>/dev/null || true
		done
	done
	ip link del "$bridge" 2>/dev/null || true
	while iptables -D FORWARD -i "$bridge" -o "$bridge" -j ACCEPT 2>/dev/null; do :; done
	rm -rf "$data" "$run" "$state"
	# This host's firewall without the nodes.
	if [[ -x $root/.venv/bin/sandbox-engine ]]; then
		env -u SANDBOX_GATEWAY_PEERS "$root/.venv/bin/sandbox-engine" firewall apply >/dev/null || true
	fi
	log "down: nothing of the lab is left"
}

status() {
	local n
	n=$(count)
	[[ $n -gt 0 ]] || { log "no lab is up (make swarm-lab)"; return 1; }
	ndocker 1 node ls --format '{{.Hostname}} {{.Status}} {{.Availability}} {{.ManagerStatus}}'
}

case ${1:-} in
up) up "${2:-3}" ;;
down) down ;;
status) status ;;
kill) need_root; stop_node "${2:?kill K}" -KILL ;;
start) need_root; start_node "${2:?start K}" && firewall_node "$2" ;;
images) load_images "$(count)" ;;
*)
	echo "usage: deploy/swarm/lab.sh up [N] | down | status | kill K | start K | images" >&2
	exit 2
	;;
esac
