#!/usr/bin/env bash
# Single-node SLURM cluster with accounting (munge + MariaDB + slurmdbd +
# slurmctld + slurmd), for tests and CI.  No systemd: every daemon is started
# in plain daemon mode from here.  See slurm/README-cluster.md.
#
#   bash slurm/local-cluster.sh start    # install if needed, configure, start, wait for the node
#   bash slurm/local-cluster.sh stop     # stop all five daemons (state is kept)
#   bash slurm/local-cluster.sh status   # print state; exit 0 only if the node is up
#   bash slurm/local-cluster.sh stop-db  # stop MariaDB alone (a fault for tests: the MLflow server
#   bash slurm/local-cluster.sh start-db #   of slurm/mlflow-server.sh and slurmdbd lose their database)
#   bash slurm/local-cluster.sh restart-db   # both: the database restarts under its clients
#
# Environment:
#   TSKD_SLURM_DIR      state dir (configs, logs, pid files, spool, database)  [/var/tmp/tskd-slurm]
#   TSKD_SLURM_DB_PORT  MariaDB TCP port on 127.0.0.1                           [3306]
#   TSKD_SLURM_FORCE=1  overwrite an /etc/slurm/slurm.conf this script did not write
#   TSKD_SLURM_CPUS     CPUs the node declares, when more than the machine has: jobs then share
#                       its cores (a rehearsal of many jobs in flight, benchmarks/bench_scale.py) [the machine's]
set -Eeuo pipefail

STATE="${TSKD_SLURM_DIR:-/var/tmp/tskd-slurm}"
DB_PORT="${TSKD_SLURM_DB_PORT:-3306}"
CLUSTER=tskd
DB_NAME=tskd_slurm_acct_db
DB_USER=tskd_slurm
SLURM_ETC=/etc/slurm            # clients read /etc/slurm/slurm.conf by default
MARKER="# managed by tskd slurm/local-cluster.sh"
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
NODE="$(hostname -s)"

ETC="$STATE/etc"
LOGDIR="$STATE/log"
RUN="$STATE/run"
SPOOL="$STATE/spool"
DB="$STATE/mysql"
DB_DATA="$DB/data"
DB_SOCK="$DB/run/mariadbd.sock"
DB_PID="$DB/run/mariadbd.pid"
DB_LOG="$DB/mariadbd.log"
MUNGE_PID=/run/munge/munged.pid
MUNGE_LOG=/var/log/munge/munged.log

step() { printf 'local-cluster: %s\n' "$*"; }
err() { printf 'local-cluster: ERROR: %s\n' "$*" >&2; }
# fail MESSAGE [LOGFILE...]: print the message and the tail of each log, exit 1
fail() {
    local msg=$1 f
    shift
    err "$msg"
    for f in "$@"; do
        if [[ -r $f ]]; then
            printf -- '----- tail of %s -----\n' "$f" >&2
            tail -n 40 -- "$f" >&2 || true
        fi
    done
    exit 1
}
trap 'err "command failed (rc=$?) at line $LINENO: $BASH_COMMAND"' ERR

now() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# alive PID: the process exists and is not a zombie (in containers PID 1 may be slow to reap
# the daemons it inherited, so a killed daemon can linger as a zombie for a long time)
alive() {
    local st
    st=$(sed -n 's/^.*) \(.\).*$/\1/p' "/proc/$1/stat" 2>/dev/null || true)
    [[ -n $st && $st != Z && $st != X ]]
}
# pid_of PIDFILE COMM: print the pid if the pid file names a live process called COMM
pid_of() {
    local f=$1 comm=$2 pid c
    [[ -r $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f" 2>/dev/null || true)
    [[ -n $pid ]] || return 1
    alive "$pid" || return 1
    c=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $c == "$comm" ]] || return 1
    printf '%s\n' "$pid"
}
# drop a pid file whose process is gone (left by a previous run / reboot)
clear_stale_pid() {
    local f=$1 comm=$2
    if [[ -e $f ]] && ! pid_of "$f" "$comm" >/dev/null; then
        rm -f -- "$f"
    fi
}
port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

running_munged() { pid_of "$MUNGE_PID" munged; }
running_mariadbd() { pid_of "$DB_PID" mariadbd || pid_of "$DB_PID" mysqld; }
running_slurmdbd() { pid_of "$RUN/slurmdbd.pid" slurmdbd; }
running_slurmctld() { pid_of "$RUN/slurmctld.pid" slurmctld; }
running_slurmd() { pid_of "$RUN/slurmd.pid" slurmd; }

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }
# usable = responding (no '*' suffix) and idle/mixed/allocated/completing
node_up() {
    local s
    s=$(node_state) || return 1
    [[ $s =~ ^(idle|mixed|allocated|completing|planned)$ ]]
}

# ---------------------------------------------------------------- privileges
ensure_root() {
    [[ $EUID -eq 0 ]] && return 0
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n --preserve-env=TSKD_SLURM_DIR,TSKD_SLURM_DB_PORT,TSKD_SLURM_FORCE,TSKD_SLURM_CPUS \
            bash "${BASH_SOURCE[0]}" "$@"
    fi
    fail "must run as root (or with passwordless sudo)"
}

# ---------------------------------------------------------------- packages
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_OURS=0
cleanup() {
    if [[ $POLICY_RC_OURS == 1 ]]; then rm -f -- "$POLICY_RC"; fi
}
trap cleanup EXIT

install_packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]} == 0)); then
        step "packages already installed"
        return 0
    fi
    step "installing ${missing[*]} (apt-get)"
    local t0 aptlog="$LOGDIR/apt.log"
    t0=$(now)
    export DEBIAN_FRONTEND=noninteractive
    # keep the packages' own init scripts / units from starting daemons on install
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        POLICY_RC_OURS=1
    fi
    : >"$aptlog"
    local have_lists=0
    if compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then have_lists=1; fi
    if [[ $have_lists == 0 ]]; then
        step "apt-get update (no package lists)"
        apt-get update >>"$aptlog" 2>&1 || fail "apt-get update failed" "$aptlog"
    fi
    if ! apt-get install -y --no-install-recommends "${PKGS[@]}" >>"$aptlog" 2>&1; then
        if [[ $have_lists == 0 ]]; then fail "apt-get install failed" "$aptlog"; fi
        step "apt-get install failed with the current lists; apt-get update and retry"
        apt-get update >>"$aptlog" 2>&1 || fail "apt-get update failed" "$aptlog"
        apt-get install -y --no-install-recommends "${PKGS[@]}" >>"$aptlog" 2>&1 ||
            fail "apt-get install failed" "$aptlog"
    fi
    if [[ $POLICY_RC_OURS == 1 ]]; then
        rm -f -- "$POLICY_RC"
        POLICY_RC_OURS=0
    fi
    step "packages installed in $(elapsed_since "$t0") s"
}

# ---------------------------------------------------------------- configs
CHANGED_SLURM=0
CHANGED_DBD=0

# install_file SRC DST MODE: move SRC over DST if the content differs; return 0 if changed
install_file() {
    local src=$1 dst=$2 mode=$3
    chmod "$mode" "$src"
    if [[ -f $dst ]] && cmp -s "$src" "$dst"; then
        rm -f -- "$src"
        chmod "$mode" "$dst"
        return 1
    fi
    mv -f -- "$src" "$dst"
    return 0
}

# /etc/slurm/NAME -> $ETC/NAME (refuse to replace a file somebody else wrote)
link_into_etc() {
    local name=$1 dst="$SLURM_ETC/$1"
    if [[ -L $dst ]]; then
        [[ $(readlink -- "$dst") == "$ETC/$name" ]] && return 0
    elif [[ -e $dst ]]; then
        if ! grep -qF "$MARKER" "$dst" 2>/dev/null && [[ ${TSKD_SLURM_FORCE:-0} != 1 ]]; then
            fail "$dst exists and was not written by this script; move it away or set TSKD_SLURM_FORCE=1"
        fi
    fi
    ln -sfn -- "$ETC/$name" "$dst"
}

write_configs() {
    mkdir -p "$ETC" "$SLURM_ETC"
    chmod 755 "$ETC"

    # node layout exactly as slurmd sees it (a mismatch makes slurmd complain / node INVAL)
    local layout cpus mem defmem
    layout=$(slurmd -C 2>/dev/null | head -n 1)
    [[ $layout == NodeName=* ]] || fail "unexpected output from 'slurmd -C': $layout"
    layout=${layout#NodeName=* }
    cpus=$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<<"$layout")
    mem=$(sed -n 's/.*\bRealMemory=\([0-9]*\).*/\1/p' <<<"$layout")
    [[ -n $cpus && -n $mem ]] || fail "cannot parse CPUs/RealMemory from 'slurmd -C': $layout"
    # More CPUs than the machine has (TSKD_SLURM_CPUS): slurmd takes the declared layout
    # (config_overrides) and jobs share the real cores.
    local overrides=""
    if [[ -n ${TSKD_SLURM_CPUS:-} && ${TSKD_SLURM_CPUS} != "$cpus" ]]; then
        [[ $TSKD_SLURM_CPUS =~ ^[1-9][0-9]*$ ]] || fail "TSKD_SLURM_CPUS must be a positive integer, got '$TSKD_SLURM_CPUS'"
        cpus=$TSKD_SLURM_CPUS
        layout="CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem"
        overrides="SlurmdParameters=config_overrides"
    fi
    # a job without --mem gets its CPU share of the memory instead of the whole node
    defmem=$((mem / cpus))

    # database password: created once, kept in the state dir (root only)
    if [[ ! -s $ETC/dbpass ]]; then
        (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$ETC/dbpass")
    fi
    chmod 600 "$ETC/dbpass"
    local dbpass
    dbpass=$(<"$ETC/dbpass")

    cat >"$ETC/slurm.conf.new" <<EOF
$MARKER -- regenerated on every start, do not edit
# state dir: $STATE
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
# start a batch job right after submission (default delay costs ~3 s per job)
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
# submitit jobs ignore SIGTERM; do not wait 30 s before SIGKILL
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=120
SlurmdTimeout=300
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
$overrides
NodeName=$NODE NodeAddr=127.0.0.1 $layout Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF

    cat >"$ETC/gres.conf.new" <<EOF
$MARKER
# one fake GPU so --gpus=1 / --gres=gpu:1 jobs are accepted
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
EOF

    (umask 077 && cat >"$ETC/slurmdbd.conf.new" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOGDIR/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$dbpass
StorageLoc=$DB_NAME
EOF
    )
    chown root:root "$ETC/slurmdbd.conf.new"

    if install_file "$ETC/slurm.conf.new" "$ETC/slurm.conf" 644; then CHANGED_SLURM=1; fi
    if install_file "$ETC/gres.conf.new" "$ETC/gres.conf" 644; then CHANGED_SLURM=1; fi
    if install_file "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf" 600; then CHANGED_DBD=1; fi
    local f
    for f in slurm.conf gres.conf slurmdbd.conf; do link_into_etc "$f"; done
}

make_dirs() {
    mkdir -p "$STATE" "$LOGDIR" "$RUN" "$SPOOL/slurmctld" "$SPOOL/slurmd"
    chmod 755 "$STATE" "$LOGDIR" "$RUN" "$SPOOL"
    chmod 700 "$SPOOL/slurmctld"
    chmod 755 "$SPOOL/slurmd"
    install -d -o mysql -g mysql -m 0755 "$DB" "$DB/run"
    install -d -o mysql -g mysql -m 0750 "$DB_DATA"
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
}

# ---------------------------------------------------------------- daemons
# launch LOGFILE CMD...: run a (self-daemonizing) command with stdin from /dev/null, output
# appended to LOGFILE and every other inherited fd closed, so that no daemon keeps the start
# lock or a caller's pipe open (a caller capturing our output would otherwise never see EOF)
launch() {
    local log=$1
    shift
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then eval "exec $fd>&-"; fi
        done 2>/dev/null
        exec "$@"
    ) </dev/null >>"$log" 2>&1
}

start_munged() {
    clear_stale_pid "$MUNGE_PID" munged
    if running_munged >/dev/null; then
        step "munged already running (pid $(running_munged))"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        step "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    step "starting munged"
    # a socket left by a munged that died would make the new one refuse to start
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    launch "$LOGDIR/munged.out" runuser -u munge -- "$(PATH="/usr/sbin:$PATH" command -v munged)" ||
        fail "munged failed to start" "$MUNGE_LOG" "$LOGDIR/munged.out"
    local i
    for ((i = 0; i < 100; i++)); do
        if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    fail "munged does not answer" "$MUNGE_LOG" "$LOGDIR/munged.out"
}

sql() { mariadb --no-defaults --protocol=socket --socket="$DB_SOCK" -uroot -N -B; }

start_mariadbd() {
    clear_stale_pid "$DB_PID" mariadbd
    if running_mariadbd >/dev/null; then
        step "mariadbd already running (pid $(running_mariadbd))"
        return 0
    fi
    local mariadbd_bin=mariadbd installdb=mariadb-install-db
    command -v mariadbd >/dev/null 2>&1 || [[ -x /usr/sbin/mariadbd ]] || mariadbd_bin=mysqld
    command -v "$installdb" >/dev/null 2>&1 || installdb=mysql_install_db
    if [[ ! -e $DB/.initialized ]]; then
        step "initialising MariaDB data dir $DB_DATA"
        rm -rf -- "$DB_DATA"
        install -d -o mysql -g mysql -m 0750 "$DB_DATA"
        "$installdb" --no-defaults --user=mysql --datadir="$DB_DATA" \
            --auth-root-authentication-method=socket --skip-test-db \
            </dev/null >"$DB/install-db.log" 2>&1 9>&- ||
            fail "mariadb-install-db failed" "$DB/install-db.log"
        touch "$DB/.initialized"
    fi
    if port_open "$DB_PORT"; then
        fail "127.0.0.1:$DB_PORT is already in use by another process; stop it or set TSKD_SLURM_DB_PORT"
    fi
    step "starting mariadbd (127.0.0.1:$DB_PORT, datadir $DB_DATA)"
    rm -f -- "$DB_SOCK"
    PATH="/usr/sbin:$PATH" launch "$DB_LOG" setsid -f "$mariadbd_bin" --no-defaults --user=mysql \
        --datadir="$DB_DATA" --socket="$DB_SOCK" --pid-file="$DB_PID" --log-error="$DB_LOG" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --innodb-lock-wait-timeout=900
    local i
    for ((i = 0; i < 300; i++)); do
        if mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping >/dev/null 2>&1; then
            return 0
        fi
        if ((i > 20)) && ! running_mariadbd >/dev/null && ! pgrep -f -- "--pid-file=$DB_PID" >/dev/null; then
            fail "mariadbd exited" "$DB_LOG"
        fi
        sleep 0.1
    done
    fail "mariadbd did not come up within 30 s" "$DB_LOG"
}

setup_database() {
    local pw
    pw=$(<"$ETC/dbpass")
    sql <<EOF || fail "cannot create database/user in MariaDB" "$DB_LOG"
CREATE DATABASE IF NOT EXISTS \`$DB_NAME\`;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pw';
GRANT ALL PRIVILEGES ON \`$DB_NAME\`.* TO '$DB_USER'@'127.0.0.1';
EOF
}

# stop_pidfile NAME PIDFILE COMM TIMEOUT_S [NAME PIDFILE COMM TIMEOUT_S ...]
# SIGTERM all the given daemons at once, wait for them, SIGKILL what is left after its timeout
stop_pidfile() {
    local pids=() names=() files=() timeouts=() pid i j alive
    while (($# >= 4)); do
        if pid=$(pid_of "$2" "$3"); then
            step "stopping $1 (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid") names+=("$1") files+=("$2") timeouts+=("$4")
        else
            rm -f -- "$2"
        fi
        shift 4
    done
    for ((i = 0; ; i++)); do
        alive=0
        for j in "${!pids[@]}"; do
            alive "${pids[j]}" || continue
            if ((i >= timeouts[j] * 10)); then
                step "${names[j]} did not stop in ${timeouts[j]} s; SIGKILL"
                kill -KILL "${pids[j]}" 2>/dev/null || true
            fi
            alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for j in "${!files[@]}"; do rm -f -- "${files[j]}"; done
}

start_slurmdbd() {
    clear_stale_pid "$RUN/slurmdbd.pid" slurmdbd
    if [[ $CHANGED_DBD == 1 ]]; then stop_pidfile slurmdbd "$RUN/slurmdbd.pid" slurmdbd 15; fi
    if running_slurmdbd >/dev/null; then
        step "slurmdbd already running (pid $(running_slurmdbd))"
        return 0
    fi
    setup_database
    if port_open 6819; then fail "port 6819 (slurmdbd) is in use by another process"; fi
    step "starting slurmdbd"
    launch "$LOGDIR/slurmdbd.out" slurmdbd ||
        fail "slurmdbd failed to start" "$LOGDIR/slurmdbd.log" "$LOGDIR/slurmdbd.out"
    local i
    for ((i = 0; i < 600; i++)); do
        if sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; then break; fi
        if ((i > 30)) && ! running_slurmdbd >/dev/null; then
            fail "slurmdbd exited" "$LOGDIR/slurmdbd.log" "$LOGDIR/slurmdbd.out"
        fi
        sleep 0.1
    done
    ((i < 600)) || fail "slurmdbd did not answer within 60 s" "$LOGDIR/slurmdbd.log"
}

register_cluster() {
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        step "registering cluster '$CLUSTER' in the accounting database"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null ||
            fail "sacctmgr add cluster failed" "$LOGDIR/slurmdbd.log"
    fi
}

start_slurmctld() {
    clear_stale_pid "$RUN/slurmctld.pid" slurmctld
    if [[ $CHANGED_SLURM == 1 ]]; then stop_pidfile slurmctld "$RUN/slurmctld.pid" slurmctld 15; fi
    if running_slurmctld >/dev/null; then
        step "slurmctld already running (pid $(running_slurmctld))"
        return 0
    fi
    if port_open 6817; then fail "port 6817 (slurmctld) is in use by another process"; fi
    step "starting slurmctld"
    launch "$LOGDIR/slurmctld.out" slurmctld -i ||
        fail "slurmctld failed to start" "$LOGDIR/slurmctld.log" "$LOGDIR/slurmctld.out"
    local i
    for ((i = 0; i < 300; i++)); do
        if scontrol ping 2>/dev/null | grep -q 'is UP'; then return 0; fi
        if ((i > 30)) && ! running_slurmctld >/dev/null; then
            fail "slurmctld exited" "$LOGDIR/slurmctld.log" "$LOGDIR/slurmctld.out"
        fi
        sleep 0.1
    done
    fail "slurmctld did not answer within 30 s" "$LOGDIR/slurmctld.log"
}

start_slurmd() {
    clear_stale_pid "$RUN/slurmd.pid" slurmd
    if [[ $CHANGED_SLURM == 1 ]]; then stop_pidfile slurmd "$RUN/slurmd.pid" slurmd 15; fi
    if running_slurmd >/dev/null; then
        step "slurmd already running (pid $(running_slurmd))"
        return 0
    fi
    if port_open 6818; then fail "port 6818 (slurmd) is in use by another process"; fi
    step "starting slurmd (node $NODE)"
    launch "$LOGDIR/slurmd.out" slurmd ||
        fail "slurmd failed to start" "$LOGDIR/slurmd.log" "$LOGDIR/slurmd.out"
}

wait_node() {
    step "waiting for node $NODE to be idle"
    local i s resumed=0
    for ((i = 0; i < 600; i++)); do
        s=$(node_state || true)
        if [[ $s =~ ^(idle|mixed|allocated|completing|planned)$ ]]; then
            step "node $NODE is $s"
            return 0
        fi
        case $s in
        inval*) fail "node $NODE is INVAL (config does not match the machine)" \
            "$LOGDIR/slurmd.log" "$LOGDIR/slurmctld.log" ;;
        down | drain* | fail* | *drain | down+* )
            # responding but marked down/drained by an earlier run: put it back
            if ((resumed == 0)); then
                step "node $NODE is $s; resuming it"
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
        esac
        if ((i > 30)) && ! running_slurmd >/dev/null; then
            fail "slurmd exited" "$LOGDIR/slurmd.log" "$LOGDIR/slurmd.out"
        fi
        sleep 0.1
    done
    fail "node $NODE not idle after 60 s (state: ${s:-?})" "$LOGDIR/slurmd.log" "$LOGDIR/slurmctld.log"
}

# ---------------------------------------------------------------- commands
cmd_start() {
    local t0
    t0=$(now)
    ensure_root start
    mkdir -p "$STATE" "$LOGDIR"
    chmod 755 "$STATE"
    # one start at a time (e.g. several pytest workers); launch() keeps daemons from holding it
    exec 9>"$STATE/.lock"
    flock -w 300 9 || fail "could not lock $STATE/.lock"

    install_packages
    make_dirs
    write_configs
    if [[ $CHANGED_SLURM == 0 && $CHANGED_DBD == 0 ]] &&
        running_munged >/dev/null && running_mariadbd >/dev/null && running_slurmdbd >/dev/null &&
        running_slurmctld >/dev/null && running_slurmd >/dev/null && node_up; then
        step "cluster '$CLUSTER' already running, node $NODE is $(node_state) ($(elapsed_since "$t0") s)"
        return 0
    fi
    [[ $CHANGED_SLURM == 1 || $CHANGED_DBD == 1 ]] && step "configs written to $ETC (linked from $SLURM_ETC)"
    start_munged
    start_mariadbd
    start_slurmdbd
    register_cluster
    start_slurmctld
    start_slurmd
    wait_node
    step "cluster '$CLUSTER' up in $(elapsed_since "$t0") s (state dir $STATE)"
}

cmd_stop() {
    ensure_root stop
    local t0
    t0=$(now)
    # slurmctld flushes pending accounting records to slurmdbd, which needs MariaDB and munge
    stop_pidfile slurmd "$RUN/slurmd.pid" slurmd 15 slurmctld "$RUN/slurmctld.pid" slurmctld 15
    stop_pidfile slurmdbd "$RUN/slurmdbd.pid" slurmdbd 15
    stop_pidfile mariadbd "$DB_PID" mariadbd 60 munged "$MUNGE_PID" munged 10
    step "stopped ($(elapsed_since "$t0") s)"
}

# The database alone, under the daemons and servers that use it: slurmdbd and the MLflow server
# reconnect when it is back (tests/test_cluster_faults.py). Under the start lock, so that a
# concurrent `start` does not race it.
cmd_stop_db() {
    ensure_root stop-db
    exec 9>"$STATE/.lock"
    flock -w 300 9 || fail "could not lock $STATE/.lock"
    stop_pidfile mariadbd "$DB_PID" mariadbd 60
}

cmd_start_db() {
    ensure_root start-db
    local t0
    t0=$(now)
    exec 9>"$STATE/.lock"
    flock -w 300 9 || fail "could not lock $STATE/.lock"
    [[ -e $DB/.initialized ]] || fail "no MariaDB data dir in $DB_DATA: run start first"
    make_dirs
    start_mariadbd
    step "mariadbd up ($(elapsed_since "$t0") s)"
}

cmd_status() {
    local name pid ok=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if pid=$("running_$name"); then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        else
            printf '%-10s stopped\n' "$name"
        fi
    done
    if running_slurmctld >/dev/null && command -v sinfo >/dev/null 2>&1; then
        local s
        s=$(node_state || true)
        printf '%-10s %s\n' "node" "$NODE ${s:-unknown}"
        sinfo 2>/dev/null || true
        if node_up; then ok=1; fi
    fi
    ((ok)) && return 0
    return 3
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status)
    trap - ERR
    cmd_status || exit $?
    ;;
stop-db) cmd_stop_db ;;
start-db) cmd_start_db ;;
restart-db)
    bash "${BASH_SOURCE[0]}" stop-db
    bash "${BASH_SOURCE[0]}" start-db
    ;;
*)
    echo "usage: $0 start|stop|status|stop-db|start-db|restart-db" >&2
    exit 2
    ;;
esac
