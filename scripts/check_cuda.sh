#!/usr/bin/env bash
# A quick check of every stage on a CUDA GPU (bf16 autocast):
#   default search -> retrain from it -> fine-tune the export on BBC (one seed) -> the bench's
#   GPU-relevant cases -> a search with the llama and skip families added (these five: about
#   4 minutes on one H200) -> the causal pipeline (teacher training capped at 90 s, MiniLLM at 60 s
#   a student; not yet run on a GPU).
# Offline as the defaults are (packaged MiniLM teacher and BBC corpus). Logs go to $OUT (default
# outputs/check_cuda/<time>); the end of each is printed. Results of one run: docs/benchmarks.md.
#   scripts/check_cuda.sh                  DRY_RUN=1 prints the commands only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/check_cuda/$(date +%Y-%m-%d_%H-%M-%S)}
[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=0
step() {  # step <name> <command...>: run it, keep its log, print its last lines and wall time
  local name=$1 start=$SECONDS rc=0
  shift
  printf '+'; printf ' %q' "$@"; echo
  [[ "${DRY_RUN:-0}" == 1 ]] && return
  "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  echo "== $name: exit $rc, $((SECONDS - start)) s"
  grep -v 'it/s\]\|s/it\]\|examples/s\]' "$OUT/$name.log" | tail -n 8
  ((rc == 0)) || failed=1
}
step search python -m elm.search device=cuda progress=false "hydra.run.dir=$OUT/search"
step retrain python -m elm.retrain device=cuda progress=false "search_dir=$OUT/search" "hydra.run.dir=$OUT/retrain"
step finetune python -m elm.finetune "model=$OUT/retrain/model" device=cuda "seeds=[0]" "hydra.run.dir=$OUT/finetune"
step bench python -m elm.bench --device cuda --quick --only mlm supernet inference analysis search bf16
step llama python -m elm.search device=cuda progress=false "space.blocks=[bert,mobilebert,llama,skip]" \
    "hydra.run.dir=$OUT/llama"
step causal python -m elm.causal.pipeline device=cuda "teacher.train_overrides=['train.max_time_s=90']" \
    minillm.max_time_s=60 "hydra.run.dir=$OUT/causal"
exit $failed
