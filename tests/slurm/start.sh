#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine for the SLURM workflow test.
#
# Usage: tests/slurm/start.sh STATE_DIR
# Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (as root),
# writes /etc/slurm/slurm.conf (from slurm.conf.in beside this script; the job steps Snakemake
# runs inside a job drop SLURM_CONF with every other SLURM_* variable, so only the default path
# reaches them) and starts munged, slurmctld and slurmd, each in its foreground mode, in the
# background, writing their PIDs to STATE_DIR/pids. tests/slurm/stop.sh STATE_DIR stops exactly
# those PIDs and removes the config.
#
# Works without systemd and without cgroups (proctrack/linuxproc, task/none) and without
# slurmdbd (no accounting: job states come from squeue, kept for MinJobAge seconds).
# Exit status 3 means the cluster cannot run here (not root, the packages cannot be installed, or
# the machine has a SLURM config of its own, which this script never replaces).
set -euo pipefail

state=${1:?usage: $0 STATE_DIR}
mkdir -p "$state"
state=$(cd "$state" && pwd)
here=$(cd "$(dirname "$0")" && pwd)

if [[ $(id -u) -ne 0 ]]; then
    echo "start.sh: the daemons need root (munged as the munge user, slurmd as root)" >&2
    exit 3
fi

packages=(slurmctld slurmd slurm-client munge)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confold)
    if ! "${apt[@]}" install -y "${packages[@]}" >"$state/apt.log" 2>&1; then
        "${apt[@]}" update >>"$state/apt.log" 2>&1 \
            && "${apt[@]}" install -y "${packages[@]}" >>"$state/apt.log" 2>&1 \
            || { echo "start.sh: could not install ${packages[*]}; see $state/apt.log" >&2; exit 3; }
    fi
fi

# A daemon is alive when /proc has it and it is not a zombie (PID 1 here does not reap orphans).
alive() {
    [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat") != Z ]]
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "start.sh: $what did not come up; logs in $state" >&2
            return 1
        fi
        sleep 0.5
    done
}

conf=/etc/slurm/slurm.conf
marker="# loragrid test cluster, state in $state"
if [[ -e $conf ]]; then
    previous=$(head -n 1 "$conf")
    if [[ $previous != "# loragrid test cluster, state in "* ]]; then
        echo "start.sh: $conf exists and is not a loragrid test config; not touching this machine's SLURM" >&2
        exit 3
    fi
    # An earlier test run that died before its teardown: stop the daemons it recorded.
    "$here/stop.sh" "${previous#\# loragrid test cluster, state in }"
fi

host=$(hostname -s)
# RealMemory no higher than slurmd measures: more would leave the node drained.
memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
mkdir -p "$state/spool" "$state/ctld"
: >"$state/pids"
mkdir -p /etc/slurm
{
    echo "$marker"
    sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" -e "s|@MEMORY@|$memory|g" "$here/slurm.conf.in"
} >"$conf"

# munged: its key comes with the package; it runs as the munge user, with its socket in /run/munge.
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    setpriv --reuid munge --regid munge --init-groups /usr/sbin/munged --foreground \
        </dev/null >"$state/munged.log" 2>&1 &
    echo "$! munged" >>"$state/pids"
    wait_for 20 munged sh -c 'munge -n </dev/null | unmunge'
fi

/usr/sbin/slurmctld -D </dev/null >"$state/slurmctld.out" 2>&1 &
echo "$! slurmctld" >>"$state/pids"
wait_for 30 slurmctld scontrol ping

/usr/sbin/slurmd -D -N "$host" </dev/null >"$state/slurmd.out" 2>&1 &
echo "$! slurmd" >>"$state/pids"
node_idle() { sinfo --noheader --nodes "$host" --format %t | grep -qx 'idle'; }
wait_for 60 "node $host" node_idle

while read -r pid name; do
    alive "$pid" || { echo "start.sh: $name (pid $pid) died; logs in $state" >&2; exit 1; }
done <"$state/pids"
echo "SLURM cluster up: $(sinfo --noheader --summarize)"
