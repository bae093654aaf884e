#!/usr/bin/env bash
# ColBERT top-k run for a dataset's topics over its corpus: PyLate's PLAID index (fast-plaid), cached and resumable
# under data/indexes/. The engine needs its own torch, so it runs in a separate environment created on first use.
set -euo pipefail
usage() {
  cat <<USAGE
Usage: $0 -d DATASET [-k DEPTH] [-M CHECKPOINT] [-g DEVICES] [-b BATCH] [-o RUN] [-i INDEXES] [-S SHARD] [-R] [-L]
  -d  dataset: a key of configs/datasets (e.g. demo, dl19) or a YAML path
  -k  results per query (default 500)
  -M  ColBERT checkpoint: hub id or local folder (default colbert-ir/colbertv2.0; was -m before)
  -g  devices: GPU numbers, e.g. 0 or 0,1 (one encoding process per GPU), or cpu (default: GPU 0 if any)
  -b  encoding batch size (default 32)
  -o  output run (default runs/<dataset>.colbert.run)
  -i  index cache root (default data/indexes)
  -S  passages per resumable indexing shard (default 100000; was -s before)
  -R  rebuild the cached index from scratch (was -r before)
  -L  lenient: skip malformed corpus/topic lines and report how many (was -l before)
Environment: CROSSRANK_COLBERT_ENV (default .venv-colbert) is where the ColBERT environment lives;
TORCH_INDEX_URL picks the torch 2.11 build when it is created (e.g. https://download.pytorch.org/whl/cpu).
USAGE
}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/scripts/flags.sh"
dataset="" k=500 model="colbert-ir/colbertv2.0" devices="" batch=32 out="" indexes="" shard=100000 extra=()
MOVED=([m]="-M (the ColBERT checkpoint)" [s]="-S (passages per index shard)" [r]="-R (rebuild the index)"
       [l]="-L (lenient)")
on_flag() {
  case $1 in
    d) dataset=$2 ;; k) k=$2 ;; M) model=$2 ;; g) devices=$2 ;; b) batch=$2 ;; o) out=$2 ;; i) indexes=$2 ;;
    S) shard=$2 ;; R) extra+=(--rebuild) ;; L) extra+=(--lenient) ;;
  esac
}
parse_flags "d:k:M:g:b:o:i:S:RL" "$@"
[[ -n "$dataset" ]] || die "-d DATASET is required (see $0 -h)"
check_positive -k "$k"; check_positive -b "$batch"; check_positive -S "$shard"  # before the environment is made
[[ -z $devices || $devices == cpu || $devices =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  die "-g $devices is invalid (expected GPU ids like 0 or 0,1, or cpu)"
cd "$here"
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
