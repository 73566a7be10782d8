#!/usr/bin/env bash
# Offline default pipeline on one machine:
#   search -> the same retraining for the searched student, a random-init copy of it (scratch), a
#   uniform baseline and a slice of the teacher -> the same fine-tuning (lr picked per model on held-out
#   training rows, 3 seeds) of those and of the teacher on BBC, and on SST-2 when ../shared/data/sst2
#   exists; the searched student is also task-distilled from the teacher fine-tuned on each task ->
#   comparison table + PNG (accuracy as a fraction of the teacher's, speed-up over it).
#   With SST2=none (BBC only): 23.8 min on 2 idle cores with AMX (2026-12-04; search 2 min, 4 retrains
#   8.7 min, fine-tuning 5 models x (3-rate sweep + 3 seeds) 11.8 min, of it the teacher's 4.2 min, task
#   distillation 1.3 min), 33 min on 2 with AVX512-BF16 but no AMX (2026-12-05; retrains 10.3 min,
#   fine-tuning 18.4 min: docs/benchmarks.md). With SST-2 (4,000 sentences per run) about 3.5 h on
#   the slower machines of earlier sessions.
#
#   scripts/pipeline.sh [extra overrides for the search]       OUT=<dir> sets the output folder
#   DRY_RUN=1 scripts/pipeline.sh                                prints the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/pipeline/$(date +%Y-%m-%d_%H-%M-%S)}
SST2=${SST2:-../shared/data/sst2}
run() { printf '+'; printf ' %q' "$@"; echo; [[ "${DRY_RUN:-0}" == 1 ]] || "$@"; }

run python -m elm.search "hydra.run.dir=$OUT/search" logger=none progress=false "$@"
# the same retraining (configs/compare.yaml: 2 x 150 steps) and fine-tuning budget for every model
# (60 retraining steps left the students at the unigram stage, val MLM loss 8.2, where no
# fine-tuning moved them off the majority class); BBC on 800 training articles, SST-2 (when
# present) on 4,000 training sentences, each scored on its full dev split
TASKS=bbc
SST2_ROWS=()  # task_finetune may only name tasks that run
if [[ -d "$SST2" ]]; then
  TASKS="bbc,$SST2"
  SST2_ROWS=("+task_finetune={sst2: {data: {max_train: 4000}}}")
fi
# task distillation of the searched student too (column <task>+kd): the teacher fine-tuned on each
# task teaches it with soft labels on the same rows, for the same epochs, at the learning rate its
# plain fine-tuning picked (masked-word augmentation proposed by the student's own MLM head did
# not help on SST-2: docs/evaluate.md)
run python -m elm.compare "search_dir=$OUT/search" "hydra.run.dir=$OUT/compare" \
    "models=[searched,scratch,uniform,teacher_slice,teacher]" "tasks=[$TASKS]" "seeds=[0,1,2]" \
    finetune.data.max_train=800 "${SST2_ROWS[@]}" task_distill.enabled=true
echo "exported model: $OUT/compare/retrain/searched/model"
echo "comparison:     $OUT/compare/comparison.md (.csv, .png)"
