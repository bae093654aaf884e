#!/usr/bin/env bash
# Re-rank first-stage runs with a fine-tuned cross-encoder found under models/, write runs/ and print metrics.
set -euo pipefail
usage() {
  cat <<USAGE
Usage: $0 -f 1|2 -c BACKBONE -m CL|KD -d DATASET [-g GPUS] [-p CL|KD] [-l LR] [-s RUN] [-k DEPTH] [-M DIR] [-L] [-n]
  -f  stage of the checkpoint: 1 or 2
  -c  backbone: electra | roberta | bert | minilm (configs/backbones/) or a Hugging Face id / folder;
      set-encoder, set-encoder:electra|roberta|<id or folder>: a Set-Encoder checkpoint (also with -M)
  -m  objective of the checkpoint's last stage: CL or KD (stage 2 starts from the other one unless -p)
  -d  indomain (TREC DL 2019 + 2020) | outofdomain (BEIR list) | a configs/datasets key (or several, a,b)
  -g  GPU ids, e.g. 0 or 0,1 (several: torchrun shards the queries, one merged run), or cpu; default: all visible / CPU
  -p  objective of stage 1 for a stage-2 checkpoint (default: the other one)
  -l  learning rate the checkpoint was trained with (narrows the search under models/)
  -s  first-stage run key of the dataset: bm25 (default), colbert, ...
  -k  re-ranking depth (default 100; 1000 supported)
  -M  checkpoint folder to use instead of searching models/
  -L  lenient: skip run lines whose qid or docno is unknown, and duplicates, and report them
  -n  the Set-Encoder's novelty variant (-c set-encoder -n), and report alpha-nDCG@10 (eval.novelty=true)
  Extra key=value overrides go after --, e.g. -- eval.batch_tokens=8192 eval.score_cache=runs/cache.sqlite
USAGE
}
stage="" backbone="" objective="" dataset="" gpus="" previous="" lr="" first=bm25 depth=100 model="" opts=() kv=()
while getopts ":f:c:m:d:g:p:l:s:k:M:Lnh" opt; do
  case "$opt" in
    f) stage="$OPTARG" ;; c) backbone="$OPTARG" ;; m) objective="$OPTARG" ;; d) dataset="$OPTARG" ;;
    g) gpus="$OPTARG" ;; p) previous="$OPTARG" ;; l) lr="$OPTARG" ;; s) first="$OPTARG" ;;
    k) depth="$OPTARG" ;; M) model="$OPTARG" ;; L) opts+=(--lenient) ;; n) kv+=(data.novelty=true eval.novelty=true) ;;
    h) usage; exit 0 ;;
    :) echo "error: command line: -$OPTARG needs a value (see $0 -h)" >&2; exit 2 ;;
    *) echo "error: command line: -$OPTARG is not an option (see $0 -h)" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ -n "$dataset" && ( -n "$model" || ( -n "$stage" && -n "$backbone" && -n "$objective" ) ) ]] || {
  echo "error: command line: -d and either -M or all of -f, -c, -m are required (see $0 -h)" >&2; exit 2; }
cd "$(dirname "$0")"
prefix=""
if [[ $backbone == set-encoder || $backbone == set-encoder:* ]]; then  # the listwise Set-Encoder on that backbone
  prefix=set-encoder- backbone=${backbone#set-encoder} backbone=${backbone#:}
  opts+=(--config configs/backbones/set-encoder.yaml)
fi
name='^[A-Za-z0-9][A-Za-z0-9._+-]*$'  # a config name, never a path (-c ../x must not pick a file outside)
if [[ $backbone =~ $name && $backbone != *..* && -f "configs/backbones/$backbone.yaml" ]]; then
  opts+=(--config "configs/backbones/$backbone.yaml")
  [[ -n $prefix ]] && kv+=(model.name="$prefix$backbone")
elif [[ -n "$backbone" ]]; then
  kv+=(model.name="$prefix$(basename "${backbone%/}")" model.path="$backbone")
fi
[[ -n "$lr" ]] && opts+=(--lr "$lr")
[[ -n "$model" ]] && opts+=(--model "$model")
kv+=(train.stage="${stage:-1}" train.objective="${objective:-CL}" train.previous="$previous"
     eval.dataset="$dataset" eval.first_stage="$first" eval.depth="$depth")
launcher=(python)
case "$gpus" in  # numbers are range-checked in Python (config.py, infer.py); only -g is the wrapper's own
  "") ;;
  cpu) export CUDA_VISIBLE_DEVICES="" ;;
  *) if [[ ! "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
       echo "error: command line: -g $gpus is invalid (expected GPU ids like 0 or 0,1, or cpu)" >&2; exit 2
     fi
     export CUDA_VISIBLE_DEVICES="$gpus"
     n=$(tr ',' '\n' <<<"$gpus" | grep -c .)
     if (( n > 1 )); then launcher=(torchrun --standalone --nproc_per_node "$n"); fi ;;
esac
exec "${launcher[@]}" infer.py "${opts[@]}" "${kv[@]}" "$@"  # options first: argparse wants them before key=value
