#!/usr/bin/env bash
# Stop the daemons tests/slurm/start.sh STATE_DIR started, by the PIDs it recorded, and nothing
# else; remove the /etc/slurm/slurm.conf it wrote.
set -uo pipefail

state=${1:?usage: $0 STATE_DIR}
state=$(cd "$state" && pwd) || exit 0
conf=/etc/slurm/slurm.conf

alive() {  # in /proc and not a zombie: PID 1 here does not reap orphans
    [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat") != Z ]]
}

# A recorded PID is only signalled while it still runs the daemon it was recorded for.
ours() {
    alive "$1" && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q "$2"
}

if [[ ! -r $state/pids ]]; then
    exit 0
fi

# Reverse start order: slurmd, slurmctld, then munged.
mapfile -t started < <(tac "$state/pids")
for entry in "${started[@]}"; do
    read -r pid name <<<"$entry"
    ours "$pid" "$name" && kill -TERM "$pid"
    for _ in $(seq 1 40); do
        alive "$pid" || break
        sleep 0.25
    done
    ours "$pid" "$name" && kill -KILL "$pid"
done
rm -f "$state/pids"
if [[ -e $conf ]] && [[ $(head -n 1 "$conf") == "# loragrid test cluster, state in $state" ]]; then
    rm -f "$conf"
fi
exit 0
