#!/usr/bin/env bash
# Offline default pipeline on one machine (2 idle CPU cores: ~45 min):
#   search -> retrain + export (searched, uniform and random baselines, same budget) -> fine-tune on BBC
#   -> comparison table + PNG -> fine-tune the searched export on SST-2 (when ../shared/data/sst2 exists).
#
#   scripts/pipeline.sh [extra overrides for the search]       OUT=<dir> sets the output folder
#   DRY_RUN=1 scripts/pipeline.sh                                prints the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/pipeline/$(date +%Y-%m-%d_%H-%M-%S)}
SST2=${SST2:-../shared/data/sst2}
run() { echo "+ $*"; [[ "${DRY_RUN:-0}" == 1 ]] || "$@"; }

run python -m elm.search "hydra.run.dir=$OUT/search" logger=none progress=false "$@"
# the same retraining (configs/compare.yaml: 2 x 150 steps) and fine-tuning budget for every model;
# 60 retraining steps left the students at the unigram stage (val MLM loss 8.2), where no
# fine-tuning moved them off the majority class
run python -m elm.compare "search_dir=$OUT/search" "hydra.run.dir=$OUT/compare" \
    "models=[searched,uniform,random]" random.n=2 "tasks=[bbc]" "seeds=[0,1]" \
    finetune.data.max_train=400 finetune.train.epochs=6
EXPORT="$OUT/compare/retrain/searched/model"
if [[ -d "$SST2" ]]; then
  run python -m elm.finetune "model=$EXPORT" "task=$SST2" "seeds=[0,1]" data.max_train=800 data.max_eval=400 \
      train.epochs=2 "hydra.run.dir=$OUT/finetune_sst2"
fi
echo "exported model: $EXPORT"
echo "BBC results:    $OUT/compare/finetune/searched/bbc/results.json"
[[ -d "$SST2" ]] && echo "SST-2 results:  $OUT/finetune_sst2/results.json"
echo "comparison:     $OUT/compare/comparison.md (.csv, .png)"
