#!/usr/bin/env bash
# The whole pipeline offline on the generated demo collection: generate -> BM25 -> preprocessing -> evaluate.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== 1. Generate the demo collection (data/demo/)"
python -m crossrank.demo

echo "== 2. BM25 first stage for the training and test topics (PISA; index cached in data/indexes/)"
./create_bm25_baseline_run.sh -d demo -k 1000 2>/dev/null
./create_bm25_baseline_run.sh -d demo-test -k 1000 2>/dev/null

echo "== 3. Training files: CL from the BM25 run, KD from the simulated teacher (10% of queries for validation)"
python preprocessing.py --dataset demo --objective CL --evalperc 10
python preprocessing.py --dataset demo --objective KD --evalperc 10

echo "== 4. Evaluate the BM25 baseline on the test topics"
python -m crossrank.evaluation --dataset demo-test runs/demo-test.bm25.run
