#!/usr/bin/env bash
# Fine-tune a cross-encoder (pointwise, or the listwise Set-Encoder): one stage (README, "Training").
set -euo pipefail
usage() {
  cat <<'TXT'
usage: ./ft-monoencoder.sh [-f 1|2] [-c backbone] [-m CL|KD|BCE] [-l lr] [-b queries] [-g gpus] [-p CL|KD]
                           [-s seed] [-d dataset] [-n] [key=value ...]
  -f  stage: 1 starts from the backbone, 2 from the stage-1 model found under models/ (default 1)
  -c  bert | minilm | electra | roberta (configs/backbones/) or a Hugging Face id / local folder (default bert);
      set-encoder[:electra|roberta|<id or folder>]: the Set-Encoder (MiniLM by default) + configs/set-encoder/<m>
  -m  objective: CL contrastive (LCE), KD distillation (RankNet), BCE pointwise (default CL)
  -l  learning rate (default 1e-5)            -b  queries per batch and micro-step (default: CL 4, KD 16)
  -g  GPU ids, e.g. 0 or 0,1,2,3: one process per GPU via torchrun, or cpu (default: first visible GPU, else CPU)
  -p  stage 2: objective of the stage-1 model to start from (default: the other one, CL->KD, KD->CL)
  -s  seed (default 42)                       -d  dataset key, configs/datasets/ (default demo)
  -n  Set-Encoder novelty variant: Novelty-Aware RankNet on Jaccard clusters (data.novelty=true)
  key=value  any config override, e.g. train.max_steps=1000 data.num_negatives=31 optim.schedule=linear
TXT
}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/scripts/flags.sh"
stage=1 BACKBONE=bert objective=CL gpus="" overrides=()
on_flag() {
  case $1 in
    f) stage=$2 ;;
    c) BACKBONE=$2 ;;
    m) objective=$2 ;;
    l) overrides+=("optim.lr=$2") ;;
    b) overrides+=("train.queries_per_batch=$2") ;;
    g) gpus=$2 ;;
    p) overrides+=("train.previous=$2") ;;
    s) check_seed "$2"; overrides+=("train.seed=$2") ;;
    d) overrides+=("data.dataset=$2") ;;
    n) overrides+=("data.novelty=true") ;;
  esac
}
parse_flags "f:c:m:l:b:g:p:s:d:n" "$@"
set -- "${REST[@]}"
if ! is_name "$objective" || [[ ! -f $here/configs/objectives/$objective.yaml ]]; then
  echo "error: -m $objective is unknown (expected CL, KD or BCE)" >&2; exit 2
fi
split_backbone "$here"
configs=("${BACKBONE_ARGS[@]}" --config "$here/configs/objectives/$objective.yaml")
if [[ -n $SET_ENCODER ]]; then  # listwise: the Set-Encoder's YAML first, its stage recipe on top
  configs=(--config "$here/configs/backbones/set-encoder.yaml" "${configs[@]}")
  [[ -f $here/configs/set-encoder/$objective.yaml ]] && configs+=(--config "$here/configs/set-encoder/$objective.yaml")
fi
overrides=("${BACKBONE_NAME[@]}" "${overrides[@]}")
set_gpus "$gpus"  # numbers are range-checked in Python (config.py); only -g is the wrapper's own
exec "${LAUNCH[@]}" "$here/train.py" "${configs[@]}" "train.stage=$stage" "${overrides[@]}" "$@"
