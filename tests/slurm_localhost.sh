#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on localhost for the Slurm launcher test (idempotent).
#
# CI (root, Debian 12) runs this before the test suite: it installs Debian's slurmctld, slurmd,
# slurm-client and munge if missing, writes /etc/slurm/slurm.conf for this host, starts munged (as
# user munge), slurmctld and slurmd (as root) unless they already run, and waits until the node is
# idle. Not root and no Slurm: it says so and exits 0 (tests/test_launchers.py then skips, outside CI).
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_localhost: Slurm is not installed and this is not root; skipping the bring-up" >&2
    exit 0
  fi
  echo "slurm_localhost: installing slurmctld slurmd slurm-client munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
  echo "slurm_localhost: not root; using whatever Slurm is already configured" >&2
  exit 0
fi

host=$(hostname -s)
ncpu=$(nproc)
cpus=$(( ncpu < 4 ? 4 : ncpu ))   # the test runs 2 ranks (+ torchrun agents); let small machines oversubscribe
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
conf=/etc/slurm/slurm.conf
cat > "$conf.new" <<CONF
# Written by flux-dist tests/slurm_localhost.sh: one node, this host, for tests only.
ClusterName=fluxdist
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
KillWait=5
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
changed=0
if ! cmp -s "$conf.new" "$conf"; then mv "$conf.new" "$conf"; changed=1; else rm -f "$conf.new"; fi

running() { pgrep -x "$1" >/dev/null; }

if ! running munged; then
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
fi
if ! running slurmctld; then
  /usr/sbin/slurmctld
elif [ "$changed" = 1 ]; then
  scontrol reconfigure || true
fi
if ! running slurmd; then
  /usr/sbin/slurmd
fi

for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  case "$state" in
    idle*|mix*|alloc*) echo "slurm_localhost: node $host is $state" >&2; exit 0 ;;
    down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "slurm_localhost: node $host did not become idle (state: ${state:-none}); see /var/log/slurm/" >&2
tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
