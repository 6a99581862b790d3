#!/usr/bin/env bash
# A throwaway MySQL-compatible server (Debian's MariaDB) for the test suite, on 127.0.0.1 only.
#
#   bash .ci/mysql.sh start   # install if missing, start, print the URI (idempotent)
#   bash .ci/mysql.sh uri     # print the URI of the running server
#   bash .ci/mysql.sh stop    # stop it and delete its files
#
# A private data directory in $EDITFLOW_MYSQL_ROOT on a free port (no systemd, beside any other
# server). Run as root, the server runs as the mysql user. User editflow (password editflow) may
# create databases; it owns database editflow_test.
set -euo pipefail

ROOT="${EDITFLOW_MYSQL_ROOT:-${TMPDIR:-/tmp}/editflow-mysql}"
DATA="$ROOT/data"
SOCK="$ROOT/mysqld.sock"

log() { echo "mysql.sh: $*" >&2; }

install() {
  command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null && return
  log "installing mariadb-server"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q >/dev/null
  # The package's own service is not wanted (and cannot start without an init system).
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q mariadb-server >/dev/null
  $sudo service mariadb stop >/dev/null 2>&1 || true
}

uri() { echo "mysql://editflow:editflow@127.0.0.1:$(cat "$ROOT/port")/editflow_test"; }

running() { [ -f "$ROOT/port" ] && mariadb-admin --socket="$SOCK" -u root ping >/dev/null 2>&1; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  install
  if running; then uri; return; fi
  stop # whatever is left of an earlier server: its data is throwaway
  mkdir -p "$DATA"
  local user=() port
  if [ "$(id -u)" -eq 0 ]; then user=(--user=mysql); chown -R mysql: "$ROOT"; fi
  mariadb-install-db "${user[@]}" --datadir="$DATA" --auth-root-authentication-method=socket \
    --skip-test-db >"$ROOT/install.log" 2>&1 || { cat "$ROOT/install.log" >&2; exit 1; }
  port="$(free_port)"
  echo "$port" >"$ROOT/port"
  # Throwaway data: no durability needed.
  mariadbd "${user[@]}" --datadir="$DATA" --socket="$SOCK" --pid-file="$ROOT/mysqld.pid" --port="$port" \
    --bind-address=127.0.0.1 --skip-name-resolve --innodb-flush-log-at-trx-commit=0 --skip-log-bin \
    --max-connections=200 --character-set-server=utf8mb4 --collation-server=utf8mb4_bin \
    >"$ROOT/server.log" 2>&1 &
  for _ in $(seq 1 120); do running && break; sleep 0.5; done
  running || { cat "$ROOT/server.log" >&2; exit 1; }
  mariadb --socket="$SOCK" -u root <<'SQL'
CREATE USER 'editflow'@'127.0.0.1' IDENTIFIED BY 'editflow';
GRANT ALL PRIVILEGES ON *.* TO 'editflow'@'127.0.0.1';
CREATE DATABASE editflow_test;
SQL
  uri
}

stop() {
  [ -d "$ROOT" ] || return 0
  if running; then
    mariadb-admin --socket="$SOCK" -u root shutdown >/dev/null 2>&1 || true
  fi
  if [ -f "$ROOT/mysqld.pid" ]; then kill -KILL "$(cat "$ROOT/mysqld.pid")" 2>/dev/null || true; fi
  rm -rf "$ROOT"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  uri) running && uri || { log "not running (run: bash .ci/mysql.sh start)"; exit 1; } ;;
  *) echo "usage: $0 start|stop|uri" >&2; exit 2 ;;
esac
