#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the integration tests and for trying the cluster path.
#
#   scripts/slurm_localhost.sh up       install (apt-get, when missing) and start it; prints `export SLURM_CONF=...`
#   scripts/slurm_localhost.sh status   which daemons run, and sinfo
#   scripts/slurm_localhost.sh down     cancel its jobs and stop exactly the daemons that `up` started
#
# Needs root (slurmd runs jobs as their user, munged wants /run/munge). Installs Debian's slurmctld,
# slurmd, slurm-client and munge, plus slurmdbd, slurm-wlm-mysql-plugin and MariaDB so that `sacct`
# works (submitit reads job states with sacct); SLURM_LOCALHOST_ACCOUNTING=0 leaves those out.
# Nothing under /etc/slurm is written: the configuration, state, spool, logs and PID files live in
# $SLURM_LOCALHOST_DIR (default /tmp/slurm-localhost), and clients find it through SLURM_CONF.
# The daemons listen on 127.0.0.1 ports $SLURM_LOCALHOST_PORT.. +2 (default 16817..16819), away
# from a system Slurm's defaults; MariaDB listens on a Unix socket only.
#
# Exit status: 0 on success; 3 when Slurm is missing and cannot be installed here (not root, no
# apt-get, or the install failed); 1 when a daemon did not start (its log is printed).
set -euo pipefail

DIR=${SLURM_LOCALHOST_DIR:-/tmp/slurm-localhost}
PORT=${SLURM_LOCALHOST_PORT:-16817}
ACCOUNTING=${SLURM_LOCALHOST_ACCOUNTING:-1}
WAIT_S=${SLURM_LOCALHOST_WAIT_S:-60}
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
SBIN=/usr/sbin
CORE_PKGS=(slurmctld slurmd slurm-client munge)
DB_PKGS=(slurmdbd slurm-wlm-mysql-plugin mariadb-server-core mariadb-client-core)
MUNGE_SOCKET=/run/munge/munge.socket.2

log() { printf 'slurm_localhost: %s\n' "$*" >&2; }
die() { local code=$1; shift; log "$*"; exit "$code"; }

case "$DIR" in
    /*) ;;
    *) die 1 "SLURM_LOCALHOST_DIR must be an absolute path, got '$DIR'" ;;
esac
case "$DIR" in
    *[[:space:]]*) die 1 "SLURM_LOCALHOST_DIR must not contain whitespace (slurm.conf cannot hold it): '$DIR'" ;;
esac

# --------------------------------------------------------------------------- processes we own
# Each daemon runs in the foreground (-D / -F), started with `setsid` (which execs, so $! is the
# daemon itself) and detached from our stdio; its PID and command name go to $DIR/pids/<name>.
alive() {  # alive NAME: the recorded process still runs and is still the program we started
    local f=$DIR/pids/$1 pid comm
    [[ -f $f ]] || return 1
    read -r pid comm < "$f" || return 1
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

pid_of() { local pid comm; read -r pid comm < "$DIR/pids/$1"; echo "$pid"; }

start() {  # start NAME COMM CMD...: run CMD detached, record its PID under NAME (COMM: its /proc comm)
    local name=$1 comm=${2:0:15} pid i; shift 2
    setsid "$@" < /dev/null > "$DIR/log/$name.out" 2>&1 &
    pid=$!
    echo "$pid $comm" > "$DIR/pids/$name"
    # until the exec chain (bash -> setsid -> [setpriv ->] daemon) has reached the daemon
    for ((i = 0; i < 100; i++)); do
        [[ $(cat "/proc/$pid/comm" 2> /dev/null) == "$comm" ]] && return 0
        [[ -e /proc/$pid ]] || break
        sleep 0.05
    done
    log "$name did not start; its output:"
    tail -n 30 "$DIR/log/$name.out" >&2 || true
    return 1
}

stop() {  # stop [GRACE_S] NAME...: SIGTERM to all, then SIGKILL to those still running after GRACE_S seconds
    local grace=$1 name pid i t0=$EPOCHREALTIME; shift
    local -a running=()
    for name in "$@"; do
        if alive "$name"; then
            running+=("$name")
            kill -TERM "$(pid_of "$name")" 2> /dev/null || true
        else
            rm -f "$DIR/pids/$name"
        fi
    done
    for ((i = 0; i < grace * 10; i++)); do
        local left=0
        for name in "${running[@]}"; do alive "$name" && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for name in "${running[@]}"; do
        pid=$(pid_of "$name")
        if alive "$name"; then
            log "$name (pid $pid) still runs ${grace}s after SIGTERM: SIGKILL"
            kill -KILL "$pid" 2> /dev/null || true
            for ((i = 0; i < 50; i++)); do alive "$name" || break; sleep 0.1; done
        fi
        log "stopped $name (pid $pid) in $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}") s"
        rm -f "$DIR/pids/$name"
    done
}

wait_for() {  # wait_for NAME SECONDS CMD...: until CMD succeeds; fail with NAME's log if NAME died
    local name=$1 secs=$2 i; shift 2
    for ((i = 0; i < secs * 10; i++)); do
        if "$@" > /dev/null 2>&1; then return 0; fi
        if ! alive "$name"; then
            log "$name exited; its log:"
            tail -n 30 "$DIR/log/$name.out" "$DIR/log/$name.log" 2> /dev/null >&2 || true
            return 1
        fi
        sleep 0.1
    done
    log "$name did not become ready within ${secs}s; its log:"
    tail -n 30 "$DIR/log/$name.out" "$DIR/log/$name.log" 2> /dev/null >&2 || true
    return 1
}

# --------------------------------------------------------------------------- install
have_slurm() { [[ -x $SBIN/slurmctld && -x $SBIN/slurmd && -x $SBIN/munged ]] && command -v sbatch > /dev/null; }
have_db() {
    [[ -x $SBIN/slurmdbd && -x $SBIN/mariadbd ]] && command -v mariadb-install-db > /dev/null \
        && compgen -G "/usr/lib/*/slurm-wlm/accounting_storage_mysql.so" > /dev/null
}

install() {
    local pkgs=()
    have_slurm || pkgs+=("${CORE_PKGS[@]}")
    if [[ $ACCOUNTING == 1 ]] && ! have_db; then pkgs+=("${DB_PKGS[@]}"); fi
    ((${#pkgs[@]})) || return 0
    [[ $(id -u) == 0 ]] || die 3 "Slurm is not installed and installing it needs root (missing: ${pkgs[*]})"
    command -v apt-get > /dev/null || die 3 "Slurm is not installed and there is no apt-get to install ${pkgs[*]}"
    log "installing ${pkgs[*]} (apt-get)"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # `apt-get update` only when the package lists do not know the packages yet
    if ! apt-cache show "${pkgs[@]}" > /dev/null 2>&1; then
        timeout 300 apt-get update -q < /dev/null > "$DIR/log/apt.log" 2>&1 \
            || { tail -n 20 "$DIR/log/apt.log" >&2; die 3 "apt-get update failed"; }
    fi
    # policy-rc.d: the packages' maintainer scripts must not start system services of their own
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && created_policy=1
    fi
    local rc=0 apt_install=(timeout 900 apt-get install -y -q --no-install-recommends
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${pkgs[@]}")
    "${apt_install[@]}" < /dev/null >> "$DIR/log/apt.log" 2>&1 || rc=$?
    if ((rc)); then  # stale package lists (a newer version replaced the listed one): update once, retry
        rc=0
        timeout 300 apt-get update -q < /dev/null >> "$DIR/log/apt.log" 2>&1 || true
        "${apt_install[@]}" < /dev/null >> "$DIR/log/apt.log" 2>&1 || rc=$?
    fi
    ((created_policy)) && rm -f "$policy"
    if ((rc)); then
        tail -n 20 "$DIR/log/apt.log" >&2
        die 3 "apt-get install ${pkgs[*]} failed (exit $rc)"
    fi
    log "installed in $((SECONDS - t0)) s"
}

# --------------------------------------------------------------------------- configuration
write_conf() {
    local cpus mem
    cpus=$(nproc)
    # RealMemory as slurmd measures it, less 5% so that the node is never drained for "low memory"
    mem=$($SBIN/slurmd -C 2> /dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [[ -n $mem ]] || mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    mem=$((mem * 95 / 100))
    mkdir -p "$DIR"/{etc,state,spool,log,pids,run}
    chmod 755 "$DIR" "$DIR"/{etc,state,spool,log,run}
    {
        echo "# Written by scripts/slurm_localhost.sh: a single-node Slurm for tests."
        echo "ClusterName=localhost"
        echo "SlurmctldHost=localhost(127.0.0.1)"
        echo "SlurmctldPort=$PORT"
        echo "SlurmdPort=$((PORT + 1))"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # a requeued job may start again after cred_expire seconds (default 120: too slow for tests)
        echo "AuthInfo=cred_expire=5"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool/slurmd-%n"
        echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd.log"
        echo "SlurmctldDebug=info"
        echo "SlurmdDebug=info"
        echo "MailProg=/bin/true"
        echo "ProctrackType=proctrack/pgid"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "MpiDefault=none"
        echo "SwitchType=switch/none"
        echo "SchedulerType=sched/backfill"
        # schedule every second (defaults: 60 s, backfill 30 s), so that requeued and dependent jobs start at once
        echo "SchedulerParameters=sched_interval=1,bf_interval=1"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "ReturnToService=2"
        echo "MaxArraySize=10001"
        echo "MinJobAge=600"
        echo "KillWait=5"
        echo "InactiveLimit=0"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=60"
        echo "MessageTimeout=20"
        echo "JobRequeue=1"
        if [[ $ACCOUNTING == 1 ]]; then
            echo "AccountingStorageType=accounting_storage/slurmdbd"
            echo "AccountingStorageHost=localhost"
            echo "AccountingStoragePort=$((PORT + 2))"
            echo "JobCompType=jobcomp/none"
        else
            echo "AccountingStorageType=accounting_storage/none"
        fi
        echo "FirstJobId=$FIRST_JOB_ID"
        echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        echo "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF"
    chmod 644 "$CONF"
    if [[ $ACCOUNTING == 1 ]]; then
        local dbd=$DIR/etc/slurmdbd.conf
        {
            echo "AuthType=auth/munge"
            echo "DbdHost=localhost"
            echo "DbdAddr=127.0.0.1"
            echo "DbdPort=$((PORT + 2))"
            echo "SlurmUser=root"
            echo "PidFile=$DIR/run/slurmdbd.pid"
            echo "LogFile=$DIR/log/slurmdbd.log"
            echo "DebugLevel=info"
            echo "StorageType=accounting_storage/mysql"
            echo "StorageHost=localhost"
            echo "StorageUser=root"
            echo "StorageLoc=slurm_acct_db"
        } > "$dbd"
        chmod 600 "$dbd"  # slurmdbd insists
    fi
    printf 'export SLURM_CONF=%s\n' "$CONF" > "$DIR/env"
}

# --------------------------------------------------------------------------- daemons
munge_works() { munge -n -S "$MUNGE_SOCKET" < /dev/null 2> /dev/null | unmunge -S "$MUNGE_SOCKET" > /dev/null 2>&1; }

start_munge() {
    if munge_works; then
        log "munged already runs (not ours; left alone)"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey > /dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # setpriv execs munged as the munge user (no extra process in between, so the PID is munged's)
    start munged munged setpriv --reuid=munge --regid=munge --init-groups $SBIN/munged -F --socket="$MUNGE_SOCKET"
    wait_for munged 10 munge_works
}

db_socket=""
# a throw-away database: small, and no fsync (much faster to create on slow disks)
FIRST_JOB_ID=1
DB_FLAGS=(--skip-name-resolve --innodb-buffer-pool-size=32M --innodb-log-file-size=8M --innodb-flush-method=nosync
    --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --innodb-use-native-aio=0)
start_db() {
    local data=$DIR/mysql
    db_socket=$DIR/run/mysqld.sock
    if [[ ! -d $data/mysql ]]; then
        rm -rf "$data"
        mariadb-install-db --no-defaults --user=root --datadir="$data" --auth-root-authentication-method=normal \
            --skip-test-db "${DB_FLAGS[@]}" > "$DIR/log/mariadb-install.log" 2>&1 \
            || { tail -n 20 "$DIR/log/mariadb-install.log" >&2; die 1 "mariadb-install-db failed"; }
    fi
    start mariadbd mariadbd $SBIN/mariadbd --no-defaults --user=root --datadir="$data" --socket="$db_socket" \
        --skip-networking --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
        --performance-schema=OFF "${DB_FLAGS[@]}"
    wait_for mariadbd 30 mariadb --no-defaults --socket="$db_socket" -u root -e "SELECT 1"
    # slurmdbd's MySQL client finds the socket through MYSQL_UNIX_PORT
    export MYSQL_UNIX_PORT=$db_socket
    start slurmdbd slurmdbd $SBIN/slurmdbd -D
    unset MYSQL_UNIX_PORT
    wait_for slurmdbd 30 sacctmgr -i -n list cluster
}

node_idle() { [[ $(sinfo -h -N -n localhost -o %T 2> /dev/null) == idle ]]; }
node_up() { [[ $(sinfo -h -N -n localhost -o %T 2> /dev/null) =~ ^(idle|mixed|allocated|completing)$ ]]; }

up() {
    mkdir -p "$DIR"/{log,pids}
    if alive slurmctld && alive slurmd && node_up; then
        log "already up"
        cat "$DIR/env"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die 3 "starting a local Slurm needs root (slurmd, /run/munge); you are $(id -un)"
    install
    have_slurm || die 3 "Slurm is still missing after the install"
    if [[ $ACCOUNTING == 1 ]] && ! have_db; then
        log "slurmdbd/MariaDB missing: running without accounting (no sacct)"
        ACCOUNTING=0
    fi
    # leftovers of an earlier run that was not taken down
    stop_all quiet
    local t0=$SECONDS
    # a fresh controller state every time (no jobs or node states of an earlier run)
    rm -rf "$DIR/state" "$DIR/spool"
    FIRST_JOB_ID=1
    write_conf
    start_munge
    if [[ $ACCOUNTING == 1 ]]; then
        start_db
        # the database outlives `down`: continue its job ids, so that `sacct -j ID` never finds an
        # older job of an earlier run under the id of a new one
        local last
        last=$(mariadb --no-defaults --socket="$db_socket" -u root -N -B \
            -e "SELECT COALESCE(MAX(id_job), 0) FROM slurm_acct_db.localhost_job_table" 2> /dev/null || echo 0)
        FIRST_JOB_ID=$((${last:-0} + 1))
        write_conf
    fi
    start slurmctld slurmctld $SBIN/slurmctld -D -f "$CONF"
    wait_for slurmctld 30 scontrol ping
    start slurmd slurmd $SBIN/slurmd -D -N localhost -f "$CONF"
    if ! wait_for slurmd "$WAIT_S" node_idle; then
        sinfo -N -l >&2 || true
        die 1 "the node did not become idle"
    fi
    log "up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N %T %c CPUs %m MB')"
    cat "$DIR/env"
}

stop_all() {
    local quiet=${1:-}
    if [[ -f $CONF ]] && alive slurmctld; then
        # cancel our own cluster's jobs first so that no slurmstepd outlives slurmd
        local ids
        # a slurmctld too busy to answer lists nothing here (the daemons are stopped all the same)
        ids=$(SLURM_CONF=$CONF squeue -h -o %A 2> /dev/null | sort -u | tr '\n' ' ') || ids=""
        if [[ -n ${ids// /} ]]; then
            [[ -n $quiet ]] || log "cancelling jobs $ids"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $ids 2> /dev/null || true
            local i
            for ((i = 0; i < 100; i++)); do
                [[ -z $(SLURM_CONF=$CONF squeue -h -t R,CG -o %A 2> /dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi
    # all Slurm daemons at once; a slurmd that hangs once slurmctld is gone is ended with SIGKILL
    # after the grace time. The database after slurmdbd, munged last.
    stop 10 slurmd slurmctld slurmdbd
    stop 30 mariadbd
    stop 5 munged
}

status() {
    local name any=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$name"; then
            echo "$name: running (pid $(pid_of "$name"))"
            any=1
        else
            echo "$name: not running (or not started by this script)"
        fi
    done
    if [[ -f $CONF ]] && ((any)); then
        echo "SLURM_CONF=$CONF"
        SLURM_CONF=$CONF sinfo -N -l || true
    fi
}

case "${1:-}" in
    up) up ;;
    down) stop_all; log "down" ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
