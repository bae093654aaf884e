#!/usr/bin/env bash
# BM25 top-k run for a dataset's topics over its corpus, with PISA; the index is cached under data/indexes/.
set -euo pipefail
usage() {
  cat <<USAGE
Usage: $0 -d DATASET [-k DEPTH] [-t THREADS] [-o RUN] [-l]
  -d  dataset: a key of configs/datasets (e.g. demo, demo-test, dl19) or a YAML path
  -k  results per query (default 1000)
  -t  threads for indexing and retrieval (default 1)
  -o  output run (default runs/<dataset>.bm25.run)
  -l  lenient: skip malformed corpus/topic lines and report how many
USAGE
}
dataset="" k=1000 threads=1 out="" lenient=()
while getopts ":d:k:t:o:lh" opt; do
  case "$opt" in
    d) dataset="$OPTARG" ;;
    k) k="$OPTARG" ;;
    t) threads="$OPTARG" ;;
    o) out="$OPTARG" ;;
    l) lenient=(--lenient) ;;
    h) usage; exit 0 ;;
    :) echo "error: command line: -$OPTARG needs a value (see $0 -h)" >&2; exit 2 ;;
    *) echo "error: command line: -$OPTARG is not an option (see $0 -h)" >&2; exit 2 ;;
  esac
done
[[ -n "$dataset" ]] || { echo "error: command line: -d DATASET is required (see $0 -h)" >&2; exit 2; }
cd "$(dirname "$0")"
exec python -m crossrank bm25 --dataset "$dataset" --k "$k" --threads "$threads" ${out:+--out "$out"} "${lenient[@]}"
