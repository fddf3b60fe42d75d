#!/usr/bin/env bash
# One MLflow tracking server for every job of a cluster run: many writers on a real database
# (MariaDB/MySQL or PostgreSQL) instead of one SQLite file on a network filesystem.
#
#   bash slurm/mlflow-server.sh start    # start (idempotent); prints the MLFLOW_TRACKING_URI to export
#   bash slurm/mlflow-server.sh stop     # stop it (the database and the artifacts stay)
#   bash slurm/mlflow-server.sh status   # exit 0 only when it answers
#
# Environment:
#   TSKD_MLFLOW_DB_URI      the backend store, e.g. mysql+pymysql://user:pw@dbhost/mlflow or
#                           postgresql://user:pw@dbhost/mlflow. Unset: a database in the MariaDB of
#                           slurm/local-cluster.sh (the test cluster), created here (needs root).
#   TSKD_MLFLOW_DB_NAME     that database's name                              [tskd_mlflow]
#   TSKD_MLFLOW_ARTIFACTS   artifact root, a directory every job's files reach the server in
#                           (the server stores what jobs upload there)   [$TSKD_MLFLOW_DIR/artifacts]
#   TSKD_MLFLOW_HOST        address to listen on; 0.0.0.0 for compute nodes on other hosts [127.0.0.1]
#   TSKD_MLFLOW_PORT        port                                                        [5000]
#   TSKD_MLFLOW_ALLOWED_HOSTS  host names clients may use (MLflow's --allowed-hosts), when listening on
#                           0.0.0.0                  [this host's short and full name,localhost]
#   TSKD_MLFLOW_DIR         state: pid file, log                            [/var/tmp/tskd-mlflow]
#   TSKD_MLFLOW_PYTHON      the Python that has mlflow (and pymysql / psycopg2 for the database)
#                           [.venv/bin/python of this checkout, else python3]
#   TSKD_SLURM_DIR, TSKD_SLURM_DB_PORT   where slurm/local-cluster.sh keeps its MariaDB
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${TSKD_MLFLOW_DIR:-/var/tmp/tskd-mlflow}"
HOST="${TSKD_MLFLOW_HOST:-127.0.0.1}"
PORT="${TSKD_MLFLOW_PORT:-5000}"
ARTIFACTS="${TSKD_MLFLOW_ARTIFACTS:-$STATE/artifacts}"
DB_NAME="${TSKD_MLFLOW_DB_NAME:-tskd_mlflow}"
DB_USER=tskd_mlflow
PY="${TSKD_MLFLOW_PYTHON:-}"
if [[ -z $PY ]]; then
    if [[ -x $HERE/../.venv/bin/python ]]; then PY="$HERE/../.venv/bin/python"; else PY=python3; fi
fi
PIDFILE="$STATE/server.pid"
LOG="$STATE/server.log"
# The address clients use: the listening one, or this host's name when it listens everywhere.
CLIENT_HOST="$HOST"
[[ $HOST == 0.0.0.0 ]] && CLIENT_HOST="$(hostname -f 2>/dev/null || hostname)"
URL="http://$CLIENT_HOST:$PORT"

say() { printf 'mlflow-server: %s\n' "$*"; }
fail() {
    printf 'mlflow-server: ERROR: %s\n' "$1" >&2
    if [[ -n ${2:-} && -r $2 ]]; then
        printf -- '----- tail of %s -----\n' "$2" >&2
        tail -n 40 -- "$2" >&2
    fi
    exit 1
}

running_pid() {
    local pid
    [[ -r $PIDFILE ]] || return 1
    pid=$(tr -dc '0-9' <"$PIDFILE")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}
healthy() { "$PY" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$URL/health', timeout=3).status != 200)" 2>/dev/null; }

# The test cluster's MariaDB (slurm/local-cluster.sh): a database and a user for MLflow, the
# password kept in the state dir (root only). Prints the backend store URI.
local_cluster_db() {
    local slurm_state="${TSKD_SLURM_DIR:-/var/tmp/tskd-slurm}" db_port="${TSKD_SLURM_DB_PORT:-3306}" sock pw
    sock="$slurm_state/mysql/run/mariadbd.sock"
    [[ -S $sock ]] || fail "no TSKD_MLFLOW_DB_URI and no MariaDB of slurm/local-cluster.sh at $sock: start the test cluster (bash slurm/local-cluster.sh start) or give TSKD_MLFLOW_DB_URI"
    [[ $EUID -eq 0 ]] || fail "creating the database in the test cluster's MariaDB needs root (or give TSKD_MLFLOW_DB_URI)"
    if [[ ! -s $STATE/dbpass ]]; then
        (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$STATE/dbpass")
    fi
    pw=$(<"$STATE/dbpass")
    mariadb --no-defaults --protocol=socket --socket="$sock" -uroot -N -B <<EOF >/dev/null ||
CREATE DATABASE IF NOT EXISTS \`$DB_NAME\`;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pw';
GRANT ALL PRIVILEGES ON \`$DB_NAME\`.* TO '$DB_USER'@'127.0.0.1';
EOF
        fail "could not create database $DB_NAME in the MariaDB at $sock"
    printf 'mysql+pymysql://%s:%s@127.0.0.1:%s/%s\n' "$DB_USER" "$pw" "$db_port" "$DB_NAME"
}

cmd_start() {
    mkdir -p "$STATE" "$ARTIFACTS"
    chmod 700 "$STATE"
    if running_pid >/dev/null && healthy; then
        say "already running (pid $(running_pid)) at $URL"
        printf 'export MLFLOW_TRACKING_URI=%s\n' "$URL"
        return 0
    fi
    local uri="${TSKD_MLFLOW_DB_URI:-}"
    [[ -n $uri ]] || uri=$(local_cluster_db)
    case $uri in
    sqlite:*) fail "TSKD_MLFLOW_DB_URI is SQLite: the point of the server is a database many jobs can write; give mysql+pymysql:// or postgresql://" ;;
    mysql*) "$PY" -c 'import pymysql' 2>/dev/null || fail "$PY has no pymysql (pip install -e . installs it)" ;;
    postgresql*) "$PY" -c 'import psycopg2' 2>/dev/null || fail "$PY has no psycopg2 (pip install psycopg2-binary)" ;;
    esac
    if "$PY" -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('$CLIENT_HOST', $PORT)) != 0)" 2>/dev/null; then
        fail "$CLIENT_HOST:$PORT is in use by another process; stop it or set TSKD_MLFLOW_PORT"
    fi
    local extra=()
    if [[ $HOST == 0.0.0.0 ]]; then
        # MLflow refuses requests whose Host header it does not know (DNS rebinding protection).
        extra=(--allowed-hosts "${TSKD_MLFLOW_ALLOWED_HOSTS:-$(hostname),$(hostname -f 2>/dev/null || hostname),localhost}")
    fi
    say "starting mlflow server at $URL (artifacts in $ARTIFACTS, log $LOG)"
    # Its own session, stdin/out closed: it outlives this script and no caller's pipe stays open.
    setsid -f "$PY" -m mlflow server --host "$HOST" --port "$PORT" --workers 2 \
        --backend-store-uri "$uri" --artifacts-destination "$ARTIFACTS" "${extra[@]}" \
        </dev/null >>"$LOG" 2>&1 9>&-
    local pid t0=$SECONDS
    # The server's own process (its session leader): found by its port on its command line.
    # A first start on an empty database creates MLflow's schema: a minute or so.
    while ((SECONDS - t0 < 300)); do
        if healthy; then
            pid=$(pgrep -o -f -- "mlflow server --host $HOST --port $PORT " || true)
            [[ -n $pid ]] && printf '%s\n' "$pid" >"$PIDFILE"
            say "up (pid ${pid:-?}) after $((SECONDS - t0)) s"
            printf 'export MLFLOW_TRACKING_URI=%s\n' "$URL"
            return 0
        fi
        if ! pgrep -f -- "mlflow server --host $HOST --port $PORT " >/dev/null; then
            fail "mlflow server exited" "$LOG"
        fi
        sleep 0.2
    done
    fail "mlflow server did not answer at $URL within 300 s" "$LOG"
}

cmd_stop() {
    local pid i
    if ! pid=$(running_pid); then
        say "not running"
        rm -f -- "$PIDFILE"
        return 0
    fi
    say "stopping pid $pid and its workers"
    kill -TERM -- "-$(ps -o pgid= "$pid" | tr -d ' ')" 2>/dev/null || kill -TERM "$pid"
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f -- "$PIDFILE"
}

cmd_status() {
    if running_pid >/dev/null && healthy; then
        say "running (pid $(running_pid)) at $URL"
        return 0
    fi
    say "not running at $URL"
    return 3
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status || exit $? ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
