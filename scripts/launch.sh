#!/usr/bin/env bash
# Multi-GPU launcher for any elm stage through torchrun (single node, or multi-node via rendezvous).
#
#   scripts/launch.sh <stage> [hydra overrides...]      stage: search | retrain | finetune | distill_task
#
# Environment: NPROC (GPUs per node, default: all visible), NNODES (default 1), NODE_RANK (0),
# MASTER_ADDR / MASTER_PORT (rendezvous, default localhost:29500), DRY_RUN=1 prints the command only.
set -euo pipefail
stage=${1:?usage: scripts/launch.sh <search|retrain|finetune|distill_task> [overrides...]}
shift
case "$stage" in
  search|retrain|finetune|distill_task) ;;
  *) echo "unknown stage '$stage'; valid: search, retrain, finetune, distill_task" >&2; exit 2 ;;
esac
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)
fi
cmd=(torchrun --nnodes "${NNODES:-1}" --nproc_per_node "$NPROC" --node_rank "${NODE_RANK:-0}"
     --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}"
     -m "elm.$stage" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
