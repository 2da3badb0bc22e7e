#!/usr/bin/env bash
# A throw-away single-node Slurm cluster for the tests, reachable on loopback only.
#
#   eval "$(.ci/slurm.sh start)"   # prints: export LSSTPIPE_SLURM_DIR=… SLURM_CONF=… LSSTPIPE_SLURM=1
#   .ci/slurm.sh status [DIR]      # exit 0 and sinfo's line when the cluster answers, 1 otherwise
#   .ci/slurm.sh stop [DIR]        # DIR defaults to $LSSTPIPE_SLURM_DIR; a DIR already gone is not an error
#
# start: installs Debian's slurmctld, slurmd, slurm-client and munge if they are missing (without letting
# the packages start their own daemons); writes slurm.conf for one node named after `hostname -s` with this
# machine's CPU count (LSSTPIPE_SLURM_CPUS overrides it) and memory, in a new directory under
# ${LSSTPIPE_SLURM_PARENT:-/tmp}; generates a munge key; starts munged, slurmctld and slurmd as root, every
# socket bound to the host name's loopback address (CommunicationParameters=NoCtldInAddrAny,NoInAddrAny);
# waits until sinfo shows the node idle; writes the export lines to DIR/env.sh and prints them on stdout.
# A second start while a cluster made by this script still answers prints that cluster's lines again.
# stop cancels the jobs still queued or running, stops the three daemons and removes the directory.
# No cgroups (this may be a container): proctrack/linuxproc, task/none, no accounting (use
# `scontrol show job` or `sbatch --wait`'s exit status, not sacct). Completed jobs stay visible for 5 min.
# Everything but the export lines goes to stderr, so that stdout can be eval'ed.
set -euo pipefail

MARKER=.lsstpipe-test-slurm
PARENT=${LSSTPIPE_SLURM_PARENT:-/tmp}
PACKAGES=(slurmctld slurmd slurm-client munge)
COMMANDS=(slurmctld slurmd munged mungekey sinfo scontrol sbatch srun squeue scancel)

say() { echo "slurm.sh: $*" >&2; }

have_all() {
    local c
    for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null || return 1; done
}

install_slurm() {
    say "Slurm/munge commands missing: installing Debian's ${PACKAGES[*]}"
    [[ $(id -u) -eq 0 ]] || { say "run as root to install ${PACKAGES[*]}, or install them yourself"; exit 1; }
    # The packages would start system-wide daemons (munged with /etc/munge's key): we run only ours.
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added=1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confold "${PACKAGES[@]}" >&2 || { [[ $added -eq 0 ]] || rm -f "$policy"; exit 1; }
    [[ $added -eq 0 ]] || rm -f "$policy"
    have_all || { say "installed ${PACKAGES[*]} but some of ${COMMANDS[*]} are still missing"; exit 1; }
}

free_ports() {  # N distinct free TCP ports on 127.0.0.1
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

plugin_dir() {
    local f
    f=$(find /usr/lib /usr/lib64 /usr/local/lib -maxdepth 3 -name 'mpi_pmi2.so' -path '*slurm*' 2>/dev/null | head -n 1)
    [[ -n "$f" ]] && dirname "$f"
}

show_logs() {
    local dir=$1 f
    for f in "$dir"/log/*.log; do
        [[ -s "$f" ]] || continue
        echo "---- last lines of $f" >&2
        tail -n 15 "$f" >&2
    done
}

alive() {  # alive DIR NAME: the daemon NAME of DIR has a pid file and its process runs
    local pidfile=$1/run/$2.pid pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -d /proc/$pid ]]
}

answers() {  # answers DIR: all three daemons run and the node is usable
    local dir=$1 state
    [[ -e $dir/$MARKER && -f $dir/slurm.conf ]] || return 1
    alive "$dir" munged && alive "$dir" slurmctld && alive "$dir" slurmd || return 1
    state=$(SLURM_CONF=$dir/slurm.conf timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n 1) || return 1
    [[ $state == idle || $state == mixed || $state == allocated || $state == completing ]]
}

running_cluster() {  # a live cluster made by this script: $LSSTPIPE_SLURM_DIR first, else any under PARENT
    local d
    for d in ${LSSTPIPE_SLURM_DIR:-} "$PARENT"/lsstpipe-slurm.*; do
        [[ -n "$d" && -e "$d/$MARKER" ]] || continue
        if answers "$d"; then echo "$d"; return 0; fi
    done
    return 1
}

write_conf() {
    local dir=$1 host=$2 cpus=$3 mem=$4 ctld_port=$5 slurmd_port=$6 mpi=$7
    cat >"$dir/slurm.conf" <<EOF
# Written by .ci/slurm.sh for the lsstpipe tests: one node, loopback only, no cgroups, no accounting.
ClusterName=lsstpipe-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/run/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MailProg=/bin/true
MpiDefault=$mpi
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=lsstpipe Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    local dir host addr cpus mem ctld_port slurmd_port mpi plugins state
    if dir=$(running_cluster); then
        say "a cluster made by this script already answers in $dir: reusing it"
        cat "$dir/env.sh"
        return 0
    fi
    have_all || install_slurm
    host=$(hostname -s)
    # NoInAddrAny binds every socket to the address the host name resolves to: it must be loopback.
    addr=$(getent ahostsv4 "$host" | awk 'NR == 1 {print $1}')
    [[ $addr == 127.* ]] || {
        say "host name $host resolves to '${addr:-nothing}', not a loopback address: Slurm would listen beyond"
        say "loopback. Add '127.0.0.1 $host' to /etc/hosts (or run in a network namespace) and start again."
        exit 1
    }
    cpus=${LSSTPIPE_SLURM_CPUS:-$(nproc)}
    [[ $cpus =~ ^[1-9][0-9]*$ ]] || { say "LSSTPIPE_SLURM_CPUS must be a positive integer, not '$cpus'"; exit 1; }
    # Slurm's RealMemory is in MiB; keep 5 % back so that the node is never drained for "Low RealMemory".
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    plugins=$(plugin_dir || true)
    if [[ -n "$plugins" ]]; then mpi=pmi2; else mpi=none; say "no mpi_pmi2.so found: MpiDefault=none"; fi

    dir=$(mktemp -d "$PARENT/lsstpipe-slurm.XXXXXX")
    touch "$dir/$MARKER"
    # A start that fails half-way leaves no daemon and no directory behind.
    trap 'say "start failed: cleaning up"; stop "$dir" || true' EXIT
    chmod 700 "$dir"
    mkdir -p "$dir"/{run,log,state,spool}
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$dir/munge.key" >&2
    else
        (umask 077 && head -c 1024 /dev/urandom >"$dir/munge.key")
    fi
    chmod 400 "$dir/munge.key"
    # --force: munged otherwise refuses to run as root.
    munged --force --key-file="$dir/munge.key" --socket="$dir/run/munge.socket" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed" ||
        { show_logs "$dir"; say "munged did not start"; exit 1; }
    for _ in $(seq 1 50); do
        munge -S "$dir/run/munge.socket" -n 2>/dev/null | unmunge -S "$dir/run/munge.socket" >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -S "$dir/run/munge.socket" -n | unmunge -S "$dir/run/munge.socket" >/dev/null ||
        { show_logs "$dir"; say "munge does not answer on $dir/run/munge.socket"; exit 1; }

    read -r ctld_port slurmd_port <<<"$(free_ports 2)"
    write_conf "$dir" "$host" "$cpus" "$mem" "$ctld_port" "$slurmd_port" "$mpi"
    export SLURM_CONF=$dir/slurm.conf
    # -c: no state from an earlier cluster. Both daemons fork into the background once started.
    slurmctld -c >&2 || { show_logs "$dir"; say "slurmctld did not start"; exit 1; }
    slurmd >&2 || { show_logs "$dir"; say "slurmd did not start"; exit 1; }
    state=""
    for _ in $(seq 1 120); do
        state=$(timeout 10 sinfo -h -N -n "$host" -o '%T' 2>/dev/null | head -n 1 || true)
        [[ $state == idle ]] && break
        alive "$dir" slurmctld && alive "$dir" slurmd || { sleep 0.5; alive "$dir" slurmctld && alive "$dir" slurmd; } ||
            { show_logs "$dir"; say "a Slurm daemon exited during start-up"; exit 1; }
        sleep 0.5
    done
    [[ $state == idle ]] || {
        show_logs "$dir"
        say "node $host is '${state:-not reported}' after 60 s, not idle; see the logs in $dir/log"
        exit 1
    }
    check_loopback "$dir" || exit 1
    (umask 077 && printf 'export LSSTPIPE_SLURM_DIR=%s\nexport SLURM_CONF=%s\nexport LSSTPIPE_SLURM=1\n' \
        "$dir" "$dir/slurm.conf" >"$dir/env.sh")
    say "Slurm $(sinfo -V | awk '{print $2}') on $host (127.0.0.1:$ctld_port), $cpus CPUs, ${mem} MiB," \
        "MpiDefault=$mpi, files in $dir"
    trap - EXIT
    cat "$dir/env.sh"
    echo "# written to $dir/env.sh"
}

check_loopback() {  # no socket of our daemons listens beyond loopback (skipped when ss is missing)
    local dir=$1 pids bad
    command -v ss >/dev/null || return 0
    pids=$(cat "$dir"/run/*.pid 2>/dev/null | paste -sd '|')
    bad=$(ss -Hltnup 2>/dev/null | grep -E "pid=($pids)," | awk '{print $5}' | grep -vE '^(127\.|\[::1\]|localhost)' || true)
    [[ -z "$bad" ]] || { say "a Slurm daemon listens beyond loopback on: $bad"; return 1; }
}

stop() {
    local dir=${1:-${LSSTPIPE_SLURM_DIR:-}} name pid jobs pids
    [[ -n "$dir" ]] || { say "stop: give the directory (or set LSSTPIPE_SLURM_DIR)"; exit 1; }
    [[ -e "$dir" ]] || { say "stop: $dir does not exist: nothing to stop"; return 0; }
    [[ -e "$dir/$MARKER" ]] || { say "stop: $dir is not a directory made by 'slurm.sh start'; not touching it"; exit 1; }
    if alive "$dir" slurmctld; then
        # Cancel what still runs, so that no job step outlives its slurmd.
        jobs=$(SLURM_CONF=$dir/slurm.conf timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [[ -n "$jobs" ]]; then
            say "cancelling jobs still queued or running: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            SLURM_CONF=$dir/slurm.conf timeout 10 scancel $jobs >&2 || true
            for _ in $(seq 1 30); do
                [[ -z $(SLURM_CONF=$dir/slurm.conf timeout 10 squeue -h -o %i 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    # All three at once (each takes about 2 s to exit); SIGKILL for any still there after 5 s.
    pids=()
    for name in slurmd slurmctld munged; do
        alive "$dir" "$name" || continue
        pid=$(<"$dir/run/$name.pid")
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
        [[ -d /proc/$pid ]] && { say "process $pid ignores SIGTERM: killing it"; kill -KILL "$pid" 2>/dev/null || true; }
    done
    rm -rf -- "$dir"
    say "stopped and removed $dir"
}

status() {
    local dir=${1:-${LSSTPIPE_SLURM_DIR:-}}
    if [[ -z "$dir" ]]; then
        dir=$(running_cluster) || { say "no cluster made by this script answers under $PARENT"; return 1; }
    fi
    [[ -e "$dir" ]] || { say "status: $dir does not exist (stopped?)"; return 1; }
    [[ -e "$dir/$MARKER" ]] || { say "status: $dir is not a directory made by 'slurm.sh start'"; return 1; }
    if answers "$dir"; then
        SLURM_CONF=$dir/slurm.conf sinfo -N >&2
        echo "$dir"
    else
        say "the cluster in $dir does not answer"
        show_logs "$dir"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    status) status "${2:-}" ;;
    *) echo "usage: $0 start | stop [DIR] | status [DIR]" >&2; exit 2 ;;
esac
