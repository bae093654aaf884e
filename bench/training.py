"""Mono training throughput and memory on real text: crossrank's `train()` against a plain PyTorch loop and
sentence-transformers' `CrossEncoderTrainer`, for both recipes' micro-batches.

Text: TREC DL 2019 queries with their BM25 top-100 passages (../shared/data/trec-dl/dl19; the synthetic demo
collection only when that folder is absent, and the output says so). Model: the packaged all-MiniLM-L6-v2 with a
fresh 1-logit head, the pair cut to 256 tokens, AdamW lr 1e-5, fp32 on CPU, one micro-batch per optimiser step.

    KD   16 queries x the top-20 (BM25 stands in for the teacher: target 21 - rank), RankNet
    CL    4 queries x 100 passages (the whole top-100; the best-graded one is LCE's positive), LCE / InfoNCE

Contenders, each in a fresh subprocess (so its peak RSS is its own), on the same examples:
    crossrank   train(): length-sorted chunks of <= train.batch_tokens padded tokens, cached score gradients
    plain       tokenizer(padding=True) on the whole micro-batch, one forward, the same loss, backward, step
    st          CrossEncoderTrainer with RankNetLoss (KD) / CachedMultipleNegativesRankingLoss (CL; its hard
                negatives are our 99 negatives, plus the 1 in-batch negative it cannot switch off)
A whole-padded micro-batch keeps [N, heads, L, L] attention tensors in its graph: 80 DL19 pairs measured 8.6 GB, so
320-400 pairs would need ~30 GB (linear in N), more than this shared 23 GB machine has: `plain` (and `st` for KD, whose RankNetLoss
keeps every mini-batch's graph too) run the largest micro-batch that fits safely (`--plain-queries`), which is
said in the output. On a CPU, throughput per pair hardly depends on the micro-batch size; memory grows with it, so
the memory ratio is conservative. pairs/s = scored pairs (forward + backward) per second over the timed steps.

    python bench/training.py [--steps 3] [--recipes KD,CL]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DL19 = ROOT.parent / "shared" / "data" / "trec-dl" / "dl19"
MODEL = "packaged:all-MiniLM-L6-v2"
WARMUP_STEPS = 1
RECIPES = {  # queries per micro-batch, passages per query, crossrank loss, sampling
    "KD": dict(queries=16, docs=20, loss="rank_net", sampling="top", targets="teacher_rank", plain_queries=4),
    "CL": dict(queries=4, docs=100, loss="lce", sampling="random", targets="relevance", plain_queries=1),
}
SPEED_TARGET, MEMORY_TARGET, PEER_TARGET = 2.0, 0.5, 1.5


def build_data(folder: Path) -> tuple[Path, str]:
    """A preprocessed folder (crossrank's layout) of DL19 BM25 top-100 lists, or of the demo collection."""
    from crossrank.data.runs import load_run
    from crossrank.data.qrels import read_qrels
    from crossrank.data.texts import read_topics
    from crossrank.training.examples import TrainingQuery, write_meta, write_split

    if (DL19 / "runs" / "bm25.top100.run").is_file():
        topics, corpus, source = DL19 / "queries.jsonl", DL19 / "corpus.jsonl", "TREC DL 2019 BM25 top-100 (real text)"
        run, qrels = load_run(DL19 / "runs" / "bm25.top100.run", depth=100), read_qrels(DL19 / "qrels.tsv")
    else:
        from crossrank.demo import generate

        generate(folder / "demo")
        topics, corpus = folder / "demo" / "topics.train.tsv", folder / "demo" / "corpus.tsv"
        qrels, source = read_qrels(folder / "demo" / "qrels.train.txt"), "SYNTHETIC demo text (dl19 absent)"
        docnos = [line.split("\t", 1)[0] for line in corpus.read_text().splitlines()]
        run = {q: [(d, 0.0) for d in sorted(qrels.get(q, {}))[:3] + docnos[:97]] for q in read_topics(topics)}
    queries = [TrainingQuery(q, [d for d, _ in r], [float(len(r) - i) for i in range(len(r))], qrels.get(q, {}))
               for q, r in run.items() if len(r) >= 100]
    folder.mkdir(parents=True, exist_ok=True)
    write_split(folder, "train", queries)
    write_split(folder, "valid", [])
    write_meta(folder, {"dataset": "bench", "objective": "CL", "topics": str(topics), "corpus": str(corpus),
                        "qrels": "", "evalperc": 0, "seed": 42, "rel_level": 2})
    return folder, source


def config(data: Path, out: Path, recipe: str, steps: int, queries: int, extra: list[str] = ()):
    from crossrank.config import load_run_config

    r = RECIPES[recipe]
    return load_run_config([ROOT / "configs" / "backbones" / "minilm.yaml"], [
        f"data.train={data}", f"data.sampling={r['sampling']}", f"data.num_negatives={r['docs'] - 1}",
        f"data.depth={r['docs']}", f"data.targets={r['targets']}", f"train.loss={r['loss']}",
        f"train.queries_per_batch={queries}", "train.accumulation=1", f"train.max_steps={steps}",
        "train.log_every=1", "train.eval_every=100000", "train.save_every=100000", f"train.output_dir={out}",
        "train.precision=fp32", "optim.lr=1e-5", *extra])


def examples(data: Path, out: Path, recipe: str, steps: int, queries: int):
    from crossrank.training.data import load_training_data

    stream, _ = load_training_data(config(data, out, recipe, steps, queries))
    return stream, [[stream.example(s * queries + i) for i in range(queries)] for s in range(steps)]


def run_crossrank(data: Path, out: Path, recipe: str, steps: int, args) -> dict:
    from crossrank.training.loop import train

    queries = RECIPES[recipe]["queries"]
    train(config(data, out, recipe, steps, queries, [f"train.batch_tokens={args.batch_tokens}"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][WARMUP_STEPS:]
    pairs = queries * RECIPES[recipe]["docs"]
    return {"pairs_per_s": pairs * len(rows) / sum(pairs / r["pairs_per_s"] for r in rows), "queries": queries}


def run_plain(data: Path, out: Path, recipe: str, steps: int, args) -> dict:
    """The plainest loop: pad the whole micro-batch, one forward and backward, step."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from crossrank.training.losses import LOSSES
    from crossrank.models.mono import resolve_model_path

    queries = args.plain_queries or RECIPES[recipe]["plain_queries"]
    stream, batches = examples(data, out, recipe, steps, queries)
    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MODEL))
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(MODEL), num_labels=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    loss_fn, times, pairs = LOSSES[RECIPES[recipe]["loss"]], [], 0
    for batch in batches:
        started = time.perf_counter()
        width = max(len(e.docnos) for e in batch)
        mask = torch.tensor([[j < len(e.docnos) for j in range(width)] for e in batch])  # [Q, D]
        targets = torch.tensor([e.targets + [0.0] * (width - len(e.targets)) for e in batch])  # [Q, D]
        inputs = tokenizer([stream.topics[e.qid] for e in batch for _ in e.docnos],
                           [stream.passages[d] for e in batch for d in e.docnos], padding=True, truncation=True,
                           max_length=256, return_tensors="pt")  # [N, L], L = the longest pair
        flat = model(**inputs).logits.squeeze(-1)  # [N]
        loss = loss_fn(torch.zeros(mask.shape).masked_scatter(mask, flat), targets, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        pairs = int(mask.sum())
    timed = times[WARMUP_STEPS:]
    return {"pairs_per_s": pairs * len(timed) / sum(timed), "queries": queries}


def run_st(data: Path, out: Path, recipe: str, steps: int, args) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import CachedMultipleNegativesRankingLoss, RankNetLoss
    from transformers import TrainerCallback

    from crossrank.models.mono import resolve_model_path

    r = RECIPES[recipe]
    queries = r["queries"] if recipe == "CL" else (args.plain_queries or r["plain_queries"])
    stream, batches = examples(data, out, recipe, steps, queries)
    flat = [e for batch in batches for e in batch]
    torch.manual_seed(42)
    model = CrossEncoder(resolve_model_path(MODEL), num_labels=1, max_length=256, device="cpu")
    if recipe == "KD":
        columns = {"query": [stream.topics[e.qid] for e in flat],
                   "docs": [[stream.passages[d] for d in e.docnos] for e in flat], "labels": [e.targets for e in flat]}
        loss, per_step = RankNetLoss(model), queries * r["docs"]
    else:  # the positive first, then the 99 others as hard negatives
        columns = {"query": [stream.topics[e.qid] for e in flat]}
        best = [max(range(len(e.docnos)), key=lambda j: (e.targets[j], -j)) for e in flat]
        columns["positive"] = [stream.passages[e.docnos[b]] for e, b in zip(flat, best)]
        for j in range(r["docs"] - 1):
            columns[f"negative_{j}"] = [stream.passages[[d for i, d in enumerate(e.docnos) if i != b][j]]
                                        for e, b in zip(flat, best)]
        loss = CachedMultipleNegativesRankingLoss(model, num_negatives=1, scale=1.0, activation_fn=torch.nn.Identity(),
                                                  mini_batch_size=args.st_mini_batch)
        per_step = queries * (r["docs"] + 1)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    arguments = CrossEncoderTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=queries, max_steps=steps, learning_rate=1e-5,
        weight_decay=0.01, lr_scheduler_type="constant", max_grad_norm=10.0, save_strategy="no", report_to=[],
        logging_steps=steps, seed=42, use_cpu=True, dataloader_drop_last=True, disable_tqdm=True)
    CrossEncoderTrainer(model=model, args=arguments, train_dataset=Dataset.from_dict(columns), loss=loss,
                        callbacks=[StepTimer()]).train()
    timed = times[WARMUP_STEPS:]
    return {"pairs_per_s": per_step * len(timed) / sum(timed), "queries": queries}


SIDES = {"crossrank": run_crossrank, "plain": run_plain, "st": run_st}
NAMES = {"crossrank": "crossrank train()", "plain": "plain PyTorch loop (whole-padded)",
         "st": "sentence-transformers CrossEncoderTrainer"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per contender (the first is warm-up)")
    parser.add_argument("--recipes", default="KD,CL")
    parser.add_argument("--sides", default="crossrank,plain,st")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--plain-queries", type=int, default=0, help="plain (and st KD) micro-batch; 0 = see RECIPES")
    parser.add_argument("--st-mini-batch", type=int, default=16)
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:  # a child: run one contender, print its figures as JSON
        with tempfile.TemporaryDirectory() as out:
            result = SIDES[args.side](Path(args.data), Path(out) / "run", args.recipe, args.steps, args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        data, source = build_data(Path(tmp) / "data")
        print(f"text: {source}; {args.steps} steps per contender ({WARMUP_STEPS} warm-up), fp32, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        for recipe in args.recipes.split(","):
            r, results = RECIPES[recipe], {}
            for side in args.sides.split(","):
                done = subprocess.run([sys.executable, __file__, "--side", side, "--recipe", recipe, "--data", str(data),
                                       *sys.argv[1:]], capture_output=True, text=True)
                if done.returncode:
                    print(f"{recipe} {NAMES[side]}: failed ({done.stderr.strip().splitlines()[-1:]})")
                    continue
                results[side] = json.loads(done.stdout.strip().splitlines()[-1])
                res = results[side]
                print(f"{recipe} {NAMES[side]:44s} {res['pairs_per_s']:7.2f} pairs/s  peak RSS "
                      f"{res['peak_rss_mb']:6.0f} MB  micro-batch {res['queries']} x {r['docs']}")
            ours, plain, st = (results.get(s) for s in ("crossrank", "plain", "st"))
            if ours and plain:
                speed, memory = ours["pairs_per_s"] / plain["pairs_per_s"], ours["peak_rss_mb"] / plain["peak_rss_mb"]
                peer = ours["pairs_per_s"] / st["pairs_per_s"] if st else float("nan")
                missed = [f"{recipe} {name} {value:.2f}" for name, value, ok in (
                    ("speed/plain", speed, speed >= SPEED_TARGET), ("memory/plain", memory, memory <= MEMORY_TARGET),
                    ("speed/sentence-transformers", peer, not st or peer >= PEER_TARGET)) if not ok]
                verdicts.append((recipe, speed, missed))
                print(f"{recipe}: crossrank/plain pairs/s {speed:.2f} (target >= {SPEED_TARGET}), peak RSS "
                      f"{memory:.2f} (target <= {MEMORY_TARGET}); crossrank/sentence-transformers pairs/s {peer:.2f} "
                      f"(target >= {PEER_TARGET})")
    worst = min(verdicts, key=lambda v: v[1]) if verdicts else ("none", float("nan"), ["no result"])
    missed = [m for _, _, ms in verdicts for m in ms] if verdicts else ["no result"]
    verdict = "PASS" if not missed else f"FAIL (missed: {'; '.join(missed)})"
    print(f"training pairs/s ratio crossrank/plain loop (min over {','.join(v[0] for v in verdicts)}) = "
          f"{worst[1]:.2f} (target >= {SPEED_TARGET}; all targets: memory <= {MEMORY_TARGET}x plain, "
          f">= {PEER_TARGET}x sentence-transformers) {verdict}")


if __name__ == "__main__":
    main()
