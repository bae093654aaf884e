#!/usr/bin/env bash
# Re-rank first-stage runs with a fine-tuned cross-encoder found under models/, write runs/ and print metrics.
set -euo pipefail
usage() {
  cat <<USAGE
Usage: $0 -f 1|2 -c BACKBONE -m CL|KD -d DATASET [-g GPUS] [-p CL|KD] [-l LR] [-s SEED] [-r RUN] [-k DEPTH] [-M DIR] [-L] [-n]
  -f  stage of the checkpoint: 1 or 2
  -c  backbone: electra | roberta | bert | minilm (configs/backbones/) or a Hugging Face id / folder;
      set-encoder, set-encoder:electra|roberta|<id or folder>: a Set-Encoder checkpoint (also with -M)
  -m  objective of the checkpoint's last stage: CL or KD (stage 2 starts from the other one unless -p)
  -d  indomain (TREC DL 2019 + 2020) | outofdomain (BEIR list) | a configs/datasets key (or several, a,b)
  -g  GPU ids, e.g. 0 or 0,1 (several: torchrun shards the queries, one merged run), or cpu; default: all visible / CPU
  -p  objective of stage 1 for a stage-2 checkpoint (default: the other one)
  -l  learning rate the checkpoint was trained with (narrows the search under models/)
  -s  seed the checkpoint was trained with (narrows the search under models/)
  -r  first-stage run key of the dataset: bm25 (default), colbert, ... (was -s before)
  -k  re-ranking depth (default 100; 1000 supported)
  -M  checkpoint folder to use instead of searching models/
  -L  lenient: skip run lines whose qid or docno is unknown, and duplicates, and report them
  -n  the Set-Encoder's novelty variant (-c set-encoder -n), and report alpha-nDCG@10 (eval.novelty=true)
  Extra key=value overrides go after --, e.g. -- eval.batch_tokens=8192 eval.score_cache=runs/cache.sqlite
USAGE
}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/scripts/flags.sh"
stage="" BACKBONE="" objective="" dataset="" gpus="" previous="" lr="" seed="" first=bm25 depth=100 model=""
opts=() kv=()
on_flag() {
  case $1 in
    f) stage=$2 ;; c) BACKBONE=$2 ;; m) objective=$2 ;; d) dataset=$2 ;; g) gpus=$2 ;; p) previous=$2 ;;
    l) lr=$2 ;; s) check_seed "$2" "the first-stage run is -r now (-r $2)"; seed=$2 ;; r) first=$2 ;; k) depth=$2 ;; M) model=$2 ;;
    L) opts+=(--lenient) ;; n) kv+=(data.novelty=true eval.novelty=true) ;;
  esac
}
parse_flags "f:c:m:d:g:p:l:s:r:k:M:Ln" "$@"
set -- "${REST[@]}"
[[ -n "$dataset" && ( -n "$model" || ( -n "$stage" && -n "$BACKBONE" && -n "$objective" ) ) ]] ||
  die "-d and either -M or all of -f, -c, -m are required (see $0 -h)"
cd "$here"
split_backbone "$here"  # with -M only to name the model; its settings come from the checkpoint (crossrank.json)
[[ -n $SET_ENCODER ]] && opts+=(--config configs/backbones/set-encoder.yaml)
opts+=("${BACKBONE_ARGS[@]}") kv+=("${BACKBONE_NAME[@]}")
[[ -n "$lr" ]] && opts+=(--lr "$lr")
[[ -n "$seed" ]] && opts+=(--seed "$seed")
[[ -n "$model" ]] && opts+=(--model "$model")
kv+=(train.stage="${stage:-1}" train.objective="${objective:-CL}" train.previous="$previous"
     eval.dataset="$dataset" eval.first_stage="$first" eval.depth="$depth")
set_gpus "$gpus"  # numbers are range-checked in Python (config.py, infer.py); only -g is the wrapper's own
exec "${LAUNCH[@]}" infer.py "${opts[@]}" "${kv[@]}" "$@"  # options first: argparse wants them before key=value
