#!/usr/bin/env bash
# One MLflow tracking server for every job of a cluster run: many writers on a real database
# (MariaDB/MySQL or PostgreSQL) instead of one SQLite file on a network filesystem.
#
#   bash slurm/mlflow-server.sh start    # start (idempotent); prints the shell lines to run
#   bash slurm/mlflow-server.sh stop     # stop it (the database and the artifacts stay)
#   bash slurm/mlflow-server.sh status   # exit 0 only when it answers
#
# `start` prints, on stdout, only shell lines: `export MLFLOW_TRACKING_URI=...` and, with
# authentication on, `source <credentials file>` (never the password itself); its messages go to
# stderr, so `eval "$(bash slurm/mlflow-server.sh start)"` sets up the shell that runs Snakemake.
#
# No secret is ever on a command line (`ps` shows every user's) or in the log: the backend URI
# reaches `mlflow server` through its environment (MLFLOW_BACKEND_STORE_URI), the test cluster's
# database password through a MySQL option file (mode 600), MLflow's own users through an ini file
# (mode 600).
#
# Environment:
#   TSKD_MLFLOW_DB_URI      the backend store, e.g. mysql+pymysql://user@dbhost/mlflow?read_default_file=~/.my.cnf
#                           (the password in the [client] section of that file, mode 600) or
#                           postgresql://user@dbhost/mlflow (the password in ~/.pgpass, mode 600).
#                           A password inside the URI works too; it stays out of every command line.
#                           Unset: a database in the MariaDB of slurm/local-cluster.sh (the test
#                           cluster), created here (needs root).
#   TSKD_MLFLOW_DB_NAME     that database's name (letters, digits, _); its MariaDB user has the same name [tskd_mlflow]
#   TSKD_MLFLOW_ARTIFACTS   artifact root, a directory every job's files reach the server in
#                           (the server stores what jobs upload there)   [$TSKD_MLFLOW_DIR/artifacts]
#   TSKD_MLFLOW_UMASK       umask of the artifact root and of everything the server writes there;
#                           022 (or 027) shares the artifacts with every user (the group); the state dir
#                           stays private whatever this says                                     [077]
#   TSKD_MLFLOW_HOST        address to listen on; 0.0.0.0 for compute nodes on other hosts [127.0.0.1]
#   TSKD_MLFLOW_PORT        port                                                        [5000]
#   TSKD_MLFLOW_ALLOWED_HOSTS  host names clients may use (MLflow's --allowed-hosts), when listening on
#                           0.0.0.0; a name without a port is allowed with this server's port too
#                           [this host's short and full name,localhost,127.0.0.1]
#   TSKD_MLFLOW_AUTH        1: MLflow's basic authentication (its `basic-auth` app): every request
#                           needs a user and password; 0: none. [1 when listening beyond loopback, else 0]
#   TSKD_MLFLOW_CREDENTIALS the credentials file, mode 600, lines
#                           `export MLFLOW_TRACKING_USERNAME=...` and `export MLFLOW_TRACKING_PASSWORD=...`
#                           (at least 12 characters of A-Z a-z 0-9 . _ @ + / = : , -); the server's admin
#                           user. Unset: $TSKD_MLFLOW_DIR/client.env, generated at the first start.
#   TSKD_MLFLOW_DIR         state, private to its owner (mode 700): pid file, log, database
#                           password, credentials, MLflow's user database        [/var/tmp/tskd-mlflow]
#   TSKD_MLFLOW_PYTHON      the Python that has mlflow (and pymysql / psycopg2 for the database,
#                           Flask-WTF for authentication: mlflow[auth])
#                           [.venv/bin/python of this checkout, else python3]
#   TSKD_SLURM_DIR, TSKD_SLURM_DB_PORT   where slurm/local-cluster.sh keeps its MariaDB
set -Eeuo pipefail
umask 077 # every file of the state dir is its owner's alone

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${TSKD_MLFLOW_DIR:-/var/tmp/tskd-mlflow}"
HOST="${TSKD_MLFLOW_HOST:-127.0.0.1}"
PORT="${TSKD_MLFLOW_PORT:-5000}"
ARTIFACTS="${TSKD_MLFLOW_ARTIFACTS:-$STATE/artifacts}"
DB_NAME="${TSKD_MLFLOW_DB_NAME:-tskd_mlflow}"
DB_USER="$DB_NAME" # a user per database: two state dirs on two databases never reset each other's password
ART_UMASK="${TSKD_MLFLOW_UMASK:-077}"
PY="${TSKD_MLFLOW_PYTHON:-}"
if [[ -z $PY ]]; then
    if [[ -x $HERE/../.venv/bin/python ]]; then PY="$HERE/../.venv/bin/python"; else PY=python3; fi
fi
PIDFILE="$STATE/server.pid"
LOG="$STATE/server.log"
SETTINGS="$STATE/server.settings" # how the running server was started: host, port, auth
DBPASS="$STATE/dbpass"
MYCNF="$STATE/my.cnf"
AUTH_INI="$STATE/auth.ini"
AUTH_DB="$STATE/auth.db"
CREDS="${TSKD_MLFLOW_CREDENTIALS:-$STATE/client.env}"
# The address clients use: the listening one, or this host's name when it listens everywhere.
CLIENT_HOST="$HOST"
[[ $HOST == 0.0.0.0 ]] && CLIENT_HOST="$(hostname -f 2>/dev/null || hostname)"
URL="http://$CLIENT_HOST:$PORT"

# Messages go to stderr: stdout carries only the shell lines of `start`.
say() { printf 'mlflow-server: %s\n' "$*" >&2; }
fail() {
    printf 'mlflow-server: ERROR: %s\n' "$1" >&2
    if [[ -n ${2:-} && -r $2 ]]; then
        printf -- '----- tail of %s -----\n' "$2" >&2
        tail -n 40 -- "$2" >&2
    fi
    exit 1
}

is_loopback() {
    case $1 in
    127.* | localhost | ::1 | '[::1]') return 0 ;;
    *) return 1 ;;
    esac
}

check_input() {
    [[ $PORT =~ ^[0-9]{1,5}$ ]] && ((PORT >= 1 && PORT <= 65535)) ||
        fail "TSKD_MLFLOW_PORT='$PORT' is not a port number (1-65535)"
    [[ $DB_NAME =~ ^[A-Za-z0-9_]{1,64}$ ]] ||
        fail "TSKD_MLFLOW_DB_NAME='$DB_NAME': use 1 to 64 letters, digits or _"
    [[ $ART_UMASK =~ ^0?[0-7]{3}$ ]] || fail "TSKD_MLFLOW_UMASK='$ART_UMASK' is not a umask (e.g. 077, 027, 022)"
    case ${TSKD_MLFLOW_AUTH:-} in
    1 | 0) AUTH=$TSKD_MLFLOW_AUTH ;;
    '') if is_loopback "$HOST"; then AUTH=0; else AUTH=1; fi ;;
    *) fail "TSKD_MLFLOW_AUTH='$TSKD_MLFLOW_AUTH': use 1 (MLflow's basic authentication) or 0 (none)" ;;
    esac
    # The state dir holds passwords: it must be ours, and a name in a world-writable /var/tmp must
    # not be someone else's link.
    if [[ -L $STATE && $(stat -c %u -- "$STATE") != "$EUID" ]]; then
        fail "TSKD_MLFLOW_DIR=$STATE is a link made by another user; set TSKD_MLFLOW_DIR to a directory of your own"
    fi
    if [[ -e $STATE && ! -O $STATE ]]; then
        fail "TSKD_MLFLOW_DIR=$STATE belongs to another user; set TSKD_MLFLOW_DIR to a directory of your own"
    fi
}

# A file holding a secret: a regular file of ours that no one else may read.
check_private_file() { # FILE WHAT
    local f=$1 what=$2 mode
    [[ -f $f ]] || fail "$what $f is not a regular file"
    [[ -O $f ]] || fail "$what $f belongs to another user; it must be yours (mode 600)"
    mode=$(stat -c %a -- "$f")
    if ((8#$mode & 8#077)); then
        fail "$what $f is readable or writable by other users (mode $mode): chmod 600 $f"
    fi
}

running_pid() {
    local pid
    [[ -r $PIDFILE ]] || return 1
    pid=$(tr -dc '0-9' <"$PIDFILE")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}
healthy() { "$PY" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$URL/health', timeout=3).status != 200)" 2>/dev/null; }

# The credentials file: USER and PASSWORD from its MLFLOW_TRACKING_USERNAME / _PASSWORD lines.
read_credentials() {
    local line re='^[[:space:]]*(export[[:space:]]+)?(MLFLOW_TRACKING_USERNAME|MLFLOW_TRACKING_PASSWORD)=(.*)$' k v
    USER_NAME="" USER_PW=""
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ $re ]] || continue
        k=${BASH_REMATCH[2]} v=${BASH_REMATCH[3]}
        if [[ $v =~ ^\'(.*)\'$ || $v =~ ^\"(.*)\"$ ]]; then v=${BASH_REMATCH[1]}; fi
        if [[ $k == MLFLOW_TRACKING_USERNAME ]]; then USER_NAME=$v; else USER_PW=$v; fi
    done <"$CREDS"
    [[ -n $USER_NAME ]] || fail "credentials file $CREDS has no line MLFLOW_TRACKING_USERNAME=<user>"
    [[ -n $USER_PW ]] || fail "credentials file $CREDS has no line MLFLOW_TRACKING_PASSWORD=<password>"
    [[ $USER_NAME =~ ^[A-Za-z0-9._@-]+$ ]] ||
        fail "credentials file $CREDS: MLFLOW_TRACKING_USERNAME may hold only A-Z a-z 0-9 . _ @ -"
    # No quotes, spaces, $, ~ or %: the file is sourced by a shell and copied into an ini file.
    [[ $USER_PW =~ ^[A-Za-z0-9._@+/=:,-]+$ ]] ||
        fail "credentials file $CREDS: MLFLOW_TRACKING_PASSWORD may hold only A-Z a-z 0-9 . _ @ + / = : , -"
    ((${#USER_PW} >= 12)) || fail "credentials file $CREDS: MLFLOW_TRACKING_PASSWORD must have at least 12 characters (MLflow's rule)"
}

# The credentials of the server's admin user: the user's file, or one generated at the first start.
ensure_credentials() {
    if [[ -n ${TSKD_MLFLOW_CREDENTIALS:-} ]]; then
        [[ -e $CREDS ]] || fail "TSKD_MLFLOW_CREDENTIALS=$CREDS does not exist; write it (mode 600) with the lines
  export MLFLOW_TRACKING_USERNAME=<user>
  export MLFLOW_TRACKING_PASSWORD=<at least 12 characters>
or unset TSKD_MLFLOW_CREDENTIALS to have one generated in $STATE"
    elif [[ ! -s $CREDS ]]; then
        local pw tmp="$CREDS.tmp.$$"
        pw=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
        printf '# MLflow credentials for the tracking server of slurm/mlflow-server.sh; keep it mode 600.\nexport MLFLOW_TRACKING_USERNAME=%s\nexport MLFLOW_TRACKING_PASSWORD=%s\n' \
            "$(id -un)" "$pw" >"$tmp"
        mv -f -- "$tmp" "$CREDS"
        say "generated the credentials $CREDS (mode 600)"
    fi
    check_private_file "$CREDS" "credentials file (TSKD_MLFLOW_CREDENTIALS)"
    read_credentials
}

# MLflow's basic-auth app reads this ini (MLFLOW_AUTH_CONFIG_PATH); written afresh at every start.
# admin_password only counts when the user database has no such user yet (the first start).
write_auth_ini() {
    local tmp="$AUTH_INI.tmp.$$"
    cat >"$tmp" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///${AUTH_DB//%/%%}
admin_username = $USER_NAME
admin_password = $USER_PW
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    mv -f -- "$tmp" "$AUTH_INI"
}

# Does the server take these credentials? 0 yes, 1 refused, 2 no answer. Credentials through the
# environment of the check, never its command line.
credentials_accepted() {
    MLFLOW_TRACKING_USERNAME=$USER_NAME MLFLOW_TRACKING_PASSWORD=$USER_PW "$PY" - "$URL" <<'EOF'
import base64, os, sys, urllib.error, urllib.parse, urllib.request
user, pw = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
req = urllib.request.Request(f"{sys.argv[1]}/api/2.0/mlflow/users/get?" + urllib.parse.urlencode({"username": user}))
req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode())
try:
    urllib.request.urlopen(req, timeout=10)
except urllib.error.HTTPError as e:
    sys.exit(1 if e.code in (401, 403) else 2)
except OSError:
    sys.exit(2)
EOF
}

check_credentials_accepted() {
    local rc=0
    credentials_accepted || rc=$?
    case $rc in
    0) ;;
    1) fail "the server at $URL refuses the credentials in $CREDS: its user database $AUTH_DB set the password of user $USER_NAME at its first start, and this file has another one. Put the old password back in $CREDS, or change it with MLflow's users/update-password API, or stop the server and remove $AUTH_DB to create the user afresh" ;;
    *) fail "the server at $URL did not answer an authenticated request" "$LOG" ;;
    esac
}

# The test cluster's MariaDB (slurm/local-cluster.sh): a database and a user for MLflow, the
# password kept in the state dir (an option file pymysql reads). Prints the backend store URI,
# which holds no password.
local_cluster_db() {
    local slurm_state="${TSKD_SLURM_DIR:-/var/tmp/tskd-slurm}" db_port="${TSKD_SLURM_DB_PORT:-3306}" sock pw
    sock="$slurm_state/mysql/run/mariadbd.sock"
    [[ -S $sock ]] || fail "no TSKD_MLFLOW_DB_URI and no MariaDB of slurm/local-cluster.sh at $sock: start the test cluster (bash slurm/local-cluster.sh start) or give TSKD_MLFLOW_DB_URI"
    [[ $EUID -eq 0 ]] || fail "creating the database in the test cluster's MariaDB needs root (or give TSKD_MLFLOW_DB_URI)"
    if [[ ! -s $DBPASS ]]; then
        od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$DBPASS"
    fi
    chmod 600 "$DBPASS"
    pw=$(<"$DBPASS")
    [[ $pw =~ ^[0-9a-f]+$ ]] || fail "$DBPASS does not hold a generated password; remove it to make a new one"
    # The SQL (and the password in it) goes through stdin, not the command line. utf8mb4: MLflow's
    # schema needs it (since 3.18 some columns are utf8mb4_bin), and Debian's MariaDB defaults to latin1.
    mariadb --no-defaults --protocol=socket --socket="$sock" -uroot -N -B <<EOF >/dev/null ||
CREATE DATABASE IF NOT EXISTS \`$DB_NAME\` CHARACTER SET utf8mb4;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pw';
GRANT ALL PRIVILEGES ON \`$DB_NAME\`.* TO '$DB_USER'@'127.0.0.1';
EOF
        fail "could not create database $DB_NAME in the MariaDB at $sock"
    convert_to_utf8mb4 "$sock"
    printf '[client]\nuser = %s\npassword = %s\n' "$DB_USER" "$pw" >"$MYCNF"
    printf 'mysql+pymysql://%s@127.0.0.1:%s/%s?read_default_file=%s\n' "$DB_USER" "$db_port" "$DB_NAME" "$MYCNF"
}

# A database this script made in latin1 (before it asked for utf8mb4) is converted, its tables too,
# including any that a failed MLflow migration left behind; MLflow's next start completes the
# migration. MariaDB refuses to convert a column a foreign key uses (even with the checks off), so
# the foreign keys are dropped, the tables converted and the keys put back, in one session.
convert_to_utf8mb4() {
    local sock=$1 tables drops adds t sql
    local q=(mariadb --no-defaults --protocol=socket --socket="$sock" -uroot -N -B)
    tables=$("${q[@]}" -e "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '$DB_NAME' AND TABLE_COLLATION NOT LIKE 'utf8mb4%'") ||
        fail "could not read the tables of database $DB_NAME in the MariaDB at $sock"
    sql="ALTER DATABASE \`$DB_NAME\` CHARACTER SET utf8mb4;"
    if [[ -n $tables ]]; then
        say "converting database $DB_NAME to utf8mb4 (MLflow's schema needs it): $(wc -w <<<"$tables") tables"
        drops=$("${q[@]}" -e "SELECT CONCAT('ALTER TABLE \`', TABLE_NAME, '\` DROP FOREIGN KEY \`', CONSTRAINT_NAME, '\`;')
            FROM information_schema.REFERENTIAL_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = '$DB_NAME'") &&
            adds=$("${q[@]}" -e "SELECT CONCAT('ALTER TABLE \`', rc.TABLE_NAME, '\` ADD CONSTRAINT \`', rc.CONSTRAINT_NAME,
                '\` FOREIGN KEY (', GROUP_CONCAT(CONCAT('\`', k.COLUMN_NAME, '\`') ORDER BY k.ORDINAL_POSITION),
                ') REFERENCES \`', rc.REFERENCED_TABLE_NAME, '\` (',
                GROUP_CONCAT(CONCAT('\`', k.REFERENCED_COLUMN_NAME, '\`') ORDER BY k.ORDINAL_POSITION),
                ') ON DELETE ', rc.DELETE_RULE, ' ON UPDATE ', rc.UPDATE_RULE, ';')
                FROM information_schema.REFERENTIAL_CONSTRAINTS rc JOIN information_schema.KEY_COLUMN_USAGE k
                  ON k.CONSTRAINT_SCHEMA = rc.CONSTRAINT_SCHEMA AND k.CONSTRAINT_NAME = rc.CONSTRAINT_NAME
                 AND k.TABLE_NAME = rc.TABLE_NAME
                WHERE rc.CONSTRAINT_SCHEMA = '$DB_NAME'
                GROUP BY rc.TABLE_NAME, rc.CONSTRAINT_NAME, rc.REFERENCED_TABLE_NAME, rc.DELETE_RULE, rc.UPDATE_RULE") ||
            fail "could not read the foreign keys of database $DB_NAME in the MariaDB at $sock"
        sql+=" USE \`$DB_NAME\`; SET FOREIGN_KEY_CHECKS = 0; $drops"
        for t in $tables; do sql+=" ALTER TABLE \`$t\` CONVERT TO CHARACTER SET utf8mb4;"; done
        sql+=" $adds SET FOREIGN_KEY_CHECKS = 1;"
    fi
    "${q[@]}" <<<"$sql" || fail "could not convert database $DB_NAME in the MariaDB at $sock to utf8mb4"
}

# A given MySQL/MariaDB database must be utf8mb4 (MLflow >= 3.18 pins utf8mb4_bin on some columns;
# on latin1 its migration fails at the server's start). Checked before the start so that the
# message says what to do; a database that cannot be reached is left to the server to report.
check_mysql_charset() {
    local msg rc=0
    msg=$("$PY" - "$1" <<'EOF'
import sys

import sqlalchemy as sa

try:
    with sa.create_engine(sys.argv[1]).connect() as c:
        db = c.execute(sa.text("SELECT DATABASE()")).scalar()
        cs = c.execute(sa.text("SELECT DEFAULT_CHARACTER_SET_NAME FROM information_schema.SCHEMATA "
                               "WHERE SCHEMA_NAME = DATABASE()")).scalar()
        bad = [r[0] for r in c.execute(sa.text(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_COLLATION NOT LIKE 'utf8mb4%'"))]
except Exception:
    sys.exit(0)
if db is None or (cs == "utf8mb4" and not bad):
    sys.exit(0)
fix = [f"ALTER DATABASE `{db}` CHARACTER SET utf8mb4;"]
fix += [f"ALTER TABLE `{db}`.`{t}` CONVERT TO CHARACTER SET utf8mb4;" for t in bad]
print(f"database {db} of TSKD_MLFLOW_DB_URI has character set {cs}"
      + (f" and tables not in utf8mb4 ({', '.join(bad)})" if bad else "")
      + "; MLflow's schema needs utf8mb4 (docs/slurm.md). As its owner, run: " + " ".join(fix)
      + (" (MariaDB will not convert a column that a foreign key uses: drop such keys first, add them back after)"
         if bad else ""))
sys.exit(1)
EOF
) || rc=$?
    ((rc == 0)) || fail "$msg"
}

# A URI naming an option file (pymysql's read_default_file): the file must exist (pymysql
# silently ignores a missing one) and be private.
check_uri_option_file() {
    local f
    [[ $1 =~ [?\&]read_default_file=([^\&]+) ]] || return 0
    f=${BASH_REMATCH[1]}
    [[ $f == '~/'* ]] && f="$HOME/${f#\~/}"
    [[ -e $f ]] || fail "TSKD_MLFLOW_DB_URI names the option file $f (read_default_file), which does not exist"
    check_private_file "$f" "option file of TSKD_MLFLOW_DB_URI (read_default_file)"
}

# The artifact root: made under TSKD_MLFLOW_UMASK; an existing one may grant no more than it.
prepare_artifacts() {
    local mode
    if [[ ! -e $ARTIFACTS ]]; then
        (umask "$ART_UMASK" && mkdir -p -- "$ARTIFACTS") || fail "could not create the artifact root TSKD_MLFLOW_ARTIFACTS=$ARTIFACTS"
        return 0
    fi
    [[ -d $ARTIFACTS ]] || fail "TSKD_MLFLOW_ARTIFACTS=$ARTIFACTS is not a directory"
    mode=$(stat -c %a -- "$ARTIFACTS")
    if ((8#$mode & 8#$ART_UMASK & 8#077)); then
        if [[ -z ${TSKD_MLFLOW_ARTIFACTS:-} && -O $ARTIFACTS ]]; then
            chmod "$(printf '%o' $((8#$mode & ~8#$ART_UMASK & 8#777)))" -- "$ARTIFACTS" # ours, in the state dir
        else
            fail "the artifact root TSKD_MLFLOW_ARTIFACTS=$ARTIFACTS is open to other users (mode $mode) beyond TSKD_MLFLOW_UMASK=$ART_UMASK: chmod go-rwx $ARTIFACTS, or set TSKD_MLFLOW_UMASK (e.g. 022) to share the artifacts"
        fi
    fi
}

allowed_hosts() {
    # MLflow compares the whole Host header, port included: each name is allowed with and without it.
    local given="${TSKD_MLFLOW_ALLOWED_HOSTS:-$(hostname),$(hostname -f 2>/dev/null || hostname),localhost,127.0.0.1}"
    local out=() h
    IFS=, read -r -a names <<<"$given"
    for h in "${names[@]}"; do
        [[ -n $h ]] || continue
        out+=("$h")
        [[ $h == *:* || $h == *'*'* ]] || out+=("$h:$PORT")
    done
    (IFS=, && printf '%s\n' "${out[*]}")
}

print_exports() {
    printf 'export MLFLOW_TRACKING_URI=%s\n' "$URL"
    if ((AUTH)); then
        printf 'source %q  # MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD\n' "$CREDS"
    fi
}

# Its own session, stdin/out closed: it outlives this script and no caller's pipe stays open.
# Secrets reach it through its environment (readable by its owner only; `env VAR=...` would put
# them on a command line), never argv. What it writes gets TSKD_MLFLOW_UMASK.
launch_server() {
    local uri=$1
    shift
    (
        umask "$ART_UMASK"
        export MLFLOW_BACKEND_STORE_URI="$uri"
        unset MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD # the ini names the admin, not the caller's env
        if ((AUTH)); then
            export MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI"
            MLFLOW_FLASK_SERVER_SECRET_KEY="$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
            export MLFLOW_FLASK_SERVER_SECRET_KEY
        fi
        exec setsid -f "$PY" -m mlflow server --host "$HOST" --port "$PORT" --workers 2 \
            --artifacts-destination "$ARTIFACTS" "$@" \
            </dev/null >>"$LOG" 2>&1 9>&-
    )
}

cmd_start() {
    check_input
    mkdir -p -- "$STATE"
    chmod 700 "$STATE"
    # A state dir of an earlier version: its files may have been made under a wider umask.
    local f
    for f in "$LOG" "$PIDFILE" "$DBPASS" "$SETTINGS"; do [[ -e $f ]] && chmod go-rwx -- "$f"; done
    prepare_artifacts
    if ((AUTH)); then
        "$PY" -c 'import flask_wtf' 2>/dev/null ||
            fail "TSKD_MLFLOW_AUTH=1 (the default beyond loopback) needs MLflow's auth extra, which $PY lacks: pip install 'mlflow[auth]'"
        ensure_credentials
    elif ! is_loopback "$HOST"; then
        say "WARNING: TSKD_MLFLOW_AUTH=0 on $HOST: anyone who reaches port $PORT can change or delete runs"
    fi
    local want="host=$HOST port=$PORT auth=$AUTH"
    if running_pid >/dev/null; then
        local had=""
        [[ -r $SETTINGS ]] && had=$(<"$SETTINGS")
        if [[ -n $had && $had != "$want" ]]; then
            fail "a server of $STATE runs (pid $(running_pid)) with $had, not $want: stop it first (bash slurm/mlflow-server.sh stop)"
        fi
        if healthy; then
            say "already running (pid $(running_pid)) at $URL"
            ((AUTH)) && check_credentials_accepted
            print_exports
            return 0
        fi
    fi
    local uri="${TSKD_MLFLOW_DB_URI:-}"
    [[ -n $uri ]] || uri=$(local_cluster_db)
    case $uri in
    sqlite:*) fail "TSKD_MLFLOW_DB_URI is SQLite: the point of the server is a database many jobs can write; give mysql+pymysql:// or postgresql://" ;;
    mysql*)
        "$PY" -c 'import pymysql' 2>/dev/null || fail "$PY has no pymysql (pip install -e . installs it)"
        check_uri_option_file "$uri"
        check_mysql_charset "$uri"
        ;;
    postgresql*) "$PY" -c 'import psycopg2' 2>/dev/null || fail "$PY has no psycopg2 (pip install psycopg2-binary)" ;;
    *) fail "TSKD_MLFLOW_DB_URI is neither mysql+pymysql:// nor postgresql://" ;;
    esac
    if "$PY" -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('$CLIENT_HOST', $PORT)) != 0)" 2>/dev/null; then
        fail "$CLIENT_HOST:$PORT is in use by another process; stop it or set TSKD_MLFLOW_PORT"
    fi
    local extra=()
    if [[ $HOST == 0.0.0.0 ]]; then
        # MLflow refuses requests whose Host header it does not know (DNS rebinding protection).
        extra+=(--allowed-hosts "$(allowed_hosts)")
    fi
    if ((AUTH)); then
        write_auth_ini
        extra+=(--app-name basic-auth)
    fi
    [[ -e $LOG ]] || : >"$LOG"
    say "starting mlflow server at $URL (artifacts in $ARTIFACTS, log $LOG, authentication $( ((AUTH)) && echo on || echo off))"
    local log_at upgraded=0
    log_at=$(stat -c %s -- "$LOG")
    launch_server "$uri" "${extra[@]}"
    local pid t0=$SECONDS
    # The server's own process (its session leader): found by its port on its command line.
    # A first start on an empty database creates MLflow's schema: a minute or so.
    while ((SECONDS - t0 < 300)); do
        if healthy; then
            pid=$(pgrep -o -f -- "mlflow server --host $HOST --port $PORT " || true)
            [[ -n $pid ]] && printf '%s\n' "$pid" >"$PIDFILE"
            printf '%s\n' "$want" >"$SETTINGS"
            ((AUTH)) && check_credentials_accepted
            say "up (pid ${pid:-?}) after $((SECONDS - t0)) s"
            print_exports
            return 0
        fi
        if ! pgrep -f -- "mlflow server --host $HOST --port $PORT " >/dev/null; then
            # A newer MLflow than made the schema: it asks for `mlflow db upgrade`. Done here for
            # the test cluster's database (ours); a given database's owner backs it up first.
            if tail -c +$((log_at + 1)) -- "$LOG" | grep -q "out-of-date database schema"; then
                if [[ -z ${TSKD_MLFLOW_DB_URI:-} ]] && ((!upgraded)); then
                    say "upgrading database $DB_NAME to the schema of MLflow $("$PY" -c 'import mlflow; print(mlflow.__version__)')"
                    "$PY" -m mlflow db upgrade "$uri" >>"$LOG" 2>&1 || fail "mlflow db upgrade failed" "$LOG"
                    upgraded=1
                    log_at=$(stat -c %s -- "$LOG")
                    launch_server "$uri" "${extra[@]}"
                    continue
                fi
                fail "the MLflow schema of the database of TSKD_MLFLOW_DB_URI is older than this MLflow: back the database up, then run: $PY -m mlflow db upgrade '$uri'" "$LOG"
            fi
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
