#!/usr/bin/env bash
# A project-local PostgreSQL cluster: data in .state/postgres, its own port, a known role and
# database. Idempotent: creates the cluster once, starts it when stopped.
#
#   deploy/local/postgres.sh          ensure it is running
#   deploy/local/postgres.sh stop     stop it
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
port=${SANDBOX_PG_PORT:-55432}
data="$root/.state/postgres"
log() { printf '[postgres] %s\n' "$*" >&2; }

bindir=$(dirname "$(compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n 1)")
[[ -x $bindir/initdb ]] || { log "PostgreSQL server is not installed (apt-get install postgresql)"; exit 1; }

# The server refuses to run as root: it runs as the postgres user when we are root.
as_pg() {
	if [[ $(id -u) -eq 0 ]]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

if [[ ${1:-} == stop ]]; then
	if [[ -f $data/postmaster.pid ]]; then
		as_pg "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null && log "stopped"
	else
		log "not running"
	fi
	exit 0
fi

if [[ ! -f $data/PG_VERSION ]]; then
	log "creating cluster in .state/postgres"
	mkdir -p "$data"
	if [[ $(id -u) -eq 0 ]]; then
		chown postgres: "$data" && chmod 700 "$data"
		# A clone under a private folder (mktemp -d is 0700) is closed to the postgres user:
		# open each ancestor for traversal only (o+x, no listing).
		dir=$(dirname "$data")
		while [[ $dir != / ]]; do
			runuser -u postgres -- test -x "$dir" || { chmod o+x "$dir"; log "opened $dir for traversal"; }
			dir=$(dirname "$dir")
		done
	fi
	as_pg "$bindir/initdb" -D "$data" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
		-E UTF8 --locale=C.UTF-8 >/dev/null
	cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$data'
max_connections = 200
fsync = on
CONF
fi

if ! as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
		log "port $port is taken by another server; set SANDBOX_PG_PORT to a free port"
		exit 1
	fi
	log "starting on 127.0.0.1:$port"
	as_pg "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start >/dev/null
fi

psql_pg() { as_pg "$bindir/psql" -h "$data" -p "$port" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [[ $(psql_pg -c "select 1 from pg_roles where rolname = 'sandbox'") != 1 ]]; then
	# CREATEDB lets the tests make throwaway databases beside the real one.
	psql_pg -c "create role sandbox login createdb password 'sandbox'"
	psql_pg -c "create database sandbox owner sandbox"
	log "created role and database 'sandbox'"
fi
if [[ $(psql_pg -c "select rolcreatedb from pg_roles where rolname = 'sandbox'") != t ]]; then
	psql_pg -c "alter role sandbox createdb"  # clusters made before the tests needed it
fi
log "running: postgresql://sandbox@127.0.0.1:$port/sandbox"
