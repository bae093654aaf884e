#!/usr/bin/env bash
# The whole pipeline offline on the generated demo collection: generate -> BM25 -> preprocessing -> stage 1 CL
# -> stage 2 KD -> re-rank the test topics -> comparison table with significance tests. A few minutes on a CPU.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1

echo "== 1. Generate the demo collection (data/demo/)"
python -m crossrank demo

echo "== 2. BM25 first stage for the training and test topics (PISA; index cached in data/indexes/)"
./create_bm25_baseline_run.sh -d demo -k 1000 2>/dev/null
./create_bm25_baseline_run.sh -d demo-test -k 1000 2>/dev/null

echo "== 3. Training files: CL from the BM25 run, KD from the simulated teacher (10% of queries for validation)"
python preprocessing.py --dataset demo --objective CL --evalperc 10
python preprocessing.py --dataset demo --objective KD --evalperc 10

echo "== 4. Evaluate the BM25 baseline on the test topics"
python -m crossrank compare --dataset demo-test runs/demo-test.bm25.run

echo "== 5. Fine-tune MiniLM, stage 1: CL on BM25 negatives (the seed's recipe, shortened for a CPU: 60 steps,"
echo "      3 negatives per query, lr 1e-4); the best validation checkpoint goes to models/bert.CL.f1.lr0.0001.s42/model"
./ft-monoencoder.sh -f 1 -c bert -m CL -l 1e-4 train.max_steps=60 data.num_negatives=3 data.depth=100 \
  train.accumulation=1 train.eval_every=30 eval.depth=30

echo "== 6. Stage 2: KD (RankNet on the simulated teacher's top-20) from that model -> models/bert.CL-KD.f2.lr5e-05.s42"
./ft-monoencoder.sh -f 2 -c bert -m KD -l 5e-5 train.previous_lr=1e-4 train.max_steps=30 \
  train.queries_per_batch=2 train.accumulation=1 train.eval_every=15

echo "== 7. Re-rank the test topics with the stage-1 (CL) and stage-2 (CL -> KD) models; compare with BM25"
backbone=bert runs=(runs/demo-test.bm25.run)
for spec in "1 CL $backbone.CL.f1" "2 KD $backbone.CL-KD.f2"; do
  read -r stage objective prefix <<<"$spec"
  if compgen -G "models/$prefix.*/model" >/dev/null; then
    ./inference-monoencoder.sh -f "$stage" -c "$backbone" -m "$objective" -d demo-test >/dev/null
    runs+=(runs/demo-test.bm25."$prefix".*.run)
  else
    echo "   no stage-$stage checkpoint (models/$prefix.*/model): run the training steps first; not re-ranked"
  fi
done
python -m crossrank compare -d demo-test --depth 100 --holm "${runs[@]}"
