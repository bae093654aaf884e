"""Bad input and user-caused faults against every entry point, as a user meets them: each case runs the real
command (a subprocess; the shell wrappers too) and must end in exit status 2 with exactly one line on stderr
that names the file (and line, where there is one), no traceback, and no new or changed output file.

Adding a case is one row of CASES: `Case(id, command, expect, prepare)`. `command` and `expect` are formatted
with the fixture's paths (`{w}`: the shared world, read-only; `{c}`: this case's own folder, a fresh copy of
the world's `case/` template; `{py}`: this Python); `prepare(c)` may break files in `{c}` before the run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import _build_bert_like, write_tiny_collection
from crossrank.config import ROOT

OUTPUT_FOLDERS = [ROOT / "runs", ROOT / "models", ROOT / "data"]  # where entry points write by default


@dataclasses.dataclass
class Case:
    id: str
    command: str  # shell words, formatted with {w}, {c}, {py}; run from the project folder
    expect: str  # formatted the same way; the one stderr line must contain it (the file, `file:line`, a flag)
    prepare: Callable[[Path], None] | None = None  # breaks files of the case folder {c} before the run
    needs: str = ""  # "mount:full|small|ro": a tmpfs at {c}/<kind> (root); "unprivileged": no root powers


# --- helpers for `prepare` ---------------------------------------------------------------------------------


def write(relative: str, text: str | bytes) -> Callable[[Path], None]:
    def prepare(c: Path) -> None:
        path = c / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return prepare


def truncate(relative: str, keep: float = 0.5) -> Callable[[Path], None]:
    def prepare(c: Path) -> None:
        data = (c / relative).read_bytes()
        (c / relative).write_bytes(data[: int(len(data) * keep)])
    return prepare


def empty_folder(relative: str) -> Callable[[Path], None]:
    def prepare(c: Path) -> None:
        shutil.rmtree(c / relative)
        (c / relative).mkdir()
    return prepare


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(c: Path) -> None:
        for step in steps:
            step(c)
    return prepare


def remove(folder: str, *names: str) -> Callable[[Path], None]:
    def prepare(c: Path) -> None:
        for name in names:
            (c / folder / name).unlink(missing_ok=True)
    return prepare


def append(relative: str, text: str) -> Callable[[Path], None]:
    def prepare(c: Path) -> None:
        with open(c / relative, "a") as f:
            f.write(text)
    return prepare


def flip_byte(relative: str) -> Callable[[Path], None]:
    """One bit in the middle of the file flipped: same size, still loadable perhaps, but not what was saved."""
    def prepare(c: Path) -> None:
        data = bytearray((c / relative).read_bytes())
        data[len(data) // 2] ^= 1
        (c / relative).write_bytes(bytes(data))
    return prepare


def read_only_cache(relative: str) -> Callable[[Path], None]:
    def prepare(c: Path) -> None:
        import sqlite3

        with sqlite3.connect(c / relative) as db:
            db.execute("CREATE TABLE pair_scores (model TEXT, query TEXT, passage TEXT, score REAL, "
                       "PRIMARY KEY (model, query, passage))")
        db.close()
        os.chmod(c / relative, 0o444)
    return prepare


TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GPT2_CONFIG = json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2})


TRAIN = "{py} train.py --config configs/objectives/CL.yaml model.path={w}/model model.name=tiny " \
        "data.train={w}/coll/CL data.num_negatives=3 data.depth=14 train.queries_per_batch=2 " \
        "train.accumulation=1 train.output_dir={c}/out"
RESUME = TRAIN.replace("{c}/out", "{c}/trained")  # {c}/trained is a copy of a 2-step run with a checkpoint
INFER = "{py} infer.py --model {w}/model eval.dataset={w}/toy.yaml"
FT = "./ft-monoencoder.sh -c {w}/model -d {w}/coll/CL.yaml"
INF_SH = "./inference-monoencoder.sh -M {w}/model -d {w}/toy.yaml"
COMPARE = "{py} -m crossrank compare --qrels {w}/coll/qrels.txt {w}/coll/run.txt"
PREP = "{py} preprocessing.py --dataset {w}/toy.yaml --objective CL --out {c}/prep"
RANK_GPT = "{py} rank_gpt.py --run {w}/coll/run.txt --topics {w}/coll/topics.tsv --corpus {w}/coll/corpus.tsv " \
           "--model m --base-url http://127.0.0.1:9 -o {c}/teacher.run"
BM25 = "./create_bm25_baseline_run.sh -d {w}/toy.yaml -o {c}/bm25.run"
COLBERT = "./create_colbert_baseline_runs.sh -d {w}/toy.yaml -o {c}/colbert.run"
IMPORT = "{py} -m crossrank first-stage import {w}/coll/run.txt {c}/imported.run"

CASES = [
    # --- item 2: every number is range-checked where it enters: config fields ---
    *[Case(f"config-{kv}", f"{TRAIN} {kv}", kv.split("=")[0]) for kv in [
        "train.eval_every=0", "train.save_every=0", "train.log_every=0", "train.max_steps=-1", "train.epochs=0",
        "train.queries_per_batch=0", "train.accumulation=0", "train.seed=-1", "train.duplicate_weight=-1",
        "train.previous_lr=-1e-5", "data.num_negatives=0", "data.depth=0", "data.relevant_level=-1",
        "optim.lr=0", "optim.lr=nan", "optim.lr=inf", "optim.grad_clip=-1", "optim.weight_decay=-0.01",
        "optim.warmup_steps=-1", "model.max_length=0", "model.query_length=0",
        "model.passage_length=-5", "model.freeze_layers=-1",
        "train.stage=3", "train.max_steps=abc", "train.los=lce"]],
    *[Case(f"infer-config-{kv}", f"{INFER} {kv}", kv.split("=")[0]) for kv in [
        "eval.depth=-1", "eval.depth=0", "eval.batch_tokens=0", "eval.block_queries=0"]],
    Case("config-not-key-value", f"{TRAIN} optim.lr", "optim.lr"),
    Case("config-yaml-wrong-type", f"{TRAIN} --config {{c}}/bad.yaml", "{c}/bad.yaml:2",
         write("bad.yaml", "train:\n  max_steps: many\n")),
    Case("config-yaml-out-of-range", f"{TRAIN} --config {{c}}/bad.yaml", "{c}/bad.yaml:2: train.log_every",
         write("bad.yaml", "train:\n  log_every: 0\n")),
    Case("config-yaml-invalid", f"{TRAIN} --config {{c}}/bad.yaml", "{c}/bad.yaml:",
         write("bad.yaml", "train:\n  max_steps: [1\n")),
    # --- item 2: CLI flags of the Python entry points ---
    Case("infer-lr-0", f"{INFER.replace('--model {w}/model', '--lr 0')}", "--lr"),
    Case("infer-seed-negative", f"{INFER} --seed -1", "--seed"),
    Case("preprocessing-evalperc-100", f"{PREP} --evalperc 100", "--evalperc"),
    Case("preprocessing-evalperc-negative", f"{PREP} --evalperc -1", "--evalperc"),
    Case("preprocessing-evalperc-nan", f"{PREP} --evalperc nan", "--evalperc"),
    Case("preprocessing-depth-0", f"{PREP} --depth 0", "--depth"),
    Case("preprocessing-seed-x", f"{PREP} --seed x", "--seed"),
    Case("compare-depth-0", f"{COMPARE} --depth 0", "--depth"),
    Case("compare-depth-negative", f"{COMPARE} --depth -1", "--depth"),
    Case("compare-rel-level-0", f"{COMPARE} --rel-level 0", "--rel-level"),
    Case("compare-baseline-missing", f"{COMPARE} --baseline 3", "--baseline"),
    Case("rank_gpt-limit-negative", f"{RANK_GPT} --limit -1", "--limit"),
    Case("rank_gpt-window-1", f"{RANK_GPT} --window 1", "--window"),
    Case("rank_gpt-step-0", f"{RANK_GPT} --step 0", "--step"),
    Case("rank_gpt-step-over-window", f"{RANK_GPT} --window 4 --step 5", "--step"),
    Case("rank_gpt-k-0", f"{RANK_GPT} --k 0", "--k"),
    Case("rank_gpt-concurrency-0", f"{RANK_GPT} --concurrency 0", "--concurrency"),
    Case("rank_gpt-timeout-0", f"{RANK_GPT} --timeout 0", "--timeout"),
    Case("rank_gpt-retries-negative", f"{RANK_GPT} --retries -1", "--retries"),
    Case("import-depth-0", f"{IMPORT} --depth 0", "--depth"),
    Case("import-queries-0", f"{IMPORT} --queries 0", "--queries"),
    Case("demo-seed-x", "{py} -m crossrank demo --out {c}/demo --seed x", "--seed"),
    # --- item 2: the shell wrappers' flags ---
    Case("ft-gpus-abc", f"{FT} -g abc", "-g abc"),
    Case("ft-gpus-trailing-comma", f"{FT} -g 0,", "-g 0,"),
    Case("ft-gpus-without-gpu", f"{FT} -g 0 train.output_dir={{c}}/out", "-g", needs="no-gpu"),
    Case("ft-stage-3", f"{FT} -f 3 train.output_dir={{c}}/out", "train.stage"),
    Case("ft-batch-0", f"{FT} -b 0 train.output_dir={{c}}/out", "train.queries_per_batch"),
    Case("ft-lr-negative", f"{FT} -l -1e-5 train.output_dir={{c}}/out", "optim.lr"),
    Case("ft-lr-abc", f"{FT} -l abc train.output_dir={{c}}/out", "optim.lr"),
    Case("ft-seed-negative", f"{FT} -s -1 train.output_dir={{c}}/out", "train.seed"),
    Case("ft-objective-unknown", f"{FT} -m XX", "-m XX"),
    Case("ft-unknown-flag", f"{FT} -x", "-x"),
    Case("ft-missing-value", f"{FT} -g", "-g"),
    Case("inference-k-negative", f"{INF_SH} -k -1", "eval.depth"),
    Case("inference-k-0", f"{INF_SH} -k 0", "eval.depth"),
    Case("inference-gpus-abc", f"{INF_SH} -g abc", "-g abc"),
    Case("inference-lr-0", f"{INF_SH} -l 0", "--lr"),
    Case("inference-missing-dataset", "./inference-monoencoder.sh -M {w}/model", "-d"),
    Case("bm25-k-negative", f"{BM25} -k -1", "--k"),
    Case("bm25-k-abc", f"{BM25} -k abc", "--k"),
    Case("bm25-threads-0", f"{BM25} -t 0", "--threads"),
    Case("bm25-missing-dataset", "./create_bm25_baseline_run.sh -k 5", "-d"),
    Case("colbert-k-0", f"{COLBERT} -k 0", "-k 0"),
    Case("colbert-batch-0", f"{COLBERT} -b 0", "-b 0"),
    Case("colbert-shard-negative", f"{COLBERT} -S -1", "-S -1"),
    Case("colbert-old-shard-flag", f"{COLBERT} -s 5", "use -S"),
    Case("inference-old-first-stage-flag", f"{INF_SH} -s colbert", "the first-stage run is -r now (-r colbert)"),
    Case("colbert-gpus-abc", f"{COLBERT} -g abc", "-g abc"),
    # --- item 4: missing files, folders for files, permissions, disk full, read-only file systems ---
    Case("compare-run-missing", f"{COMPARE} {{c}}/nothing.run", "{c}/nothing.run"),
    Case("compare-run-is-a-folder", f"{COMPARE} {{c}}", "{c}"),
    Case("compare-qrels-is-a-folder", "{py} -m crossrank compare --qrels {c} {w}/coll/run.txt", "{c}"),
    Case("train-config-missing", f"{TRAIN} --config {{c}}/nothing.yaml", "{c}/nothing.yaml"),
    Case("train-config-is-a-folder", f"{TRAIN} --config {{c}}", "{c}"),
    Case("train-data-missing", f"{TRAIN} data.train={{c}}/nowhere", "{c}/nowhere/meta.yaml"),
    Case("infer-model-missing", "{py} infer.py --model {c}/nothing eval.dataset={w}/toy.yaml", "{c}/nothing"),
    Case("infer-dataset-missing", "{py} infer.py --model {w}/model eval.dataset={c}/nothing.yaml", "nothing"),
    Case("preprocessing-dataset-missing", f"{PREP.replace('{w}/toy.yaml', '{c}/nothing.yaml')}", "nothing"),
    Case("import-source-missing", "{py} -m crossrank first-stage import {c}/nothing.run", "{c}/nothing.run"),
    Case("rank_gpt-run-missing", f"{RANK_GPT.replace('{w}/coll/run.txt', '{c}/nothing.run')}", "{c}/nothing.run"),
    Case("compare-qrels-unreadable", "{py} -m crossrank compare --qrels {c}/qrels.txt {w}/coll/run.txt",
         "{c}/qrels.txt", lambda c: (write("qrels.txt", "q0 0 d0_0 2\n")(c), os.chmod(c / "qrels.txt", 0)),
         needs="unprivileged"),
    Case("import-out-folder-not-writable", "{py} -m crossrank first-stage import {w}/coll/run.txt {c}/ro/x.run",
         "{c}/ro", lambda c: ((c / "ro").mkdir(), os.chmod(c / "ro", 0o555)), needs="unprivileged"),
    Case("import-disk-full", "{py} -m crossrank first-stage import {w}/coll/run.txt {c}/full/x.run", "{c}/full",
         needs="mount:full"),
    Case("import-read-only-fs", "{py} -m crossrank first-stage import {w}/coll/run.txt {c}/ro/x.run", "{c}/ro",
         needs="mount:ro"),
    Case("train-disk-full", f"{TRAIN.replace('{c}/out', '{c}/full/out')} train.max_steps=1", "{c}/full",
         needs="mount:full"),
    Case("preprocessing-read-only-fs", f"{PREP.replace('{c}/prep', '{c}/ro/prep')}", "{c}/ro", needs="mount:ro"),
    # --- item 4: corrupt checkpoints and caches ---
    Case("resume-truncated-state", RESUME, "{c}/trained/checkpoint/state.pt", truncate("trained/checkpoint/state.pt")),
    Case("resume-truncated-safetensors", RESUME, "{c}/trained/checkpoint/model.safetensors",
         truncate("trained/checkpoint/model.safetensors")),
    Case("resume-garbage-safetensors", RESUME, "{c}/trained/checkpoint/model.safetensors",
         write("trained/checkpoint/model.safetensors", b"\x00" * 100)),
    Case("resume-empty-checkpoint", RESUME, "{c}/trained/checkpoint", both(empty_folder("trained/checkpoint"),
                                                                           write("trained/checkpoint/state.pt", b""))),
    Case("resume-corrupt-metrics-line", RESUME, "{c}/trained/metrics.jsonl:1",
         write("trained/metrics.jsonl", '{"step": 1, "loss"\n{"step": 2, "loss": 1.0}\n')),
    Case("infer-truncated-safetensors", "{py} infer.py --model {c}/trained/model eval.dataset={w}/toy.yaml",
         "{c}/trained/model/model.safetensors", truncate("trained/model/model.safetensors")),
    Case("infer-empty-model-folder", "{py} infer.py --model {c}/trained/model eval.dataset={w}/toy.yaml",
         "{c}/trained/model", empty_folder("trained/model")),
    Case("infer-corrupt-score-cache", f"{INFER} eval.score_cache={{c}}/cache.sqlite", "{c}/cache.sqlite",
         write("cache.sqlite", b"this is not a database" * 100)),
    # --- issue 24 item 2: a model folder that lacks what it needs, holds a decoder, or was damaged after saving ---
    Case("infer-model-without-tokenizer", f"{INFER.replace('{w}/model', '{c}/trained/model')}",
         "{c}/trained/model: no tokenizer files", remove("trained/model", *TOKENIZER_FILES, "crossrank.manifest")),
    Case("train-stage2-init-without-tokenizer", f"{TRAIN} train.stage=2 train.init_from={{c}}/trained/model",
         "{c}/trained/model: no tokenizer files", remove("trained/model", *TOKENIZER_FILES, "crossrank.manifest")),
    Case("infer-model-tokenizer-removed-after-save", f"{INFER.replace('{w}/model', '{c}/trained/model')}",
         "{c}/trained/model/tokenizer.json: missing", remove("trained/model", "tokenizer.json")),
    Case("infer-model-edited-after-save", f"{INFER.replace('{w}/model', '{c}/trained/model')}",
         "{c}/trained/model/tokenizer_config.json: damaged", append("trained/model/tokenizer_config.json", " ")),
    Case("resume-state-bit-flip", RESUME, "{c}/trained/checkpoint/state.pt: damaged",
         flip_byte("trained/checkpoint/state.pt")),
    Case("resume-tokenizer-removed", RESUME, "{c}/trained/checkpoint/tokenizer.json: missing",
         remove("trained/checkpoint", "tokenizer.json")),
    Case("infer-model-no-weights", f"{INFER.replace('{w}/model', '{c}/trained/model')}",
         "{c}/trained/model: no weights", remove("trained/model", "model.safetensors", "crossrank.manifest")),
    Case("infer-model-decoder", f"{INFER.replace('{w}/model', '{c}/gpt2')}", "{c}/gpt2/config.json: a decoder-only",
         both(write("gpt2/config.json", GPT2_CONFIG), write("gpt2/model.safetensors", b""),
              write("gpt2/vocab.json", "{}"))),
    Case("train-model-decoder", f"{TRAIN} model.path={{c}}/gpt2", "{c}/gpt2/config.json: a decoder-only",
         both(write("gpt2/config.json", GPT2_CONFIG), write("gpt2/model.safetensors", b""),
              write("gpt2/vocab.json", "{}"))),
    # --- issue 24 item 7: every input and setting checked before the model loads and before any output ---
    Case("infer-metric-unknown", f"{INFER} eval.metrics=nDCG@10,FOO@3", "eval.metrics=nDCG@10,FOO@3"),
    Case("train-select-metric-unknown", f"{TRAIN} train.select_metric=FOO@3", "train.select_metric"),
    Case("infer-second-dataset-corpus-missing", f"{INFER},{{w}}/nocorpus.yaml", "{w}/coll/no-corpus.tsv"),
    Case("infer-second-dataset-list-not-a-list", f"{INFER},{{c}}/list.yaml", "{c}/list.yaml: datasets must be a list",
         write("list.yaml", "datasets: 5\n")),
    Case("infer-dataset-list-of-numbers", "{py} infer.py --model {w}/model eval.dataset={c}/list.yaml",
         "{c}/list.yaml: datasets must be a list", write("list.yaml", "datasets: [1, 2]\n")),
    Case("infer-dataset-yaml-invalid-utf8", "{py} infer.py --model {w}/model eval.dataset={c}/d.yaml",
         "{c}/d.yaml:2: invalid UTF-8", write("d.yaml", b"name: x\ncorpus: caf\xe9.tsv\n")),
    Case("train-config-invalid-utf8", f"{TRAIN} --config {{c}}/bad.yaml", "{c}/bad.yaml:3: invalid UTF-8",
         write("bad.yaml", b"train:\n  max_steps: 2\n  seed: \xff\n")),
    Case("train-config-duplicate-key", f"{TRAIN} --config {{c}}/bad.yaml", "{c}/bad.yaml:3: duplicate key 'max_steps'",
         write("bad.yaml", "train:\n  max_steps: 1\n  max_steps: 2\n")),
    Case("train-config-duplicate-section", f"{TRAIN} --config {{c}}/bad.yaml", "{c}/bad.yaml:3: duplicate key 'train'",
         write("bad.yaml", "train:\n  max_steps: 1\ntrain:\n  seed: 2\n")),
    Case("infer-dataset-duplicate-key", "{py} infer.py --model {w}/model eval.dataset={c}/d.yaml",
         "{c}/d.yaml:2: duplicate key 'name'", write("d.yaml", "name: x\nname: y\n")),
    Case("train-num-negatives-over-depth", f"{TRAIN} data.num_negatives=5000", "data.num_negatives"),
    Case("train-num-negatives-over-shallow-depth", f"{TRAIN} data.depth=2", "data.num_negatives"),
    # --- issue 24 item 8: messages that name the file or flag ---
    Case("infer-model-is-a-file", "{py} infer.py --model {w}/toy.yaml eval.dataset={w}/toy.yaml",
         "{w}/toy.yaml: is a file, not a model folder"),
    Case("infer-hub-id-offline", "{py} infer.py --model no-such-org/no-such-model eval.dataset={w}/toy.yaml",
         "no-such-org/no-such-model: not a local folder, and the hub is offline"),
    Case("train-hub-id-offline", f"{TRAIN} model.path=no-such-org/no-such-model", "no-such-org/no-such-model"),
    Case("infer-score-cache-read-only", f"{INFER} eval.score_cache={{c}}/cache.sqlite",
         "{c}/cache.sqlite: the score cache is read-only", read_only_cache("cache.sqlite"), needs="unprivileged"),
    Case("infer-score-cache-folder-read-only", f"{INFER} eval.score_cache={{c}}/ro/cache.sqlite",
         "{c}/ro/cache.sqlite: the score cache's folder", lambda c: ((c / "ro").mkdir(), os.chmod(c / "ro", 0o555)),
         needs="unprivileged"),
    Case("infer-score-cache-is-a-folder", f"{INFER} eval.score_cache={{c}}", "{c}: is a folder"),
    Case("compare-same-file-name", f"{COMPARE} {{w}}/other/run.txt", "{w}/coll/run.txt and {w}/other/run.txt"),
    Case("train-config-after-override", f"{TRAIN} train.max_steps=1 --config {{c}}/bad.yaml", "{c}/bad.yaml:2",
         write("bad.yaml", "train:\n  seed: many\n")),
    Case("infer-config-after-override", f"{INFER} eval.depth=5 --config {{c}}/bad.yaml", "{c}/bad.yaml:2",
         write("bad.yaml", "eval:\n  batch_tokens: -3\n")),
]


# --- the world: tiny model, collection, dataset, a 2-step training run; built once per module --------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("bad-input-world")
    _build_bert_like(w / "model", "bert")
    coll = w / "coll"
    write_tiny_collection(coll, valid_is_train=True)
    topics = [line.split("\t")[0] for line in (coll / "topics.tsv").read_text().splitlines()]
    docnos = [line.split("\t")[0] for line in (coll / "corpus.tsv").read_text().splitlines()]
    (coll / "qrels.txt").write_text("".join(f"{q} 0 d{i}_0 2\n" for i, q in enumerate(topics)))
    (coll / "run.txt").write_text("".join(f"{q} Q0 {d} {r + 1} {10.0 - r} bm25\n" for i, q in enumerate(topics)
                                          for r, d in enumerate([f"d{i}_0", *docnos[(i + 1) * 2:(i + 1) * 2 + 5]])))
    (w / "toy.yaml").write_text(f"name: toy\ncorpus: {coll / 'corpus.tsv'}\ntopics: {coll / 'topics.tsv'}\n"
                                f"qrels: {coll / 'qrels.txt'}\nruns: {{bm25: {coll / 'run.txt'}}}\nrel_level: 2\n")
    (coll / "CL.yaml").write_text((w / "toy.yaml").read_text())
    # a second dataset whose corpus is missing (found before the first dataset is re-ranked)
    (w / "nocorpus.yaml").write_text((w / "toy.yaml").read_text().replace("name: toy", "name: nocorpus")
                                     .replace(str(coll / "corpus.tsv"), str(coll / "no-corpus.tsv")))
    (w / "other").mkdir()
    shutil.copy(coll / "run.txt", w / "other" / "run.txt")  # same file name as coll/run.txt
    _train_two_steps(w)
    return w


def _train_two_steps(w: Path) -> None:
    """A finished 2-step run with checkpoint/, model/ and metrics.jsonl: the template of the resume cases."""
    command = TRAIN.format(w=w, c=w / "case", py=sys.executable).split()
    done = subprocess.run([*command, "train.max_steps=2", "train.save_every=1", "train.eval_every=1",
                           "train.log_every=1", "train.output_dir=" + str(w / "case" / "trained")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _env() -> dict[str, str]:
    # progress bars are not messages: a terminal redraws them in place, and they are off here
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PATH": _path()}


def _path() -> str:
    """This Python's folder first, so the shell wrappers' `python` is the one running the tests."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


# --- snapshots: no new or changed output file -------------------------------------------------------------


def snapshot(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file (not folder: a run folder made before the failure is empty and harmless) with size and mtime."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns)
            for folder in folders if folder.is_dir() for path in folder.rglob("*") if path.is_file()}


PROGRESS_BAR = re.compile(r"\[\d+:\d+(<[\d:?]+)?, [^\]]*\]")  # tqdm's "[00:01<00:02, 3.4it/s]"


def messages(stderr: str) -> list[str]:
    """stderr's lines without progress bars (tqdm redraws them in place with \\r; they are not messages)."""
    lines = [line.split("\r")[-1].strip() for line in stderr.split("\n")]
    return [line for line in lines if line and not PROGRESS_BAR.search(line)]


# --- mounts and users for the fault cases -----------------------------------------------------------------


MOUNT_OPTIONS = {"full": "size=16k", "small": "size=96k", "ro": "ro,size=1m"}  # small: room for a few files


def _mount(folder: Path, kind: str) -> None:
    folder.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", MOUNT_OPTIONS[kind], "tmpfs", str(folder)],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    if kind == "full":  # nothing more fits
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)


def _unprivileged(command: str) -> str:
    """Root reads and writes whatever the permissions say: run the command without that power."""
    if os.geteuid() != 0:
        return command
    if not shutil.which("setpriv"):
        pytest.skip("root without setpriv: cannot drop the override of file permissions")
    caps = "-dac_override,-dac_read_search"
    return f"setpriv --inh-caps={caps} --bounding-set={caps} sh -c {shlex.quote(command)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case: Case, world: Path, tmp_path: Path) -> None:
    c = tmp_path / "c"
    shutil.copytree(world / "case", c)
    if case.needs == "no-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible: -g 0 is valid here")
    mounted = c / case.needs.split(":")[1] if case.needs.startswith("mount:") else None
    try:
        if mounted:
            _mount(mounted, case.needs.split(":")[1])
        if case.prepare:
            case.prepare(c)
        names = dict(w=world, c=c, py=sys.executable)
        before = snapshot([c, *OUTPUT_FOLDERS])
        command = case.command.format(**names)
        command = _unprivileged(command) if case.needs == "unprivileged" else command
        done = subprocess.run(command, shell=True, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        lines = messages(done.stderr)
        assert done.returncode == 2, f"exit {done.returncode}\n{done.stderr}"
        assert "Traceback" not in done.stderr
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("error: ") and case.expect.format(**names) in lines[0], lines[0]
        assert snapshot([c, *OUTPUT_FOLDERS]) == before
    finally:
        if mounted:
            subprocess.run(["umount", str(mounted)], capture_output=True)


def _run(command: str, world: Path, c: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command.format(w=world, c=c, py=sys.executable), shell=True, cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)


def test_disk_full_at_a_checkpoint_save_is_one_line_and_leaves_no_temporary_folder(world: Path, tmp_path: Path):
    """Room for the config and the log but not for the model: the save fails in one line, exit 2, and no
    half-written `.model.tmp` / `.checkpoint.tmp` is left behind."""
    c = tmp_path / "c"
    c.mkdir()
    try:
        _mount(c / "small", "small")
        done = _run(f"{TRAIN.replace('{c}/out', '{c}/small/out')} train.max_steps=1", world, c)
        lines = messages(done.stderr)
        assert done.returncode == 2 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr
        assert f"{c}/small/out/" in lines[0] and "could not be written" in lines[0]
        assert sorted(p.name for p in (c / "small" / "out").iterdir() if p.name.startswith(".")) == []
    finally:
        subprocess.run(["umount", str(c / "small")], capture_output=True)


def test_torn_last_metrics_line_is_dropped_on_resume(world: Path, tmp_path: Path):
    """A kill while appending to metrics.jsonl tears its last line: that row is after the checkpoint anyway,
    so the rerun drops it and resumes (a broken line before the last is an error, in CASES)."""
    c = tmp_path / "c"
    shutil.copytree(world / "case", c)
    metrics = c / "trained" / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows) + '\n{"step": 3, "lo')
    done = _run(f"{RESUME} train.max_steps=3", world, c)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[: len(rows)] == [json.loads(r)["step"] for r in rows] and steps[-1] == 3
