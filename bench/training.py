"""CL-stage training throughput: crossrank's `train()` against sentence-transformers' `CrossEncoderTrainer`.

Same model (the packaged all-MiniLM-L6-v2 with a fresh 1-logit head), same examples (per query 1 relevant + 7
non-relevant passages of the demo collection, drawn once by crossrank's sampler and given to both), same pair
truncation (256 tokens), 4 queries per optimiser step, AdamW lr 1e-5, fp32 on CPU. The peer's contrastive
loss is `MultipleNegativesRankingLoss` with the hard negatives as extra columns and its minimum of 1 in-batch
negative per query (it cannot be switched off), so it scores 1 + 7 + 1 pairs per query; we score 1 + 7. The
figure is scored pairs (forward + backward) per second over the timed steps, so the extra pair costs the peer
nothing in the ratio. Each side runs in its own subprocess (clean peak memory), one after the other, in this run.

    python bench/training.py [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUERIES, NEGATIVES, WARMUP_STEPS, TARGET = 4, 7, 2, 1.2
MODEL = "packaged:all-MiniLM-L6-v2"


def build_data(folder: Path) -> Path:
    """The demo collection as a CL folder: per training query its (up to) 3 best passages, then random
    non-relevant ones, as the candidate list; no validation queries (nothing but training is timed)."""
    from crossrank.demo import generate
    from crossrank.io import read_qrels, read_topics
    from crossrank.preprocessing import QueryCandidates, write_meta, write_split

    generate(folder / "demo")
    qrels, topics = read_qrels(folder / "demo" / "qrels.train.txt"), read_topics(folder / "demo" / "topics.train.tsv")
    docnos = [line.split("\t", 1)[0] for line in (folder / "demo" / "corpus.tsv").read_text().splitlines()]
    rng, queries = random.Random(0), []
    for qid in topics:
        judged = qrels.get(qid, {})
        best = sorted((d for d, rel in judged.items() if rel >= 2), key=lambda d: (-judged[d], d))[:3]
        ranked = best + [d for d in rng.sample(docnos, 100) if judged.get(d, 0) < 1]
        queries.append(QueryCandidates(qid, ranked[:50], [float(50 - i) for i in range(50)], qrels.get(qid, {})))
    cl = folder / "CL"
    cl.mkdir()
    write_split(cl, "train", queries)
    write_split(cl, "valid", [])
    write_meta(cl, {"dataset": "demo", "objective": "CL", "topics": str(folder / "demo" / "topics.train.tsv"),
                    "corpus": str(folder / "demo" / "corpus.tsv"), "qrels": "", "evalperc": 0, "seed": 42})
    return cl


def config(data: Path, out: Path, steps: int):
    from crossrank.config import load_run_config

    return load_run_config([ROOT / "configs" / "backbones" / "bert.yaml", ROOT / "configs" / "objectives" / "CL.yaml"],
                           [f"data.train={data}", f"data.num_negatives={NEGATIVES}", "data.depth=50",
                            f"train.queries_per_batch={QUERIES}", "train.accumulation=1", f"train.max_steps={steps}",
                            "train.log_every=1", "train.eval_every=100000", "train.save_every=100000",
                            f"train.output_dir={out}", "train.precision=fp32"])


def run_ours(data: Path, out: Path, steps: int) -> dict:
    from crossrank.training import train

    train(config(data, out, steps))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][WARMUP_STEPS:]
    pairs = QUERIES * (1 + NEGATIVES) * len(rows)
    seconds = sum(QUERIES * (1 + NEGATIVES) / r["pairs_per_s"] for r in rows)
    return {"pairs_per_s": pairs / seconds, "pairs_per_step": QUERIES * (1 + NEGATIVES)}


def run_peer(data: Path, out: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from crossrank.data import load_training_data
    from crossrank.models import resolve_model_path

    stream, _ = load_training_data(config(data, out, steps))
    examples = [stream.example(i) for i in range(steps * QUERIES)]  # exactly what our side trains on
    columns = {"query": [stream.topics[e.qid] for e in examples]}
    for j in range(1 + NEGATIVES):
        columns["positive" if j == 0 else f"negative_{j}"] = [stream.passages[e.docnos[j]] for e in examples]
    torch.manual_seed(42)
    model = CrossEncoder(resolve_model_path(MODEL), num_labels=1, max_length=256, device="cpu")
    loss = MultipleNegativesRankingLoss(model, num_negatives=1, activation_fn=torch.nn.Identity(), scale=1.0)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    arguments = CrossEncoderTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=QUERIES, max_steps=steps, learning_rate=1e-5,
        weight_decay=0.01, lr_scheduler_type="constant", max_grad_norm=10.0, save_strategy="no", report_to=[],
        logging_steps=steps, seed=42, use_cpu=True, dataloader_drop_last=True, disable_tqdm=True)
    CrossEncoderTrainer(model=model, args=arguments, train_dataset=Dataset.from_dict(columns), loss=loss,
                        callbacks=[StepTimer()]).train()
    timed = times[WARMUP_STEPS:]
    per_step = QUERIES * (1 + NEGATIVES + 1)
    return {"pairs_per_s": per_step * len(timed) / sum(timed), "pairs_per_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:  # a child: run one side, print its figures as JSON
        with tempfile.TemporaryDirectory() as out:
            side = run_ours if args.side == "ours" else run_peer
            result = side(Path(args.data), Path(out) / "run", args.steps)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(Path(tmp))
        results = {}
        for side in ("ours", "peer"):
            done = subprocess.run([sys.executable, __file__, "--side", side, "--data", str(data),
                                   "--steps", str(args.steps)], check=True, capture_output=True, text=True)
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    for side, name in (("ours", "crossrank train()"), ("peer", "sentence-transformers CrossEncoderTrainer+MNRL")):
        r = results[side]
        print(f"{name:48s} {r['pairs_per_s']:8.1f} pairs/s  ({r['pairs_per_step']} pairs/step)  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    ratio = results["ours"]["pairs_per_s"] / results["peer"]["pairs_per_s"]
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"CL training throughput ratio crossrank/sentence-transformers = {ratio:.2f} (target >= {TARGET}) {verdict}")


if __name__ == "__main__":
    main()
