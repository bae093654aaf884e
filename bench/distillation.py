"""Distillation on real text: does crossrank train a re-ranker that ranks well? A MiniLM cross-encoder student is
distilled from a teacher on teacher-labelled pseudo-queries and tested on TREC DL 2020's 54 judged queries (BM25
top-100 with text, ../shared/data/trec-dl/dl20), against sentence-transformers' `CrossEncoderTrainer` trained on
the identical examples for the identical budget (same optimiser steps, queries, passages, loss, learning rate,
schedule, precision, truncation).

Every stage is the project's own command line in a subprocess, as a user would run it (W = the work folder,
exported as $CROSSRANK_DISTIL, where configs/datasets/dl19-pseudo.yaml finds its files; RECIPE =
configs/recipes/distil-minilm-cpu.yaml):

  1. pseudo-queries  from the DL19 passages that DL20 does not use (bench code: no human judgement involved)
  2. BM25            python -m crossrank bm25 --dataset dl19-pseudo --k K                    (top-K candidates)
  3. teacher         python -m crossrank neural-teacher --dataset dl19-pseudo --run bm25 --model MODEL --kind bi --k K
                     (and the same over DL20's BM25 top-100: the teacher's row of the table)
  4. preprocessing   python preprocessing.py --dataset dl19-pseudo --objective KD --evalperc 0 --out W/data/KD
  5. training        python train.py --config RECIPE data.train=W/data/KD train.output_dir=W/models/crossrank
                        train.max_steps=S
                     run up to 1/4, 1/2 and all of the steps: each segment resumes the previous one exactly (the
                     recipe's learning rate is constant after warm-up, a function of the step), so the learning curve
                     costs no extra training
  6. re-ranking      python infer.py --config RECIPE --model <checkpoint> eval.dataset=W/dl20.yaml  (each segment)
  7. peer            CrossEncoderTrainer (this file, `--peer`): the first S x batch examples of crossrank's stream
                     (crossrank.data.TrainingData, the examples train.py used), RankNetLoss / ListNetLoss, saving at the
                     same fractions; its checkpoints are re-ranked by the same infer.py
  8. comparison      python -m crossrank compare -d W/dl20.yaml --depth 100 (BM25, teacher, both students)

Pseudo-queries: for a passage, its 3-6 most salient words (tf-idf over the DL19 passages: stopwords, numbers,
words of one passage and words of more than 5% of the passages excluded), in passage order, e.g. "nitrogen liquid
dewars boiling cryogenics". Why: short keyword queries like web queries; no query generator is available offline;
the words come from one passage but BM25 retrieves others that share them, so the teacher's order over the top-K
is informative (not just "the source passage first"); deterministic (seeded) and instant. The DL20 test never
sees a training passage: the 66 DL19 passages that are also DL20 candidates are removed from the training corpus.

    python bench/distillation.py                       # the whole benchmark (2 threads)
    python bench/distillation.py --threads 1 --steps 40                # a smaller run (1 thread, 40 steps)
    python bench/distillation.py --smoke 3 --steps 4 --k 20            # a pipeline check on 3 DL20 queries
    python bench/distillation.py --skip-peer           # crossrank only

Last line: `student nDCG@10 / teacher = X (target >= 0.9; ...) PASS|FAIL`; all targets: the crossrank student
above BM25 with p < 0.05 (paired two-sided t-test over the 54 queries), >= 0.9 x the teacher, >= the
sentence-transformers student, and the whole run <= 90 minutes (the issue's budget on a 2-core machine).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ../shared/data/trec-dl beside the project (found by walking up, as tests/conftest.py does); --trec-dl overrides
TREC_DL = next((p / "shared" / "data" / "trec-dl" for p in ROOT.parents if (p / "shared" / "data").is_dir()),
               ROOT.parent / "shared" / "data" / "trec-dl")
TEACHER = "packaged:all-MiniLM-L6-v2"
RECIPE = ROOT / "configs" / "recipes" / "distil-minilm-cpu.yaml"
COMPARE = [sys.executable, "-m", "crossrank", "compare"]
TRAIN_NAME = "dl19-pseudo"  # configs/datasets/dl19-pseudo.yaml: its files live in $CROSSRANK_DISTIL
TEST_NAME = "dl20-distil"  # the DL20 dataset as this bench declares it (runs/<name>.bm25.<model>.run)
RATIO_TARGET, P_TARGET, MINUTES_TARGET = 0.9, 0.05, 90.0
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
ST_LOSSES = {"rank_net": "RankNetLoss", "list_net": "ListNetLoss"}  # crossrank loss -> sentence-transformers'


# ---------------------------------------------------------------------------------------------------------
# Machine and commands


def cpu_line(threads: int) -> str:
    name, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("?", ""):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags] or ["none of " + ",".join(CPU_FLAGS)]
    return (f"CPU: {name}; {os.cpu_count()} cores, {threads} thread(s) used; flags {' '.join(have)}; load average "
            f"{os.getloadavg()[0]:.1f}")


class Commands:
    """Runs the project's commands in subprocesses with the bench's thread count, timing each stage."""

    def __init__(self, threads: int, log: Path):
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                        TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
        self.log, self.times = log, collections.Counter()

    def __call__(self, stage: str, *cmd, quiet: bool = True) -> str:
        began = time.monotonic()
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(map(str, cmd))}\n")
            log.flush()
            done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=self.env, text=True, stdout=subprocess.PIPE,
                                  stderr=log)
            log.write(done.stdout)
        self.times[stage] += time.monotonic() - began
        if done.returncode:
            tail = self.log.read_text().splitlines()[-15:]
            sys.exit(f"{stage} failed (exit {done.returncode}): {' '.join(map(str, cmd))}\n" + "\n".join(tail))
        if not quiet:
            print(done.stdout.rstrip(), flush=True)
        return done.stdout


# ---------------------------------------------------------------------------------------------------------
# Data: pseudo-queries over the DL19 passages, the DL20 test as a dataset


WORD = re.compile(r"[a-z][a-z0-9'-]*[a-z0-9]|[a-z]")


def pseudo_queries(work: Path, count: int, seed: int) -> tuple[Path, Path, int]:
    """W/pq/corpus.jsonl (DL19 passages minus every DL20 candidate) and W/pq/topics.tsv (`count` pseudo-queries
    of passages drawn at random); see the module docstring. Returns (corpus, topics, passages)."""
    from pyterrier_pisa.stopwords import _STOPWORDS

    stop = set(_STOPWORDS["terrier"])
    test = {json.loads(line)["_id"] for line in open(TREC_DL / "dl20" / "corpus.jsonl", encoding="utf-8")}
    folder = work / "pq"
    folder.mkdir(parents=True, exist_ok=True)
    docs: list[list[str]] = []
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as out:
        for line in open(TREC_DL / "dl19" / "corpus.jsonl", encoding="utf-8"):
            record = json.loads(line)
            if record["_id"] not in test:
                out.write(line)
                docs.append(WORD.findall(f"{record.get('title', '')} {record['text']}".lower()))
    df = collections.Counter(w for words in docs for w in set(words))
    n, rng = len(docs), random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    made = 0
    with open(folder / "topics.tsv", "w", encoding="utf-8") as out:
        for i in order:
            tf = collections.Counter(docs[i])
            weight = {w: (1 + math.log(c)) * math.log(n / df[w]) for w, c in tf.items()
                      if w not in stop and len(w) > 2 and not w.isdigit() and 2 <= df[w] <= 0.05 * n}
            if len(weight) < 3:
                continue
            top = set(sorted(weight, key=lambda w: (-weight[w], w))[: rng.randint(3, 6)])
            words = list(dict.fromkeys(w for w in docs[i] if w in top))
            out.write(f"pq{made}\t{' '.join(words)}\n")
            made += 1
            if made == count:
                break
    return folder / "corpus.jsonl", folder / "topics.tsv", n


def write_datasets(work: Path, smoke: int = 0) -> tuple[Path, Path]:
    """The training side is configs/datasets/dl19-pseudo.yaml (its files in $CROSSRANK_DISTIL = W); the test is
    W/dl20.yaml (local DL20 text, absolute paths; datasets take any YAML path). `smoke`: only the first N judged
    DL20 queries (a quick check of the pipeline, not a result). Returns (training dataset key, test YAML)."""
    dl20 = work / "dl20.yaml"
    d = TREC_DL / "dl20"
    topics, bm25 = d / "queries.jsonl", d / "runs" / "bm25.top100.run"
    if smoke:
        from crossrank.data.texts import read_topics

        kept = dict(list(read_topics(topics).items())[:smoke])
        topics, bm25 = work / "dl20.smoke.tsv", work / "dl20.smoke.bm25.run"
        topics.write_text("".join(f"{q}\t{t}\n" for q, t in kept.items()))
        bm25.write_text("".join(line for line in open(d / "runs" / "bm25.top100.run") if line.split()[0] in kept))
    dl20.write_text(f"name: {TEST_NAME}\ncorpus: {d}/corpus.jsonl\ntopics: {topics}\nqrels: {d}/qrels.tsv\n"
                    f"runs:\n  bm25: {bm25}\nrel_level: 2\n")
    return TRAIN_NAME, dl20


# ---------------------------------------------------------------------------------------------------------
# Evaluation


class Scores:
    """nDCG@10 per DL20 query (crossrank.evaluation: trec_eval's ties; a missing query scores 0)."""

    def __init__(self, dataset: Path):
        from crossrank.evaluation import metrics as evaluation
        from crossrank.data.datasets import load_dataset
        from crossrank.data.qrels import read_qrels
        from crossrank.data.texts import read_topics

        self.evaluation, test = evaluation, load_dataset(str(dataset))
        self.qrels, self.topics = read_qrels(test.source("qrels")), read_topics(test.source("topics"))
        self.metric = evaluation.parse_metrics(["nDCG@10"], 2)
        self.qids = sorted(evaluation.judged_qids(self.qrels, self.topics))

    def per_query(self, run: Path) -> list[float]:
        from crossrank.data.runs import load_run

        table = self.evaluation.evaluate(load_run(run, depth=100), self.qrels, self.metric, self.topics, "x").per_query
        values = table["nDCG@10"].to_dict()
        return [float(values.get(q, 0.0)) for q in self.qids]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def p_value(a: list[float], b: list[float]) -> float:
    from scipy.stats import ttest_rel

    return float(ttest_rel(a, b).pvalue)


# ---------------------------------------------------------------------------------------------------------
# Training: crossrank in segments, the peer on the same examples


def cpu_training_precision(requested: str) -> str:
    from crossrank.training.loop import cpu_training_precision as resolve

    return resolve(requested)


def recipe_config(data: Path, recipe: Path, overrides: list[str]):
    from crossrank.config import load_run_config

    return load_run_config([recipe], [f"data.train={data}", *overrides])


def curve_steps(steps: int) -> list[int]:
    return sorted({max(1, steps // 4), max(1, steps // 2), steps})


def rerank(run: Commands, model: Path, name: str, dl20: Path, recipe: Path, overrides: list[str], work: Path) -> Path:
    """infer.py over DL20's BM25 top-100 with the checkpoint at W/models/<name>/model; the run moved to W/runs/."""
    folder = work / "models" / name / "model"
    if model != folder:
        shutil.rmtree(folder.parent, ignore_errors=True)
        shutil.copytree(model, folder)
    run("re-rank", sys.executable, "infer.py", "--config", recipe, "--model", folder, f"eval.dataset={dl20}", *[o for o in overrides if o.startswith("model.")])
    out = work / "runs" / f"{name}.run"
    produced = ROOT / "runs" / f"{TEST_NAME}.bm25.{name}.run"
    shutil.move(produced, out)
    for extra in ROOT.glob(f"runs/{TEST_NAME}.bm25.{name}.*"):  # per-query CSV, plot, config: keep them with it
        shutil.move(extra, work / "runs" / extra.name)
    return out


def segmented(recipe: Path, overrides: list[str]) -> bool:
    """Whether the curve can come from one run extended segment by segment: with a constant learning rate after
    warm-up the lr is a function of the step alone, so a resumed longer run is the run. A decaying schedule depends
    on train.max_steps: then each point of the curve is a run of its own (growing numbers of training queries)."""
    return recipe_config(Path("."), recipe, overrides).optim.schedule == "constant"


def train_crossrank(run: Commands, data: Path, recipe: Path, steps: int, overrides: list[str], work: Path,
                    dl20: Path) -> list[tuple[int, float, Path]]:
    """train.py up to each curve point; returns [(steps, train seconds, DL20 run)]. Segmented: each segment
    resumes the last (seconds accumulate); else one run per point (seconds of that run)."""
    one_run, points, spent = segmented(recipe, overrides), [], 0.0
    for s in curve_steps(steps):
        folder = work / "models" / ("crossrank" if one_run else f"crossrank-run{s}")
        began = time.monotonic()
        run("train crossrank", sys.executable, "train.py", "--config", recipe, f"data.train={data}",
            f"train.output_dir={folder}", f"train.max_steps={s}", *overrides)
        spent = (spent if one_run else 0.0) + time.monotonic() - began
        points.append((s, spent, rerank(run, folder / "model", f"crossrank-s{s}", dl20, recipe, overrides, work)))
    return points


def train_peer(run: Commands, data: Path, recipe: Path, steps: int, overrides: list[str], work: Path,
               dl20: Path) -> list[tuple[int, float, Path]]:
    """The peer in a child process (its own threads and memory), then each saved checkpoint re-ranked: one run
    saving at every curve point, or (a decaying schedule, see `segmented`) one run per point."""
    runs = [steps] if segmented(recipe, overrides) else curve_steps(steps)
    seconds, where = {}, {}
    for total in runs:
        out = work / "models" / f"st-run{total}"
        shutil.rmtree(out, ignore_errors=True)
        stdout = run("train sentence-transformers", sys.executable, __file__, "--peer", "--data", data, "--recipe",
                     recipe, "--steps", total, "--out", out, *(["--single"] if len(runs) > 1 else []),
                     *[a for o in overrides for a in ("--set", o)])
        for s, t in json.loads(stdout.strip().splitlines()[-1])["seconds"].items():
            if int(s) in curve_steps(steps) and (len(runs) == 1 or int(s) == total):
                seconds[int(s)], where[int(s)] = t, out / f"checkpoint-{s}"
    return [(s, seconds.get(s, float("nan")), rerank(run, where[s], f"st-s{s}", dl20, recipe, overrides, work))
            for s in curve_steps(steps)]


def peer(args) -> None:
    """Child: CrossEncoderTrainer on the first steps x batch examples of crossrank's stream; prints JSON."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder import losses
    from transformers import TrainerCallback

    from crossrank.training.data import load_training_data
    from crossrank.models.mono import resolve_model_path

    began = time.monotonic()  # the curve's seconds count from here: data, model and training, as train.py's wall
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = recipe_config(Path(args.data), Path(args.recipe), args.set)
    if cfg.train.loss not in ST_LOSSES:
        sys.exit(f"--peer: train.loss={cfg.train.loss} has no sentence-transformers counterpart here "
                 f"(expected one of {', '.join(ST_LOSSES)})")
    stream, _ = load_training_data(cfg)
    batch = cfg.train.queries_per_batch * cfg.train.accumulation  # queries per optimiser step, as train.py
    examples = [stream.example(p) for p in range(args.steps * batch)]
    columns = {"query": [stream.topics[e.qid] for e in examples],
               "docs": [[stream.passages[d] for d in e.docnos] for e in examples],
               "labels": [[float(t) for t in e.targets] for e in examples]}
    torch.manual_seed(cfg.train.seed)
    model = CrossEncoder(resolve_model_path(cfg.model.path), num_labels=1, max_length=cfg.model.max_length,
                         device="cpu")
    loss_class = getattr(losses, ST_LOSSES[cfg.train.loss])
    extra = {"reduction_log": "natural"} if cfg.train.loss == "rank_net" else {}  # crossrank's RankNet: natural log
    loss = loss_class(model, activation_fn=torch.nn.Identity(), **extra)  # its default: the step's pairs in one batch
    seconds = {}

    class Clock(TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            seconds[str(state.global_step)] = round(time.monotonic() - began, 1)

    points = [args.steps] if args.single else curve_steps(args.steps)
    schedule = "constant_with_warmup" if cfg.optim.schedule == "constant" else "linear"
    arguments = CrossEncoderTrainingArguments(
        output_dir=args.out, per_device_train_batch_size=batch, max_steps=args.steps, learning_rate=cfg.optim.lr,
        warmup_steps=cfg.optim.warmup_steps, lr_scheduler_type=schedule, weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.grad_clip or 1e9, bf16=cpu_training_precision(cfg.train.cpu_precision) == "bf16", use_cpu=True, seed=cfg.train.seed,
        save_strategy="steps", save_steps=points[0], save_only_model=True, report_to=[], logging_steps=10,
        dataloader_drop_last=True, disable_tqdm=True)
    CrossEncoderTrainer(model=model, args=arguments, train_dataset=Dataset.from_dict(columns), loss=loss,
                        callbacks=[Clock()]).train()
    for s in points:  # save_steps saves every points[0] steps; make sure each curve point has its checkpoint
        if not (Path(args.out) / f"checkpoint-{s}").is_dir():
            sys.exit(f"--peer: no checkpoint-{s} in {args.out}")
    print(json.dumps({"seconds": seconds}))


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    global TREC_DL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every command (default 2)")
    parser.add_argument("--recipe", default=str(RECIPE), help="training recipe YAML (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps (default: the recipe's train.max_steps)")
    parser.add_argument("--k", type=int, default=50, help="BM25 candidates per pseudo-query the teacher scores")
    parser.add_argument("--seed", type=int, default=42, help="seed of the pseudo-queries")
    parser.add_argument("--queries", type=int, default=0, help="pseudo-queries made and labelled (default: twice "
                        "the steps x queries per step, so training draws each query at most once from a larger pool)")
    parser.add_argument("--work", default="", help="working folder (default: a temporary one, removed)")
    parser.add_argument("--skip-peer", action="store_true", help="no sentence-transformers student")
    parser.add_argument("--set", action="append", default=[], help="extra key=value for train.py (both students)")
    parser.add_argument("--smoke", type=int, default=0, help="test on the first N DL20 queries only (a pipeline "
                        "check, not a result)")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trec-dl", default=str(TREC_DL), help="the shared TREC DL folder (default: %(default)s)")
    args = parser.parse_args()
    TREC_DL = Path(args.trec_dl)
    if args.queries < 0 or args.steps < 0 or args.k < 1 or args.threads < 1:
        parser.error("--queries and --steps are counts (0 = the default); --k and --threads at least 1")
    if args.peer:
        return peer(args)
    began = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (TREC_DL / "dl20" / "runs" / "bm25.top100.run").is_file():
        sys.exit(f"{TREC_DL}: TREC DL 2019/2020 with text are needed (see ../shared/data/README.md)")
    import torch

    torch.set_num_threads(args.threads)
    recipe = Path(args.recipe).resolve()
    cfg = recipe_config(Path("."), recipe, args.set)
    steps = args.steps or cfg.train.max_steps
    batch = cfg.train.queries_per_batch * cfg.train.accumulation
    if cfg.optim.schedule != "constant":
        print(f"note: the recipe's learning rate decays over train.max_steps: each point of the learning curve is a run "
              f"of its own ({', '.join(map(str, curve_steps(steps)))} steps), for both students")
    with tempfile.TemporaryDirectory(prefix="distil-") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        for sub in ("runs", "models"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ["CROSSRANK_DISTIL"] = str(work)  # where dl19-pseudo's files are, for every command started
        run = Commands(args.threads, work / "commands.log")
        print(cpu_line(args.threads))
        print(f"recipe {recipe.name}: {steps} steps x {batch} pseudo-queries x {cfg.data.num_negatives + 1} passages "
              f"(of the teacher's top {cfg.data.depth}, {cfg.data.sampling}), loss {cfg.train.loss} on "
              f"{cfg.data.targets}, lr {cfg.optim.lr:g} (warm-up {cfg.optim.warmup_steps}, {cfg.optim.schedule}), "
              f"max_length {cfg.model.max_length}, {cpu_training_precision(cfg.train.cpu_precision)} on the CPU; work folder {work}",
              flush=True)
        t = time.monotonic()
        pool = args.queries or 2 * steps * batch
        corpus, topics, passages = pseudo_queries(work, pool, args.seed)
        run.times["pseudo-queries"] += time.monotonic() - t
        pq, dl20 = write_datasets(work, args.smoke)
        run("BM25", sys.executable, "-m", "crossrank", "bm25", "--dataset", pq, "--k", args.k, "--threads", args.threads,
            "--out", work / "pq" / "bm25.run")
        run("teacher", sys.executable, "-m", "crossrank", "neural-teacher", "--dataset", pq, "--run", "bm25", "--model",
            TEACHER, "--kind", "bi", "--k", args.k, "-o", work / "pq" / "teacher.run", "--no-progress")
        teacher_run = work / "runs" / "teacher.run"
        run("teacher (DL20)", sys.executable, "-m", "crossrank", "neural-teacher", "--dataset", dl20, "--run", "bm25",
            "--model", TEACHER, "--kind", "bi", "--k", "100", "-o", teacher_run, "--no-progress")
        data = work / "data" / "KD"
        run("preprocessing", sys.executable, "preprocessing.py", "--dataset", pq, "--objective", "KD", "--evalperc",
            "0", "--out", data)
        print(f"training data: {pool} pseudo-queries of {passages} DL19 passages (none of them a DL20 candidate), "
              f"BM25 top {args.k} each, scored by the teacher {TEACHER} (bi-encoder, cosine); training draws "
              f"{steps * batch} of them", flush=True)
        ours = train_crossrank(run, data, recipe, steps, args.set, work, dl20)
        theirs = [] if args.skip_peer else train_peer(run, data, recipe, steps, args.set, work, dl20)
        from crossrank.data.datasets import load_dataset

        bm25_run = Path(load_dataset(str(dl20)).run("bm25"))
        final = {"BM25": bm25_run, "teacher": teacher_run, "crossrank student": ours[-1][2]}
        if theirs:
            final["sentence-transformers student"] = theirs[-1][2]
        comparison = run("compare", *COMPARE, "-d", dl20, "--depth", "100", *final.values())
        wall = (time.monotonic() - began) / 60

        scores = Scores(dl20)
        values = {name: scores.per_query(path) for name, path in final.items()}
        print(f"\nTREC DL 2020, {len(scores.qids)} judged queries, BM25 top-100 re-ranked (python -m crossrank compare):")
        print(comparison.rstrip())
        print(f"\n{'system':34s} {'nDCG@10':>8s} {'p vs BM25':>10s}")
        for name, v in values.items():
            p = "" if name == "BM25" else f"{p_value(v, values['BM25']):10.2g}"
            print(f"{name:34s} {mean(v):8.4f} {p}")
        print(f"\nlearning curve (nDCG@10 on DL20 after a share of the {steps} steps; seconds of training so far, "
              f"{args.threads} thread(s): crossrank = the train.py commands' wall time, st = its process's since it "
              f"began loading data):")
        print(f"{'steps':>6s} {'queries':>8s} {'crossrank':>10s} {'(s)':>7s}" + (f" {'st':>8s} {'(s)':>7s}" if theirs else ""))
        for i, (s, seconds, path) in enumerate(ours):
            line = f"{s:6d} {s * batch:8d} {mean(scores.per_query(path)):10.4f} {seconds:7.0f}"
            if theirs:
                line += f" {mean(scores.per_query(theirs[i][2])):8.4f} {theirs[i][1]:7.0f}"
            print(line)
        print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in run.times.items()))

    student, teacher, bm25 = (mean(values[k]) for k in ("crossrank student", "teacher", "BM25"))
    p = p_value(values["crossrank student"], values["BM25"])
    ratio = student / teacher
    missed = []
    if not (student > bm25 and p < P_TARGET):
        missed.append(f"above BM25 {student:.4f} vs {bm25:.4f}, p {p:.2g}")
    if ratio < RATIO_TARGET:
        missed.append(f"student/teacher {ratio:.3f}")
    if theirs and student < mean(values["sentence-transformers student"]):
        missed.append(f"crossrank {student:.4f} < sentence-transformers {mean(values['sentence-transformers student']):.4f}")
    if wall > MINUTES_TARGET:
        missed.append(f"wall {wall:.1f} min")
    verdict = "PASS" if not missed else f"FAIL (missed: {'; '.join(missed)})"
    print(f"student nDCG@10 / teacher = {ratio:.3f} (target >= {RATIO_TARGET}; all targets: above BM25 with p < "
          f"{P_TARGET}, >= sentence-transformers at the same examples and steps, wall {wall:.1f} <= "
          f"{MINUTES_TARGET:.0f} min) {verdict}")


if __name__ == "__main__":
    main()
