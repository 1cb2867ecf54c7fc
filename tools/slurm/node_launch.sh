#!/usr/bin/env bash
# One torchrun per node: started by srun (one task per node) from tools/slurm/train.sbatch.
#
#     srun --ntasks-per-node=1 tools/slurm/node_launch.sh CONFIG [--key=value ...]
#
# The c10d rendezvous is taken from SLURM's variables, so every node runs the same line:
#   endpoint  the first host of SLURM_JOB_NODELIST (RDZV_HOST overrides it, e.g. with the
#             name of a faster interface), port RDZV_PORT (default 20000 + SLURM_JOB_ID % 20000,
#             so that two jobs whose first node is the same do not collide)
#   nodes     SLURM_NNODES;  rendezvous id  SLURM_JOB_ID
# Settings from the environment:
#   NPROC_PER_NODE  processes per node (default SLURM_GPUS_ON_NODE, else "gpu": every visible GPU)
#   MAX_RESTARTS    torchrun's --max-restarts (default 3): a failed worker restarts the group,
#                   which resumes from the newest checkpoint by itself
#   PYTHON          the interpreter of the environment that has torch (default python)
# A requeued job (SLURM_RESTART_COUNT > 0) continues its run: --resume=True is appended.
# SIGTERM / SIGINT are passed on to torchrun, which passes them on to its workers: train.py
# then writes a checkpoint at the next step and exits.
set -uo pipefail

# The first host of a SLURM node list: "gpu[003-005,009],cpu1" -> gpu003. scontrol expands
# every list SLURM can write; without it (containers, tests) the first entry is expanded here.
first_host() {
    local list=$1
    if command -v scontrol >/dev/null 2>&1; then
        local hosts
        if hosts=$(scontrol show hostnames "$list" 2>/dev/null) && [[ -n $hosts ]]; then
            echo "${hosts%%$'\n'*}"
            return
        fi
    fi
    local first="" depth=0 i ch
    for ((i = 0; i < ${#list}; i++)); do  # up to the first comma outside brackets
        ch=${list:i:1}
        case $ch in
            '[') depth=$((depth + 1)) ;;
            ']') depth=$((depth - 1)) ;;
            ',') ((depth == 0)) && break ;;
        esac
        first+=$ch
    done
    local group='^([^[]*)\[([^],-]+)[^]]*\](.*)$'  # prefix[first-range,...]rest
    while [[ $first =~ $group ]]; do  # every bracket group becomes its first value (zeros kept)
        first="${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
    done
    echo "$first"
}

main() {
    local missing=()
    for name in SLURM_JOB_NODELIST SLURM_NNODES SLURM_JOB_ID; do
        [[ -n ${!name:-} ]] || missing+=("$name")
    done
    if ((${#missing[@]})); then
        echo "error: ${missing[*]} not set: start this script with srun inside a SLURM job (tools/slurm/train.sbatch)" >&2
        return 2
    fi
    local repo host port nproc
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    host=${RDZV_HOST:-$(first_host "$SLURM_JOB_NODELIST")}
    port=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-gpu}}
    local resume=()
    if ((${SLURM_RESTART_COUNT:-0} > 0)); then
        resume=(--resume=True)
    fi
    echo "node ${SLURM_NODEID:-?}: torchrun --nnodes=$SLURM_NNODES --nproc-per-node=$nproc rendezvous $host:$port id $SLURM_JOB_ID ${resume[*]}"

    "${PYTHON:-python}" -m torch.distributed.run \
        --nnodes="$SLURM_NNODES" --nproc-per-node="$nproc" \
        --rdzv-backend=c10d --rdzv-endpoint="$host:$port" --rdzv-id="$SLURM_JOB_ID" \
        --max-restarts="${MAX_RESTARTS:-3}" \
        "$repo/train.py" "$@" "${resume[@]}" &
    local torchrun=$!
    trap 'kill -TERM "$torchrun" 2>/dev/null' TERM INT
    local rc=0
    wait "$torchrun" || rc=$?
    while kill -0 "$torchrun" 2>/dev/null; do  # a signal interrupted wait: wait for torchrun itself
        rc=0
        wait "$torchrun" || rc=$?
    done
    return "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
    exit $?
fi
