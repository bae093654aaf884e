#!/usr/bin/env bash
# BM25 top-k run for a dataset's topics over its corpus, with PISA; the index is cached under data/indexes/.
set -euo pipefail
usage() {
  cat <<USAGE
Usage: $0 -d DATASET [-k DEPTH] [-t THREADS] [-o RUN] [-L]
  -d  dataset: a key of configs/datasets (e.g. demo, demo-test, dl19) or a YAML path
  -k  results per query (default 1000)
  -t  threads for indexing and retrieval (default 1)
  -o  output run (default runs/<dataset>.bm25.run)
  -L  lenient: skip malformed corpus/topic lines and report how many (was -l before)
USAGE
}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/scripts/flags.sh"
dataset="" k=1000 threads=1 out="" lenient=()
MOVED=([l]="-L (lenient)")
on_flag() {
  case $1 in
    d) dataset=$2 ;; k) k=$2 ;; t) threads=$2 ;; o) out=$2 ;; L) lenient=(--lenient) ;;
  esac
}
parse_flags "d:k:t:o:L" "$@"
[[ -n "$dataset" ]] || die "-d DATASET is required (see $0 -h)"
cd "$here"
exec python -m crossrank bm25 --dataset "$dataset" --k "$k" --threads "$threads" ${out:+--out "$out"} "${lenient[@]}"
