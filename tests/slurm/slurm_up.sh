#!/bin/bash
# A throw-away Slurm cluster on this machine for the tests: slurmctld and N slurmd "nodes" (n1..nN) on 127.0.0.1,
# munge authentication, jobs run as root. Debian's slurm-wlm 22.05 (slurmctld slurmd slurm-client munge).
#   usage: slurm_up.sh DIR [NODES=2] [CPUS_PER_NODE=2] [CTLD_PORT=6817] [SLURMD_PORT0=17001]
#   then:  export SLURM_CONF=DIR/slurm.conf
set -euo pipefail
DIR=$(realpath -m "${1:?dir}"); NN=${2:-2}; CPUS=${3:-2}; CTLD_PORT=${4:-6817}; D0=${5:-17001}
DN=$((D0 + NN - 1)); HOST=$(hostname -s)
mkdir -p "$DIR"/{state,log}
for i in $(seq 1 "$NN"); do mkdir -p "$DIR/spool/n$i" "$DIR/tmp/n$i"; done
if ! munge -n >/dev/null 2>&1; then  # one munged per machine, started once
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
                                   chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi
cat > "$DIR/slurm.conf" <<CONF
ClusterName=pipelinetest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait for the old credential to expire (120 s by default): keep the tests quick
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# a requeued job waits for its begin time and then for a scheduling pass (backfill every 30 s, the main loop every
# 60 s by default): pass every second, and start batch jobs at once, so the tests wait on their jobs, not the queue
SchedulerParameters=bf_interval=1,sched_interval=1,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=$CTLD_PORT
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
NodeName=n[1-$NN] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$D0-$DN] CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF"
for i in $(seq 1 "$NN"); do /usr/sbin/slurmd -f "$SLURM_CONF" -N "n$i"; done
for _ in $(seq 150); do
  [ "$(sinfo -h -t idle -o '%D' 2>/dev/null | head -1)" = "$NN" ] && { echo "slurm up: $NN nodes"; exit 0; }
  sleep 0.2
done
echo "slurm did not come up"; sinfo -N -o '%N %T %E' || true; tail -n 20 "$DIR"/log/*.log; exit 1
