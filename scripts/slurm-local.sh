#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for trying (and testing) the Slurm fan-out of
# `drllm-train search` / `oracle` (examples/slurm/). Everything it starts lives under one state
# folder (default /var/tmp/drllm-slurm): its own munge key and socket, slurm.conf, spool and
# logs, so it never touches a cluster or munge the machine already runs.
#
#   scripts/slurm-local.sh up        install slurm-wlm and munge (Debian packages) if missing,
#                                    write the config, start munged, slurmctld and slurmd
#   scripts/slurm-local.sh env       print `export SLURM_CONF=...` for sbatch/squeue/sinfo
#   scripts/slurm-local.sh status    sinfo
#   scripts/slurm-local.sh down      stop the daemons (the state folder stays, for the logs)
#
# DRLLM_SLURM_DIR sets the state folder; DRLLM_SLURM_PORT the first of the two ports it uses
# (default 16817). The node offers this machine's cores; jobs are placed per core, memory is
# not tracked. Daemons run as the calling user (root on CI); `up` needs root to install.
set -euo pipefail
dir="${DRLLM_SLURM_DIR:-/var/tmp/drllm-slurm}"
port="${DRLLM_SLURM_PORT:-16817}"
conf="$dir/slurm.conf"
node="$(hostname -s)"

say() { printf '[slurm-local] %s\n' "$*" >&2; }

install() {
  local missing=()
  for b in munged slurmctld slurmd sbatch; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing slurm-wlm and munge (missing: ${missing[*]})"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq slurm-wlm munge >/dev/null
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  local cpus mem_mb user
  cpus="$(nproc)"
  mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
  user="$(id -un)"
  mkdir -p "$dir"/{munge,state,spool,jobs}
  chmod 700 "$dir/munge"
  cat >"$conf" <<EOF
# written by scripts/slurm-local.sh: a one-node cluster on $node
ClusterName=drllm
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
SlurmUser=$user
SlurmdUser=$user
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  install
  down quiet
  write_conf
  # a key of this cluster's own
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$dir/munge/munge.key"
  local force=()
  [ "$(id -u)" -eq 0 ] && force=(--force)
  munged "${force[@]}" --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  rm -rf "$dir/state"/* "$dir/spool"/*
  slurmctld -f "$conf" -i
  slurmd -f "$conf" -N "$node"
  export SLURM_CONF="$conf"
  for _ in $(seq 1 60); do
    if sinfo -h -N -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
      say "up: node $node with $(nproc) cores; export SLURM_CONF=$conf"
      return 0
    fi
    sleep 1
  done
  say "the node did not come up; logs in $dir:"
  tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  return 1
}

down() {
  local quiet="${1:-}"
  for f in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    if pid_alive "$f"; then
      kill "$(cat "$f")" 2>/dev/null || true
      for _ in $(seq 1 50); do pid_alive "$f" || break; sleep 0.1; done
      pid_alive "$f" && kill -9 "$(cat "$f")" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  [ -z "$quiet" ] && say "down (logs in $dir)"
  return 0
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$conf" ;;
  status) SLURM_CONF="$conf" sinfo ;;
  *)
    echo "usage: $0 up|down|env|status" >&2
    exit 2
    ;;
esac
