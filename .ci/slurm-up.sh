#!/usr/bin/env bash
# Start a one-node SLURM cluster on loopback for the tests of tests/test_slurm.py (CI; needs root).
#
# Idempotent: installs slurm-wlm and munge with apt-get when missing (Debian 12: Slurm 22.05),
# writes /etc/slurm/slurm.conf (refusing to touch one it did not write), starts munged,
# slurmctld and slurmd unless they already run with the same configuration, and waits, with a
# bound, until the node is idle. No systemd or cgroups here: proctrack/linuxproc, task/none.
# PID 1 does not reap zombies, so a daemon counts as alive by its pid file and /proc, never by pgrep.
#
#   PFL_SLURM_DIR   state, spool, pid and log files (default /var/tmp/pfl-slurm)
#   PFL_SLURM_CPUS  CPUs the node advertises (default 24; SlurmdParameters=config_overrides
#                   lets it claim more than it has, so several 2-4 rank jobs run at once)
#   PFL_SLURM_GPUS  generic GPUs the node advertises (default 2, counted only: no devices), so
#                   the GPU job script can be submitted as it is; torch still sees no GPU
#
# Also: .ci/slurm-up.sh --down stops the daemons it started.
set -euo pipefail

DIR=${PFL_SLURM_DIR:-/var/tmp/pfl-slurm}
CPUS=${PFL_SLURM_CPUS:-24}
GPUS=${PFL_SLURM_GPUS:-2}
CONF=/etc/slurm/slurm.conf
MARK="# written by pfl_mpi .ci/slurm-up.sh"
NODE=$(hostname -s)
WAIT=30 # seconds to wait for each daemon and for the node

say() { echo "slurm-up: $*"; }
die() {
    echo "slurm-up: $*" >&2
    for log in "$DIR"/slurmctld.log "$DIR"/slurmd.log; do
        [[ -f $log ]] && { echo "--- last lines of $log" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}

alive() { # alive PIDFILE: the process named in PIDFILE exists and is not a zombie
    local pid state
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ -r /proc/$pid/status ]] || return 1
    state=$(awk '/^State:/ {print $2}' "/proc/$pid/status")
    [[ $state != Z ]]
}

stop() { # stop PIDFILE: TERM, then KILL after 5 s, of the process in PIDFILE only
    local pid i
    alive "$1" || return 0
    pid=$(<"$1")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do alive "$1" || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

wait_for() { # wait_for WHAT COMMAND...: retry COMMAND every 0.2 s for at most $WAIT seconds
    local what=$1 i
    shift
    for i in $(seq $((WAIT * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up within $WAIT s"
}

MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$DIR/slurmctld.pid
SLURMD_PID=$DIR/slurmd.pid

if [[ ${1:-} == --down ]]; then
    stop "$SLURMD_PID"
    stop "$CTLD_PID"
    stop "$MUNGE_PID"
    say "stopped"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are missing and only root can install them"
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
fi
[[ $(id -u) == 0 ]] || die "the daemons must be started as root"
if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: not touching a real cluster's configuration"
fi

# -- munge: the key, its directories, the daemon (as user munge) --------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! alive "$MUNGE_PID"; then
    rm -f "$MUNGE_PID" /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged
    wait_for munged alive "$MUNGE_PID"
fi
wait_for "munge credentials" bash -c 'munge -n | unmunge'

# -- slurm.conf: one node on loopback -----------------------------------------------------
mkdir -p "$DIR/state" "$DIR/spool"
GRES=""
if ((GPUS > 0)); then GRES=" Gres=gpu:$GPUS"; fi
NEW=$(mktemp)
cat >"$NEW" <<EOF
$MARK: a one-node cluster on loopback for the tests.
ClusterName=pfl
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# No default PMI: the job scripts ask for --mpi=pmi2 themselves, and plain srun starts the
# singletons that pfl-mpi must refuse (tested).
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS${GRES} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# Slurm drops a GPU without a device file: empty regular files stand in for /dev/nvidia*.
mkdir -p "$DIR/dev"
echo "$MARK" >"$DIR/gres.conf.new"
if ((GPUS > 0)); then
    for ((i = 0; i < GPUS; i++)); do touch "$DIR/dev/nvidia$i"; done
    echo "NodeName=$NODE Name=gpu File=$DIR/dev/nvidia[0-$((GPUS - 1))]" >>"$DIR/gres.conf.new"
fi

mkdir -p /etc/slurm
changed=0
if ! cmp -s "$NEW" "$CONF" || ! cmp -s "$DIR/gres.conf.new" /etc/slurm/gres.conf; then
    changed=1
    mv "$NEW" "$CONF"
    mv "$DIR/gres.conf.new" /etc/slurm/gres.conf
    chmod 0644 "$CONF" /etc/slurm/gres.conf
else
    rm -f "$NEW" "$DIR/gres.conf.new"
fi
if ((changed)); then # a new configuration: restart whatever runs with the old one
    stop "$SLURMD_PID"
    stop "$CTLD_PID"
fi

# -- the daemons ----------------------------------------------------------------------------
if ! alive "$CTLD_PID"; then
    say "starting slurmctld"
    slurmctld
    wait_for slurmctld timeout 5 scontrol ping
fi
if ! alive "$SLURMD_PID"; then
    say "starting slurmd"
    slurmd
    wait_for slurmd alive "$SLURMD_PID"
fi

node_state() { timeout 5 sinfo -h -N -n "$NODE" -o %T 2>/dev/null; }
for i in $(seq $((WAIT * 5))); do
    state=$(node_state || true)
    case $state in
    idle | mixed | allocated) break ;;
    down* | drain*) timeout 5 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
[[ $state =~ ^(idle|mixed|allocated)$ ]] || die "node $NODE is '$state', not idle, after $WAIT s"
say "node $NODE is $state: $CPUS CPUs, $GPUS generic GPUs; state and logs in $DIR"
