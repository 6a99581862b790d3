#!/usr/bin/env bash
# A throwaway PostgreSQL for the test suite, on 127.0.0.1 only.
#
#   bash .ci/postgres.sh start   # install if missing, start, print the URI (idempotent)
#   bash .ci/postgres.sh uri     # print the URI of the running server
#   bash .ci/postgres.sh stop    # stop it and delete its files
#
# It is a private cluster (initdb) in $EDITFLOW_PG_ROOT on a free port, so it works as root without
# systemd and beside any other cluster (Debian's 15/main is left alone). Run as root, the server runs
# as the postgres user. Role editflow (password editflow, CREATEDB) owns database editflow_test.
set -euo pipefail

ROOT="${EDITFLOW_PG_ROOT:-${TMPDIR:-/tmp}/editflow-postgres}"
DATA="$ROOT/data"

log() { echo "postgres.sh: $*" >&2; }

# Run a command as the server's owner: postgres when we are root, else ourselves.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return
  log "installing postgresql"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql >/dev/null
  # The package may start its own 15/main cluster: we don't use it, so don't leave it running.
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header | while read -r ver name port status _; do
      [ "$status" = online ] && $sudo pg_ctlcluster "$ver" "$name" stop || true
    done
  fi
}

bindir() { dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)"; }

uri() { echo "postgresql://editflow:editflow@127.0.0.1:$(cat "$ROOT/port")/editflow_test"; }

# Accepting connections (not just a pid: a killed server can linger as a zombie where nothing reaps it).
running() { [ -f "$ROOT/port" ] && "$(bindir)/pg_isready" -q -h 127.0.0.1 -p "$(cat "$ROOT/port")"; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  install
  if running; then uri; return; fi
  local bin port pw="$ROOT/.pw"
  bin="$(bindir)"
  stop # whatever is left of an earlier server: its data is throwaway
  mkdir -p "$ROOT"
  [ "$(id -u)" -ne 0 ] || chown postgres: "$ROOT"
  echo postgres | as_owner tee "$pw" >/dev/null
  as_owner "$bin/initdb" -D "$DATA" -U postgres --pwfile="$pw" --auth-local=trust \
    --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$ROOT/initdb.log" 2>&1 ||
    { cat "$ROOT/initdb.log" >&2; exit 1; }
  rm -f "$pw"
  port="$(free_port)"
  echo "$port" | as_owner tee "$ROOT/port" >/dev/null
  # Throwaway data: no durability needed. Sockets only in $ROOT and TCP only on 127.0.0.1.
  as_owner "$bin/pg_ctl" -D "$DATA" -l "$ROOT/server.log" -w -t 60 start -o \
    "-c listen_addresses=127.0.0.1 -p $port -k $ROOT -c max_connections=200 -c unix_socket_permissions=0700 \
     -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >/dev/null ||
    { cat "$ROOT/server.log" >&2; exit 1; }
  as_owner "$bin/psql" -q -h "$ROOT" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
CREATE ROLE editflow LOGIN PASSWORD 'editflow' CREATEDB;
CREATE DATABASE editflow_test OWNER editflow;
SQL
  uri
}

stop() {
  [ -d "$DATA" ] || return 0
  if running; then
    as_owner "$(bindir)/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >/dev/null ||
      kill -KILL "$(head -n 1 "$DATA/postmaster.pid")"
  fi
  rm -rf "$DATA" "$ROOT"/.s.PGSQL.* "$ROOT/port" "$ROOT/server.log" "$ROOT/initdb.log"
  rmdir "$ROOT" 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  uri) running && uri || { log "not running (run: bash .ci/postgres.sh start)"; exit 1; } ;;
  *) echo "usage: $0 start|stop|uri" >&2; exit 2 ;;
esac
