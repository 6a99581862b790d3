#!/usr/bin/env bash
# A throwaway MLflow tracking server with an S3 artifact store for the test suite, on 127.0.0.1 only.
#
#   bash .ci/mlflow_server.sh start   # start what is not answering, print the tracking URI (idempotent)
#   bash .ci/mlflow_server.sh uri     # print the URI of the running server
#   bash .ci/mlflow_server.sh s3      # print the S3 endpoint (bucket "editflow", artifacts under artifacts/)
#   bash .ci/mlflow_server.sh stop    # stop both servers and delete their files
#
# moto's standalone S3 server holds bucket "editflow" (in memory); `mlflow server` keeps runs and
# models in $ROOT/server.db and proxies artifacts to s3://editflow/artifacts, so clients talk HTTP to
# the tracking server only and need no S3 credentials (the dummy ones are the server's). Both run in
# their own process groups, on free ports, from $EDITFLOW_MLFLOW_ROOT (default $TMPDIR/editflow-mlflow;
# the tests give a private instance its own). State: $ROOT/{s3.port,s3.pid,port,mlflow.pid}, the pids
# being process-group ids. `start` after the tracking server died (or was killed) brings it back on the
# same port with the same database and bucket.
set -euo pipefail

ROOT="${EDITFLOW_MLFLOW_ROOT:-${TMPDIR:-/tmp}/editflow-mlflow}"
BUCKET=editflow
PY="${PYTHON:-python3}"

log() { echo "mlflow_server.sh: $*" >&2; }

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Answering HTTP (not just a pid: a killed server can linger as a zombie where nothing reaps it).
answers() {
  "$PY" - "$1" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2).read()
except Exception:
    sys.exit(1)
PY
}

s3_url() { echo "http://127.0.0.1:$(cat "$ROOT/s3.port")"; }
uri() { echo "http://127.0.0.1:$(cat "$ROOT/port")"; }
s3_running() { [ -f "$ROOT/s3.port" ] && answers "$(s3_url)/moto-api/"; }
running() { [ -f "$ROOT/port" ] && answers "$(uri)/health"; }

# Start "$@" in a new session (its own process group, pgid = pid) with its output in $ROOT/$name.log.
spawn() {
  local name="$1"
  shift
  setsid "$@" >>"$ROOT/$name.log" 2>&1 </dev/null &
  echo $! >"$ROOT/$name.pid"
}

# Wait until $2 answers (or the process group in $ROOT/$1.pid is gone, or 120 s pass).
wait_for() {
  local name="$1" url="$2" i
  for i in $(seq 240); do
    answers "$url" && return 0
    group_alive "$(cat "$ROOT/$name.pid")" || break
    sleep 0.5
  done
  log "$name did not start:"
  tail -n 40 "$ROOT/$name.log" >&2
  exit 1
}

# Whether process group $1 has a live member (zombies hold no port and are not counted).
group_alive() {
  local f line fields
  for f in /proc/[0-9]*/stat; do
    read -r line <"$f" 2>/dev/null || continue
    read -ra fields <<<"${line##*) }" # state ppid pgrp ...
    [ "${fields[0]}" != Z ] && [ "${fields[2]}" = "$1" ] && return 0
  done
  return 1
}

# TERM the process group named in $ROOT/$1.pid, KILL it after 10 s.
kill_group() {
  local pidfile="$ROOT/$1.pid" pgid i
  [ -f "$pidfile" ] || return 0
  pgid="$(cat "$pidfile")"
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for i in $(seq 40); do
    group_alive "$pgid" || break
    sleep 0.25
  done
  kill -KILL -- "-$pgid" 2>/dev/null || true
  rm -f "$pidfile"
}

start_s3() {
  s3_running && return
  kill_group s3
  [ -f "$ROOT/s3.port" ] || free_port >"$ROOT/s3.port"
  spawn s3 moto_server -H 127.0.0.1 -p "$(cat "$ROOT/s3.port")"
  wait_for s3 "$(s3_url)/moto-api/"
  AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "$PY" - "$(s3_url)" "$BUCKET" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
if sys.argv[2] not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
    s3.create_bucket(Bucket=sys.argv[2])
PY
}

start_mlflow() {
  running && return
  kill_group mlflow
  [ -f "$ROOT/port" ] || free_port >"$ROOT/port"
  # Only the server gets S3 credentials; one worker (CI machines are small); no job runner.
  (
    cd "$ROOT"
    export MLFLOW_S3_ENDPOINT_URL="$(s3_url)" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
      AWS_DEFAULT_REGION=us-east-1 MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
    spawn mlflow mlflow server --host 127.0.0.1 --port "$(cat "$ROOT/port")" --workers 1 \
      --backend-store-uri "sqlite:///$ROOT/server.db" --artifacts-destination "s3://$BUCKET/artifacts"
  )
  wait_for mlflow "$(uri)/health"
}

start() {
  mkdir -p "$ROOT"
  start_s3
  start_mlflow
  uri
}

stop() {
  [ -d "$ROOT" ] || return 0
  kill_group mlflow
  kill_group s3
  rm -rf "$ROOT"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  uri) running && uri || { log "not running (run: bash .ci/mlflow_server.sh start)"; exit 1; } ;;
  s3) s3_running && s3_url || { log "not running (run: bash .ci/mlflow_server.sh start)"; exit 1; } ;;
  *) echo "usage: $0 start|stop|uri|s3" >&2; exit 2 ;;
esac
