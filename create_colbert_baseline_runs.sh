#!/usr/bin/env bash
# ColBERT top-k run for a dataset's topics over its corpus: PyLate's PLAID index (fast-plaid), cached and resumable
# under data/indexes/. The engine needs its own torch, so it runs in a separate environment created on first use.
set -euo pipefail
usage() {
  cat <<USAGE
Usage: $0 -d DATASET [-k DEPTH] [-m CHECKPOINT] [-g DEVICES] [-b BATCH] [-o RUN] [-i INDEXES] [-s SHARD] [-r] [-l]
  -d  dataset: a key of configs/datasets (e.g. demo, dl19) or a YAML path
  -k  results per query (default 500)
  -m  ColBERT checkpoint: hub id or local folder (default colbert-ir/colbertv2.0)
  -g  devices: GPU numbers, e.g. 0 or 0,1 (one encoding process per GPU), or cpu (default: GPU 0 if any)
  -b  encoding batch size (default 32)
  -o  output run (default runs/<dataset>.colbert.run)
  -i  index cache root (default data/indexes)
  -s  passages per resumable indexing shard (default 100000)
  -r  rebuild the cached index from scratch
  -l  lenient: skip malformed corpus/topic lines and report how many
Environment: CROSSRANK_COLBERT_ENV (default .venv-colbert) is where the ColBERT environment lives;
TORCH_INDEX_URL picks the torch 2.11 build when it is created (e.g. https://download.pytorch.org/whl/cpu).
USAGE
}
dataset="" k=500 model="colbert-ir/colbertv2.0" devices="" batch=32 out="" indexes="" shard=100000 extra=()
while getopts ":d:k:m:g:b:o:i:s:rlh" opt; do
  case "$opt" in
    d) dataset="$OPTARG" ;;
    k) k="$OPTARG" ;;
    m) model="$OPTARG" ;;
    g) devices="$OPTARG" ;;
    b) batch="$OPTARG" ;;
    o) out="$OPTARG" ;;
    i) indexes="$OPTARG" ;;
    s) shard="$OPTARG" ;;
    r) extra+=(--rebuild) ;;
    l) extra+=(--lenient) ;;
    h) usage; exit 0 ;;
    :) echo "error: command line: -$OPTARG needs a value (see $0 -h)" >&2; exit 2 ;;
    *) echo "error: command line: -$OPTARG is not an option (see $0 -h)" >&2; exit 2 ;;
  esac
done
[[ -n "$dataset" ]] || { echo "error: command line: -d DATASET is required (see $0 -h)" >&2; exit 2; }
for flag in "-k $k" "-b $batch" "-s $shard"; do  # checked before the ColBERT environment may be created
  read -r name value <<<"$flag"
  [[ $value =~ ^[1-9][0-9]*$ ]] ||
    { echo "error: command line: $name $value is invalid (expected a positive integer)" >&2; exit 2; }
done
[[ -z $devices || $devices == cpu || $devices =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  { echo "error: command line: -g $devices is invalid (expected GPU ids like 0 or 0,1, or cpu)" >&2; exit 2; }
cd "$(dirname "$0")"
env="${CROSSRANK_COLBERT_ENV:-.venv-colbert}"
if [[ ! -f "$env/.crossrank-ready" ]]; then  # the marker is written only after a complete install
  echo "creating the ColBERT environment in $env (torch 2.11, PyLate, fast-plaid; see requirements-colbert.txt)" >&2
  "${PYTHON:-python3}" -m venv "$env"
  [[ -z "${TORCH_INDEX_URL:-}" ]] || "$env/bin/pip" install torch==2.11.0 --index-url "$TORCH_INDEX_URL"
  "$env/bin/pip" install -r requirements-colbert.txt
  touch "$env/.crossrank-ready"
fi
exec "$env/bin/python" -m crossrank colbert --dataset "$dataset" --k "$k" --checkpoint "$model" --devices "$devices" \
  --batch-size "$batch" --shard-docs "$shard" ${out:+--out "$out"} ${indexes:+--indexes "$indexes"} "${extra[@]}"
