#!/bin/bash
# Stop what slurm_up.sh DIR started (munged stays: it is shared by the machine).
DIR=$(realpath -m "${1:?dir}")
for f in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
  [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
done
sleep 0.5
exit 0
