"""Outputs never destroy inputs, each output has one writer, names never become paths (issue 24, items 1, 5, 6).

In the style of test_bad_input.py: every case runs the real command (a subprocess; the shell wrappers too) and
must end in exit status 2 with exactly one line on stderr naming the output path (or the flag / YAML line), no
traceback, and no file created, changed or removed: checksums of the whole work folder (the case folder with
every input, the shared model) and the project's output folders, hidden files (lock files) included.

- GUARD: for every entry point, an output path equal to each of its inputs (and to one through a symlink and
  through a hard link) is refused before anything is written.
- LOCKED: the test process holds an output's lock (`crossrank.data.outputs.output_lock`), as a running writer
  would; the command is refused in one line naming the holder's pid. Deterministic: no two commands race.
- NAMES: names that become file names (`name: ../../x` in a dataset YAML, `-m ../backbones/bert`, ...).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import _build_bert_like, write_tiny_collection
from crossrank.config import ROOT
from crossrank.data.outputs import lock_path, output_lock, refuse_overwriting_inputs
from crossrank.errors import CrossrankError
from test_bad_input import OUTPUT_FOLDERS, _env, messages


@dataclasses.dataclass
class Case:
    id: str
    command: str  # formatted with {c} (this case's folder), {w} (the shared, read-only world), {py}, {root}
    expect: str  # the one stderr line contains it (formatted the same way)
    prepare: Callable[[Path], None] | None = None
    lock: str = ""  # LOCKED cases: the output whose lock the test process holds while the command runs


# --- the work folder: a tiny collection, a dataset YAML listing every kind of input ------------------------

PY = "{py}"
TOY = "{c}/toy.yaml"
# every file the toy dataset lists; `run.txt` is its bm25 run (bm25's own product), `other.run` another run
DATASET_FILES = ["toy.yaml", "corpus.tsv", "topics.tsv", "qrels.txt", "other.run", "teacher.run"]


def make_case_folder(c: Path) -> None:
    write_tiny_collection(c, valid_is_train=True)
    topics = [line.split("\t")[0] for line in (c / "topics.tsv").read_text().splitlines()]
    docnos = [line.split("\t")[0] for line in (c / "corpus.tsv").read_text().splitlines()]
    (c / "qrels.txt").write_text("".join(f"{q} 0 d{i}_0 2\n" for i, q in enumerate(topics)))
    run = "".join(f"{q} Q0 {d} {r + 1} {10.0 - r} bm25\n" for i, q in enumerate(topics)
                  for r, d in enumerate([f"d{i}_0", *docnos[(i + 1) * 2:(i + 1) * 2 + 5]]))
    for name in ("run.txt", "other.run", "teacher.run"):
        (c / name).write_text(run)
    (c / "toy.yaml").write_text(f"name: toy\ncorpus: {c}/corpus.tsv\ntopics: {c}/topics.tsv\nqrels: {c}/qrels.txt\n"
                                f"runs: {{bm25: {c}/run.txt, other: {c}/other.run}}\nteacher: {c}/teacher.run\n"
                                f"rel_level: 2\n")
    (c / "cfg.yaml").write_text("eval:\n  depth: 5\n")


def link(kind: str, name: str, target: str) -> Callable[[Path], None]:
    def prepare(c: Path) -> None:
        (os.symlink if kind == "sym" else os.link)(c / target, c / name)
    return prepare


def write(relative: str, text: str) -> Callable[[Path], None]:
    def prepare(c: Path) -> None:  # the world's name: what infer.py calls a model in {w}/model
        (c / relative).write_text(text.format(c=c, root=ROOT, wname=WORLD_NAME[0]))
    return prepare


WORLD_NAME = [""]


# --- the entry points: command with {out}, and the inputs an output must never be ---------------------------

BM25 = "./create_bm25_baseline_run.sh -d {c}/toy.yaml -o {out}"
COLBERT = PY + " -m crossrank colbert --dataset {c}/toy.yaml --devices cpu --out {out}"
IMPORT = PY + " -m crossrank first-stage import {c}/run.txt {out} --depth 5"
PREP = PY + " preprocessing.py --dataset {c}/toy.yaml --objective CL --out {out}"
PREP_KD = PY + " preprocessing.py --dataset {c}/toy.yaml --objective KD --out {out}"
TRAIN = (PY + " train.py --config configs/objectives/CL.yaml model.path={w}/model model.name=tiny data.train={c}/CL "
         "data.num_negatives=3 data.depth=14 train.queries_per_batch=2 train.accumulation=1 train.max_steps=1 "
         "train.output_dir={out}")
FT = "./ft-monoencoder.sh -c {w}/model -d {c}/toy.yaml data.train={c}/CL train.max_steps=1 train.output_dir={out}"
INFER = PY + " infer.py --model {w}/model --config {c}/cfg.yaml eval.dataset={c}/toy.yaml eval.score_cache={out}"
INF_SH = "./inference-monoencoder.sh -M {w}/model -d {c}/toy.yaml -k 5 -- eval.score_cache={out}"
RANK_GPT = (PY + " rank_gpt.py --dataset {c}/toy.yaml --run {c}/run.txt --topics {c}/topics.tsv "
            "--corpus {c}/corpus.tsv --model m --base-url http://127.0.0.1:9 -o {out}")
COMPARE = PY + " -m crossrank compare --qrels {c}/qrels.txt --topics {c}/topics.tsv {c}/run.txt {c}/other.run"

ENTRY_POINTS = {  # command -> the inputs (files in {c}, or {w}/... ) an output path must never be
    "bm25": (BM25, DATASET_FILES),  # its own bm25 run (run.txt) is what it writes
    "colbert": (COLBERT, ["run.txt", *DATASET_FILES]),
    "import": (IMPORT, ["run.txt"]),
    "preprocessing": (PREP, ["run.txt", *DATASET_FILES]),
    "preprocessing-KD": (PREP_KD, ["run.txt", *DATASET_FILES]),
    "train": (TRAIN, ["CL", "{w}/model", "corpus.tsv", "topics.tsv"]),  # training folder, backbone, its texts
    "ft-wrapper": (FT, ["CL", "{w}/model"]),
    "infer-score-cache": (INFER, ["run.txt", "cfg.yaml", *DATASET_FILES]),
    "inference-wrapper-score-cache": (INF_SH, ["run.txt", "corpus.tsv"]),
    "rank_gpt": (RANK_GPT, ["run.txt", "toy.yaml", "corpus.tsv", "topics.tsv", "qrels.txt", "other.run"]),
}


def _path(relative: str) -> str:
    return relative if relative.startswith("{") else "{c}/" + relative


def _guard_cases() -> list[Case]:
    cases = []
    for name, (command, inputs) in ENTRY_POINTS.items():
        for source in inputs:
            out = _path(source)
            cases.append(Case(f"{name}-out-is-{Path(source).name}", command.replace("{out}", out),
                              "eval.score_cache" if "score-cache" in name else out))
        first = inputs[0] if not inputs[0].startswith("{") else inputs[1]
        for kind in ("sym", "hard"):
            if kind == "hard" and (Path(first).suffix == "" and first == "CL"):
                continue  # no hard links to folders
            cases.append(Case(f"{name}-out-is-a-{kind}link-to-{first}", command.replace("{out}", "{c}/link"),
                              "eval.score_cache" if "score-cache" in name else "{c}/link", link(kind, "link", first)))
    return cases


GUARD = _guard_cases() + [
    # a folder output that holds an input: the training folder inside the run folder
    Case("train-output-dir-holds-the-training-folder", TRAIN.replace("{out}", "{c}"), "{c}"),
    Case("train-output-dir-holds-init-from", TRAIN.replace("{out}", "{c}/stage1") + " train.init_from={c}/stage1/model",
         "{c}/stage1", lambda c: shutil.copytree(c.parent / "world-model", c / "stage1" / "model")),
    # preprocessing of RankGPT files into a folder where its topics.tsv copy would replace the dataset's topics
    Case("preprocessing-rankgpt-topics-copy-is-the-topics", PREP_KD.replace("{out}", "{c}"), "{c}/topics.tsv",
         write("toy.yaml", "name: toy\ncorpus: {c}/corpus.tsv\ntopics: {c}/topics.tsv\nqrels: {c}/qrels.txt\n"
                           "teacher: {c}/rankgpt.jsonl\nteacher_answers: {c}/answers.json\n")),
    # infer.py: the re-ranked run (runs/<dataset>.<first stage>.<model>.run) is another run the dataset lists
    Case("infer-run-is-another-run-of-the-dataset",
         PY + " infer.py --model {w}/model eval.dataset={c}/guarded.yaml eval.depth=5",
         "runs/toy-guard.bm25.{wname}.run",
         write("guarded.yaml", "name: toy-guard\ncorpus: {c}/corpus.tsv\ntopics: {c}/topics.tsv\n"
                               "qrels: {c}/qrels.txt\nruns: {{bm25: {c}/run.txt, "
                               "reranked: {root}/runs/toy-guard.bm25.{wname}.run}}\n")),
    Case("infer-csv-is-another-run-of-the-dataset",
         PY + " infer.py --model {w}/model eval.dataset={c}/guarded.yaml eval.depth=5",
         "runs/toy-guard.bm25.{wname}.perquery.csv",
         write("guarded.yaml", "name: toy-guard\ncorpus: {c}/corpus.tsv\ntopics: {c}/topics.tsv\n"
                               "qrels: {c}/qrels.txt\nruns: {{bm25: {c}/run.txt, "
                               "csv: {root}/runs/toy-guard.bm25.{wname}.perquery.csv}}\n")),
    Case("infer-two-datasets-one-run", PY + " infer.py --model {w}/model eval.dataset={c}/toy.yaml,{c}/toy.yaml",
         "is the same file as"),
    # compare --per-query / --plot: the CSV or plot next to a run is an input, or two runs share one
    Case("compare-per-query-csv-is-the-qrels",
         PY + " -m crossrank compare --qrels {c}/run.perquery.csv {c}/run.txt {c}/other.run --per-query",
         "{c}/run.perquery.csv", lambda c: shutil.copy(c / "qrels.txt", c / "run.perquery.csv")),
    Case("compare-per-query-csv-is-a-run", f"{COMPARE} {{c}}/other.perquery.csv --per-query",
         "{c}/other.perquery.csv", lambda c: shutil.copy(c / "run.txt", c / "other.perquery.csv")),
    Case("compare-plot-is-the-topics",
         PY + " -m crossrank compare --qrels {c}/qrels.txt --topics {c}/other.ndcg10-diff.png {c}/run.txt "
         "{c}/other.run --plot", "{c}/other.ndcg10-diff.png",
         lambda c: shutil.copy(c / "topics.tsv", c / "other.ndcg10-diff.png")),
    Case("compare-two-runs-one-csv", f"{COMPARE} {{c}}/other.txt --per-query", "is the same file as",
         lambda c: shutil.copy(c / "run.txt", c / "other.txt")),
    # demo --out: a folder, not one of the inputs
    Case("demo-out-is-a-file", PY + " -m crossrank demo --out {c}/corpus.tsv", "{c}/corpus.tsv"),
    Case("demo-out-is-a-link-to-a-file", PY + " -m crossrank demo --out {c}/link", "{c}/link",
         link("sym", "link", "corpus.tsv")),
]


# --- LOCKED: a second writer, while the test process holds the output's lock --------------------------------

LOCKED = [
    Case("bm25-run-locked", BM25.replace("{out}", "{c}/bm25.run"), "{c}/bm25.run", lock="{c}/bm25.run"),
    Case("colbert-run-locked", COLBERT.replace("{out}", "{c}/colbert.run"), "{c}/colbert.run",
         lock="{c}/colbert.run"),
    Case("import-run-locked", IMPORT.replace("{out}", "{c}/imported.run"), "{c}/imported.run",
         lock="{c}/imported.run"),
    Case("import-locked-through-a-symlinked-folder", IMPORT.replace("{out}", "{c}/alias/imported.run"),
         "{c}/alias/imported.run", lambda c: (c / "real").mkdir() or os.symlink(c / "real", c / "alias"),
         lock="{c}/real/imported.run"),
    Case("preprocessing-folder-locked", PREP.replace("{out}", "{c}/prep"), "{c}/prep", lock="{c}/prep"),
    Case("train-run-folder-locked", TRAIN.replace("{out}", "{c}/out"), "{c}/out", lock="{c}/out"),
    Case("ft-wrapper-run-folder-locked", FT.replace("{out}", "{c}/out"), "{c}/out", lock="{c}/out"),
    Case("infer-run-locked", PY + " infer.py --model {w}/model eval.dataset={c}/toy.yaml eval.depth=5",
         "runs/toy.bm25.{wname}.run", lock="{root}/runs/toy.bm25.{wname}.run"),
    Case("rank_gpt-output-locked", RANK_GPT.replace("{out}", "{c}/teacher-out.run"), "{c}/teacher-out.run",
         lock="{c}/teacher-out.run"),
]

# --- NAMES: names that become file names are names, never paths ----------------------------------------------

NAMES = [
    Case("dataset-name-dotdot-infer", PY + " infer.py --model {w}/model eval.dataset={c}/evil.yaml",
         "{c}/evil.yaml:1", write("evil.yaml", "name: ../../x\ncorpus: {c}/corpus.tsv\ntopics: {c}/topics.tsv\n"
                                                "qrels: {c}/qrels.txt\nruns: {{bm25: {c}/run.txt}}\n")),
    Case("dataset-name-dotdot-bm25", "./create_bm25_baseline_run.sh -d {c}/evil.yaml", "{c}/evil.yaml:2",
         write("evil.yaml", "corpus: {c}/corpus.tsv\nname: ../x\ntopics: {c}/topics.tsv\n")),
    Case("dataset-name-slash-preprocessing", PY + " preprocessing.py --dataset {c}/evil.yaml", "{c}/evil.yaml:1",
         write("evil.yaml", "name: a/b\ncorpus: {c}/corpus.tsv\ntopics: {c}/topics.tsv\n"
                            "runs: {{bm25: {c}/run.txt}}\n")),
    Case("dataset-name-from-a-bad-file-name", PY + " -m crossrank compare -d '{c}/my data.yaml' {c}/run.txt",
         "{c}/my data.yaml", write("my data.yaml", "corpus: {c}/corpus.tsv\nqrels: {c}/qrels.txt\n")),
    Case("ft-objective-is-a-path", "./ft-monoencoder.sh -m ../backbones/bert train.output_dir={c}/out",
         "-m ../backbones/bert"),
    Case("ft-previous-is-a-path", "./ft-monoencoder.sh -f 2 -p ../x -c {w}/model train.output_dir={c}/out",
         "train.previous"),
    Case("train-model-name-dotdot", TRAIN.replace("{out}", "{c}/out").replace("model.name=tiny", "model.name=../x"),
         "model.name"),
    Case("train-dataset-dotdot", TRAIN.replace("{out}", "{c}/out") + " data.dataset=../../x", "data.dataset"),
    Case("infer-first-stage-dotdot", PY + " infer.py --model {w}/model eval.dataset={c}/toy.yaml "
         "eval.first_stage=../../x", "eval.first_stage"),
    Case("inference-wrapper-first-stage-path", "./inference-monoencoder.sh -M {w}/model -d {c}/toy.yaml -r ../x",
         "eval.first_stage"),
    Case("infer-dataset-key-dotdot", PY + " infer.py --model {w}/model eval.dataset=../../x", "../../x"),
    Case("bm25-dataset-key-dotdot", "./create_bm25_baseline_run.sh -d ../datasets/demo", "../datasets/demo"),
    Case("rank_gpt-dataset-key-dotdot", RANK_GPT.replace("{c}/toy.yaml", "../../x").replace("{out}", "{c}/t.run"),
         "../../x"),
]

CASES = GUARD + LOCKED + NAMES


# --- the world and the checks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("guard-world")
    _build_bert_like(w / "model", "bert")
    return w


def checksums(folders: list[Path]) -> dict[str, str]:
    """Every file and link below `folders` (hidden ones too) with a checksum of its bytes (links: their target)."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[str(path)] = "folder"
    return found


def run(command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_in_one_line_with_nothing_changed(case: Case, world: Path, tmp_path: Path) -> None:
    c = tmp_path / "c"
    make_case_folder(c)
    shutil.copytree(world / "model", tmp_path / "world-model")  # for cases that need a model folder of their own
    WORLD_NAME[0] = world.name
    if case.prepare:
        case.prepare(c)
    names = dict(w=world, c=c, py=sys.executable, root=ROOT, wname=world.name)
    with output_lock(case.lock.format(**names)) if case.lock else _nothing():
        before = checksums([tmp_path, world, *OUTPUT_FOLDERS])
        done = run(case.command.format(**names))
        after = checksums([tmp_path, world, *OUTPUT_FOLDERS])
    lines = messages(done.stderr)
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and case.expect.format(**names) in lines[0], lines[0]
    if case.lock:
        assert f"another crossrank process (pid {os.getpid()} on host {socket.gethostname()}) is writing it" \
               in lines[0], lines[0]
    assert after == before
    if case.lock:
        assert not lock_path(case.lock.format(**names)).exists()  # released by the test: no lock file stays


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --- locks: left by a killed process, re-entrant, released; DDP ranks of one job do not block each other -----


def test_a_lock_left_by_a_killed_writer_does_not_block(tmp_path: Path) -> None:
    """A writer killed with SIGKILL while holding the lock leaves its lock file behind (with its pid); the kernel
    released the flock, so the next import runs, and removes the file when it is done."""
    c = tmp_path / "c"
    make_case_folder(c)
    out = c / "imported.run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from crossrank.data.outputs import acquire_output_lock
        acquire_output_lock({str(out)!r})
        print("locked", flush=True)
        time.sleep(600)
        """)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = run(IMPORT.format(py=sys.executable, c=c, out=out))
        assert refused.returncode == 2 and f"pid {holder.pid} on host" in refused.stderr, refused.stderr
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out).read_text().split()[0] == str(holder.pid)  # left behind by the killed writer
    done = run(IMPORT.format(py=sys.executable, c=c, out=out))
    assert done.returncode == 0, done.stderr
    assert out.is_file() and not lock_path(out).exists()


def test_a_stale_lock_file_without_a_holder_does_not_block(tmp_path: Path) -> None:
    c = tmp_path / "c"
    make_case_folder(c)
    lock_path(c / "bm25-prep").write_text("999999999 elsewhere\n")
    done = run(PREP.format(py=sys.executable, c=c, out=c / "bm25-prep"))
    assert done.returncode == 0, done.stderr
    assert (c / "bm25-prep" / "train.parquet").is_file() and not lock_path(c / "bm25-prep").exists()


def test_output_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    out = tmp_path / "x.run"
    with output_lock(out):
        with output_lock(tmp_path / "." / "x.run"):  # the same output, spelled differently: this process's lock
            assert lock_path(out).is_file()
        assert lock_path(out).is_file()  # still held by the outer block
        other = subprocess.run([sys.executable, "-c", f"from crossrank.data.outputs import acquire_output_lock; "
                                f"acquire_output_lock({str(out)!r})"], cwd=ROOT, env=_env(), capture_output=True,
                               text=True)
        assert other.returncode != 0 and "another crossrank process" in other.stderr
    assert not lock_path(out).exists()
    with output_lock(out):  # free again
        pass
    deep = tmp_path / "new" / "sub" / "x.run"
    with output_lock(deep):  # the folders made for the lock go with it when nothing else was put there
        assert lock_path(deep).is_file()
    assert not (tmp_path / "new").exists()


def test_ddp_ranks_of_one_job_share_the_lock_and_a_second_job_is_refused(world: Path, tmp_path: Path) -> None:
    """Under torchrun only rank 0 takes the run folder's lock, so two ranks of one job never block each other (the
    job trains), and both ranks of a second job stop when another process holds it (no rank hangs)."""
    c = tmp_path / "c"
    make_case_folder(c)
    command = TRAIN.format(py=sys.executable, w=world, c=c, out="{out}").replace(
        f"{sys.executable} train.py", f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2 "
                                      f"train.py").replace("train.accumulation=1", "train.accumulation=2")
    done = run(command.replace("{out}", str(c / "ddp")))
    assert done.returncode == 0, done.stderr
    assert (c / "ddp" / "model").is_dir() and not lock_path(c / "ddp").exists()
    with output_lock(c / "held"):
        refused = run(command.replace("{out}", str(c / "held")))
    assert refused.returncode != 0 and "another crossrank process" in refused.stderr, refused.stderr
    assert not (c / "held").exists()


# --- the helper itself ---------------------------------------------------------------------------------------


def test_refuse_overwriting_inputs_by_path_link_and_folder(tmp_path: Path) -> None:
    source = tmp_path / "corpus.tsv"
    source.write_text("d1\ttext\n")
    os.symlink(source, tmp_path / "sym")
    os.link(source, tmp_path / "hard")
    (tmp_path / "sub").mkdir()
    inputs = [("the corpus", source), ("an irds corpus", "irds:msmarco-passage"), ("nothing", "")]
    for out in (source, tmp_path / "sym", tmp_path / "hard", tmp_path / "sub" / ".." / "corpus.tsv"):
        with pytest.raises(CrossrankError, match="is the corpus"):
            refuse_overwriting_inputs([("--out", out)], inputs)
    with pytest.raises(CrossrankError, match="holds the corpus"):
        refuse_overwriting_inputs([], inputs, [("--out", tmp_path)])
    with pytest.raises(CrossrankError, match="same file as -a"):
        refuse_overwriting_inputs([("-a", tmp_path / "a"), ("-b", tmp_path / "sub" / ".." / "a")], inputs)
    refuse_overwriting_inputs([("--out", tmp_path / "run")], inputs, [("--folder", tmp_path / "sub")])  # fine
