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
stage=1 backbone=bert objective=CL gpus="" overrides=()
while getopts ":f:c:m:l:b:g:p:s:d:nh" opt; do
  case $opt in
    f) stage=$OPTARG ;;
    c) backbone=$OPTARG ;;
    m) objective=$OPTARG ;;
    l) overrides+=("optim.lr=$OPTARG") ;;
    b) overrides+=("train.queries_per_batch=$OPTARG") ;;
    g) gpus=$OPTARG ;;
    p) overrides+=("train.previous=$OPTARG") ;;
    s) overrides+=("train.seed=$OPTARG") ;;
    d) overrides+=("data.dataset=$OPTARG") ;;
    n) overrides+=("data.novelty=true") ;;
    h) usage; exit 0 ;;
    :) echo "error: command line: -$OPTARG needs a value (see $0 -h)" >&2; exit 2 ;;
    *) echo "error: command line: -$OPTARG is not an option (see $0 -h)" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name='^[A-Za-z0-9][A-Za-z0-9._+-]*$'  # a name, never a path: -m ../backbones/bert must not pick another folder's file
if [[ ! $objective =~ $name || $objective == *..* || ! -f $here/configs/objectives/$objective.yaml ]]; then
  echo "error: -m $objective is unknown (expected CL, KD or BCE)" >&2; exit 2
fi
configs=(--config "$here/configs/objectives/$objective.yaml") prefix=""
if [[ $backbone == set-encoder || $backbone == set-encoder:* ]]; then  # listwise: its stage recipe on top
  prefix=set-encoder- backbone=${backbone#set-encoder} backbone=${backbone#:}
  [[ -f $here/configs/set-encoder/$objective.yaml ]] && configs+=(--config "$here/configs/set-encoder/$objective.yaml")
fi
if [[ $backbone =~ $name && $backbone != *..* && -f $here/configs/backbones/$backbone.yaml ]]; then
  configs=(--config "$here/configs/backbones/$backbone.yaml" "${configs[@]}")
  [[ -n $prefix ]] && overrides=("model.name=$prefix$backbone" "${overrides[@]}")
elif [[ -n $backbone ]]; then  # a hub id or a folder: its last path part names the run folder
  overrides=("model.path=$backbone" "model.name=$prefix$(basename "${backbone%/}")" "${overrides[@]}")
fi
[[ -n $prefix ]] && configs=(--config "$here/configs/backbones/set-encoder.yaml" "${configs[@]}")
launch=(python)
case $gpus in  # numbers are range-checked in Python (config.py); only -g is the wrapper's own
  "") ;;
  cpu) export CUDA_VISIBLE_DEVICES="" ;;
  *) if [[ ! $gpus =~ ^[0-9]+(,[0-9]+)*$ ]]; then
       echo "error: command line: -g $gpus is invalid (expected GPU ids like 0 or 0,1, or cpu)" >&2; exit 2
     fi
     export CUDA_VISIBLE_DEVICES=$gpus
     n=$(tr ',' '\n' <<<"$gpus" | grep -c .)
     if (( n > 1 )); then launch=(torchrun --standalone --nproc_per_node "$n"); fi ;;
esac
exec "${launch[@]}" "$here/train.py" "${configs[@]}" "train.stage=$stage" "${overrides[@]}" "$@"
