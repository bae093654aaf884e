"""preprocessing: the streaming run reader equals the in-memory reader, the split is deterministic and
disjoint, RankGPT files are parsed like RankGPT does, and bad runs are reported by line."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from crossrank.data.qrels import read_qrels
from crossrank.data.runs import load_run, write_run
from crossrank.data.texts import read_corpus, read_topics
from crossrank.training import preprocessing
from crossrank.data import runs
from crossrank.errors import CrossrankError
from crossrank.training.preprocessing import preprocess_run
from crossrank.training.examples import TrainingQuery, load_meta, load_split

ROOT = Path(__file__).resolve().parent.parent


def make_run(path: Path, queries: int = 60, depth: int = 40, seed: int = 0, shuffled: bool = False,
             ties: bool = True) -> Path:
    """A run with string and numeric docnos, tied scores and (optionally) lines out of score order."""
    rng = random.Random(seed)
    lines = []
    for q in range(queries):
        docs = rng.sample(range(10_000), depth)
        scores = [round(rng.uniform(0, 10), 0 if ties else 6) for _ in docs]  # integer scores: many ties
        rows = [f"{q * 3} Q0 {'D' if q % 2 else ''}{d} {r + 1} {s} run\n" for r, (d, s) in enumerate(zip(docs, scores))]
        if shuffled:
            rng.shuffle(rows)
        lines += rows
    path.write_text("".join(lines))
    return path


def as_lists(tables) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for table in tables:
        for qid, docno, score in zip(table["qid"].to_pylist(), table["docno"].to_pylist(), table["score"].to_pylist()):
            out.setdefault(qid, []).append((docno, score))
    return out


@pytest.mark.parametrize("shuffled", [False, True])
def test_streaming_blocks_equal_the_in_memory_reader(tmp_path, monkeypatch, shuffled):
    path = make_run(tmp_path / "run.txt", shuffled=shuffled)
    monkeypatch.setattr(runs, "BLOCK_BYTES", 997)  # many blocks; queries span block boundaries
    streamed = as_lists(runs.read_run_blocks(path))
    assert streamed == load_run(path)


def test_streaming_reads_tabs_gzip_and_parquet(tmp_path):
    import gzip

    import pandas as pd

    path = make_run(tmp_path / "run.txt", queries=5, depth=7)
    expected = load_run(path)
    tabbed = tmp_path / "run.tsv"
    tabbed.write_text(path.read_text().replace(" ", "\t"))
    zipped = tmp_path / "run.txt.gz"
    with gzip.open(zipped, "wt") as f:
        f.write(path.read_text())
    frame = pd.read_csv(path, sep=" ", header=None, names=["query_id", "q0", "doc_id", "rank", "score", "tag"],
                        dtype={"query_id": str, "doc_id": str})
    frame.drop(columns=["q0", "tag"]).to_parquet(tmp_path / "run.parquet")
    for source in (tabbed, zipped, tmp_path / "run.parquet"):
        assert as_lists(runs.read_run_blocks(source)) == expected, source


def test_preprocess_run_writes_disjoint_deterministic_splits(tmp_path):
    path = make_run(tmp_path / "run.txt", queries=200, depth=10, ties=False)
    qrels = {"0": {"999999": 1}, "3": {"x": 0}}
    counts = preprocess_run(path, qrels, tmp_path / "a", evalperc=20, seed=7, depth=4, progress=False)
    preprocess_run(path, qrels, tmp_path / "b", evalperc=20, seed=7, depth=4, progress=False)
    train, valid = load_split(tmp_path / "a", "train"), load_split(tmp_path / "a", "valid")
    assert {q.qid for q in train}.isdisjoint({q.qid for q in valid})
    assert len(train) + len(valid) == 200 == counts["train_queries"] + counts["valid_queries"]
    assert 20 <= len(valid) <= 60  # ~20% of 200 by a seeded hash
    assert {q.qid for q in valid} == {qid for qid in map(str, range(0, 600, 3)) if _held_out(qid, 20, 7)}
    for split in ("train", "valid"):  # same inputs, same bytes
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (tmp_path / "b" / f"{split}.parquet").read_bytes()
    memory = load_run(path, depth=4)
    for query in train + valid:
        assert query.docnos == [docno for docno, _ in memory[query.qid]]
        assert query.scores == pytest.approx([score for _, score in memory[query.qid]])
        assert query.judged == qrels.get(query.qid, {})
    assert counts["kept_lines"] == 800 and counts["run_lines"] == 2000
    # another seed gives another split, the one its hash says
    preprocess_run(path, qrels, tmp_path / "c", evalperc=20, seed=8, depth=4, progress=False)
    other = {q.qid for q in load_split(tmp_path / "c", "valid")}
    assert other != {q.qid for q in valid} and other == {qid for qid in memory if _held_out(qid, 20, 8)}


def _held_out(qid: str, evalperc: float, seed: int) -> bool:
    """The documented split, written out again here (not `is_validation`, so that a change there is caught):
    blake2b-64 of `seed<TAB>qid` as a fraction of 2**64, below evalperc / 100."""
    digest = hashlib.blake2b(f"{seed}\t{qid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < evalperc / 100


def _kd_teacher_run(tmp_path: Path, qids: list[str]) -> Path:
    run = tmp_path / "teacher.run"
    run.write_text("".join(f"{q} Q0 {q}-d{r} {r + 1} {10.0 - r} t\n" for q in qids for r in range(3)))
    return run


def _rankgpt_files(tmp_path: Path, qids: list[str]) -> tuple[Path, Path]:
    items = [{"query_id": q, "query": f"query {q}", "positive_passages": [],
              "retrieved_passages": [{"docid": f"{q}-d{r}", "rank": r + 1, "text": f"text {q} {r}"}
                                     for r in range(3)]} for q in qids]
    data, answers = tmp_path / "train.jsonl", tmp_path / "answers.json"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    answers.write_text(json.dumps(["[2] > [1] > [3]"] * len(qids)))
    return data, answers


@pytest.mark.parametrize("path", ["CL", "KD", "RankGPT"])
def test_every_preprocessing_path_splits_disjointly_by_the_seeded_hash(tmp_path, path):
    """CL (first-stage run), KD (teacher run) and RankGPT: with evalperc > 0 every query lands in exactly one
    split, validation holds exactly the queries the seeded hash holds out (each with its own rows), and another
    seed gives another split."""
    qids = [str(q) for q in range(100, 400, 3)]

    def run(seed: int, out: Path) -> tuple[dict, dict]:
        if path == "CL":
            source = tmp_path / "run.txt"
            source.write_text("".join(f"{q} Q0 {q}-d{r} {r + 1} {10.0 - r} bm25\n" for q in qids for r in range(3)))
            preprocess_run(source, {}, out, evalperc=25, seed=seed, progress=False)
        elif path == "KD":
            preprocessing.preprocess_teacher_run(_kd_teacher_run(tmp_path, qids), {}, out, evalperc=25, seed=seed)
        else:
            preprocessing.preprocess_rankgpt(*_rankgpt_files(tmp_path, qids), out, evalperc=25, seed=seed)
        return ({q.qid: q for q in load_split(out, "train")}, {q.qid: q for q in load_split(out, "valid")})

    train, valid = run(3, tmp_path / "a")
    assert set(train).isdisjoint(valid) and set(train) | set(valid) == set(qids)
    assert set(valid) == {q for q in qids if _held_out(q, 25, 3)} and 10 <= len(valid) <= 40
    for qid, query in {**train, **valid}.items():  # each query keeps its own passages, none of another query
        assert sorted(query.docnos) == [f"{qid}-d{r}" for r in range(3)]
    _, other = run(4, tmp_path / "b")
    assert set(other) != set(valid) and set(other) == {q for q in qids if _held_out(q, 25, 4)}


@pytest.mark.parametrize("text, message", [
    ("1 Q0 a 1 2.0 r\n1 Q0 b 2 1.0 r\n2 Q0 c 1 1.0 r\n1 Q0 d 3 0.5 r\n",
     ":4: query 1 appears again after other queries"),
    ("1 Q0 a 1 2.0 r\n1 Q0 b 2 x r\n", ":2: score is not a number"),
    ("1 Q0 a 1 2.0 r\n1 Q0 b 2 1.0 r\n1 Q0 a 3 0.5 r\n", ":3: docno a appears twice for query 1"),
    ("1 Q0 7 1 2.0 r\n1 Q0 8 2 1.0 r\n1 Q0 7 3 0.5 r\n", ":3: docno 7 appears twice for query 1"),
    ("1 Q0 a 1 2.0 r\n1 Q0 b 2 1.0\n", ":2: run line has 5 columns"),
    ("1 Q0 a 1 2.0 r\n1 Q0 b x 1.0 r\n", ":2: rank is not an integer (expected e.g. 1, got 'x')"),  # Arrow path
])
def test_bad_runs_are_reported_with_their_line(tmp_path, text, message):
    path = tmp_path / "bad.run"
    path.write_text(text)
    with pytest.raises(CrossrankError) as error:
        list(runs.read_run_blocks(path))
    assert str(error.value).startswith(f"{path}{message}")


def test_numeric_docnos_with_leading_zeros_are_not_duplicates(tmp_path):
    path = tmp_path / "run.txt"
    path.write_text("1 Q0 7 1 2.0 r\n1 Q0 007 2 1.0 r\n")
    assert as_lists(runs.read_run_blocks(path)) == {"1": [("7", 2.0), ("007", 1.0)]}


def test_lenient_skips_bad_lines(tmp_path, capsys):
    path = tmp_path / "bad.run"
    path.write_text("1 Q0 a 1 2.0 r\n1 Q0 b 2 x r\n1 Q0 c 3 1.0 r\n")
    assert as_lists(runs.read_run_blocks(path, lenient=True)) == {"1": [("a", 2.0), ("c", 1.0)]}
    assert "skipped 1 malformed run line(s)" in capsys.readouterr().err


@pytest.mark.parametrize("answer, order, malformed", [
    ("[2] > [1] > [3]", [1, 0, 2], False),
    ("[3] > [3] > [9]", [2, 0, 1], True),  # repeat and out-of-range dropped, missing appended in order
    ("I cannot rank these passages.", [0, 1, 2], True),
    ("", [0, 1, 2], True),
])
def test_parse_permutation_like_rankgpt(answer, order, malformed):
    from crossrank.teacher.rankgpt import parse_permutation

    repaired, problems = parse_permutation(answer, 3)
    assert (repaired, bool(problems)) == (order, malformed)


def test_rankgpt_files_become_a_kd_folder(tmp_path):
    items = [{"query_id": "11", "query": "cats", "positive_passages": [{"docid": "p2", "text": "cat text"}],
              "retrieved_passages": [{"docid": "p1", "rank": 1, "text": "dog text"},
                                     {"docid": "p2", "rank": 2, "text": "cat text"},
                                     {"docid": "p3", "rank": 3, "text": "bird  text"}]},
             {"query": "dogs", "positive_passages": [],
              "retrieved_passages": [{"docid": "p1", "rank": 1, "text": "dog text"}]}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["[2] > [3] > [1]", "[1]"]))
    counts = preprocessing.preprocess_rankgpt(data, answers, tmp_path / "kd", evalperc=0, seed=1,
                                              topics={"22": "dogs"})
    assert counts["queries"] == 2 and counts["malformed_answers"] == 0
    train = {q.qid: q for q in load_split(tmp_path / "kd", "train")}
    assert train["11"] == TrainingQuery("11", ["p2", "p3", "p1"], [3.0, 2.0, 1.0], {"p2": 1})
    assert train["22"].docnos == ["p1"]  # qid found from the query text
    assert read_topics(tmp_path / "kd" / "topics.tsv") == {"11": "cats", "22": "dogs"}
    assert dict(read_corpus(tmp_path / "kd" / "passages.tsv"))["p3"] == "bird text"


def test_malformed_rankgpt_answers_are_dropped_by_default_and_repaired_on_request(tmp_path):
    """The multi-stage seed keeps only answers that are a permutation of exactly the query's passages."""
    passages = [{"docid": f"p{i}", "rank": i, "text": f"text {i}"} for i in (1, 2, 3)]
    items = [{"query_id": qid, "query": f"query {qid}", "retrieved_passages": passages} for qid in ("1", "2", "3")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["[3] > [1] > [2]", "[3] > [3] > [1]", "[2] > [1]"]))  # only the first is whole
    dropped = preprocessing.preprocess_rankgpt(data, answers, tmp_path / "drop", evalperc=0, seed=1)
    assert (dropped["queries"], dropped["well_formed_answers"], dropped["malformed_answers"]) == (3, 1, 2)
    assert [q.qid for q in load_split(tmp_path / "drop", "train")] == ["1"]
    repaired = preprocessing.preprocess_rankgpt(data, answers, tmp_path / "repair", evalperc=0, seed=1, repair=True)
    assert (repaired["well_formed_answers"], repaired["malformed_answers"], repaired["train_queries"]) == (1, 2, 3)
    train = {q.qid: q.docnos for q in load_split(tmp_path / "repair", "train")}
    assert train == {"1": ["p3", "p1", "p2"], "2": ["p3", "p1", "p2"], "3": ["p2", "p1", "p3"]}


def test_teacher_run_order_comes_from_the_rank_column(tmp_path, capsys):
    """Query 1's scores are stale (they disagree with the ranks), query 2's constant: the ranks decide both,
    the scores are kept as they are, and the disagreement is counted and reported."""
    run = tmp_path / "teacher.run"
    run.write_text("1 Q0 a 2 9.0 t\n1 Q0 b 1 1.0 t\n1 Q0 c 3 5.0 t\n"
                   "2 Q0 x 2 0.0 t\n2 Q0 y 1 0.0 t\n")
    counts = preprocessing.preprocess_teacher_run(run, {"1": {"b": 1}}, tmp_path / "KD", evalperc=0, seed=1)
    train = {q.qid: q for q in load_split(tmp_path / "KD", "train")}
    assert train["1"] == TrainingQuery("1", ["b", "a", "c"], [1.0, 9.0, 5.0], {"b": 1})
    assert train["2"].docnos == ["y", "x"]
    assert counts["rank_score_disagreements"] == 1 and counts["kept_lines"] == 5
    assert "in 1 of 2 queries the scores do not follow the rank column" in capsys.readouterr().err


def test_preprocessing_cli_on_the_demo_collection(tmp_path):
    """End to end on generated data: demo collection -> BM25 (PISA) -> CL and KD folders."""
    from crossrank.first_stage import bm25
    from crossrank import demo
    from crossrank.training.preprocessing import preprocess_run

    demo.generate(tmp_path / "demo")
    topics = read_topics(tmp_path / "demo" / "topics.train.tsv")
    run = bm25.bm25_run(str(tmp_path / "demo" / "corpus.tsv"), topics, k=50)
    write_run(tmp_path / "bm25.run", run)
    qrels = read_qrels(tmp_path / "demo" / "qrels.train.txt")
    counts = preprocess_run(tmp_path / "bm25.run", qrels, tmp_path / "CL", evalperc=10, seed=42, progress=False)
    assert counts["train_queries"] + counts["valid_queries"] == 200
    assert counts["queries_without_relevant"] == 0
    dataset = tmp_path / "demo.yaml"
    dataset.write_text(f"name: t\ncorpus: {tmp_path}/demo/corpus.tsv\ntopics: {tmp_path}/demo/topics.train.tsv\n"
                       f"qrels: {tmp_path}/demo/qrels.train.txt\nteacher: {tmp_path}/demo/teacher.train.run\n")
    out = subprocess.run([sys.executable, "preprocessing.py", "--dataset", str(dataset), "--objective", "KD",
                          "--evalperc", "10", "--out", str(tmp_path / "KD")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    meta = load_meta(tmp_path / "KD")
    assert meta["objective"] == "KD" and meta["counts"]["kept_lines"] == 200 * 20
    first = load_split(tmp_path / "KD", "train")[0]
    assert first.scores == [float(20 - i) for i in range(20)]  # teacher order kept: 20, 19, ..., 1


def test_the_cli_holds_out_exactly_the_requested_share_and_counts_relevance_at_rel_level(tmp_path):
    """--evalperc 10 on 43 queries holds out ceil(4.3) = 5 (the seeded hash held out 9 on DL19), train and valid
    are disjoint, another --seed draws others; a query whose only judged passage is grade 1 has no relevant one
    at rel_level 2, as training counts it."""
    qids = [str(1000 + q) for q in range(43)]
    (tmp_path / "topics.tsv").write_text("".join(f"{q}\tquery {q}\n" for q in qids))
    (tmp_path / "corpus.tsv").write_text("".join(f"d{d}\tpassage {d}\n" for d in range(5)))
    (tmp_path / "run.txt").write_text("".join(f"{q} Q0 d{d} {d + 1} {5 - d}.0 r\n" for q in qids for d in range(5)))
    (tmp_path / "qrels.txt").write_text("".join(f"{q} 0 d0 {1 if q == qids[0] else 2}\n" for q in qids))
    (tmp_path / "d.yaml").write_text(f"name: d\ncorpus: {tmp_path}/corpus.tsv\ntopics: {tmp_path}/topics.tsv\n"
                                     f"qrels: {tmp_path}/qrels.txt\nrel_level: 2\nruns: {{bm25: {tmp_path}/run.txt}}\n")
    splits = {}
    for seed in ("42", "7"):
        out = subprocess.run([sys.executable, "preprocessing.py", "--dataset", str(tmp_path / "d.yaml"), "--evalperc",
                              "10", "--seed", seed, "--out", str(tmp_path / seed)], cwd=ROOT, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        train, valid = ({q.qid for q in load_split(tmp_path / seed, s)} for s in ("train", "valid"))
        assert len(valid) == 5 and not train & valid and train | valid == set(qids)
        assert load_meta(tmp_path / seed)["counts"]["queries_without_relevant"] == 1  # qids[0]: grade 1 only
        splits[seed] = valid
    assert splits["42"] != splits["7"]


def test_preprocessing_cli_reports_errors_in_one_line(tmp_path):
    dataset = tmp_path / "d.yaml"
    bad_run = tmp_path / "bad.run"
    bad_run.write_text("1 Q0 a 1 2.0 r\n1 Q0 b 2 oops r\n")
    dataset.write_text(f"name: d\ncorpus: x\ntopics: x\nruns: {{bm25: {bad_run}}}\n")
    out = subprocess.run([sys.executable, "preprocessing.py", "--dataset", str(dataset), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: {bad_run}:2: score is not a number (expected e.g. 12.5, got 'oops')"
    assert not (tmp_path / "o" / "train.parquet").exists()  # nothing half-written


def test_damaged_bytes_on_the_arrow_path_name_the_file(tmp_path):
    import gzip

    latin1 = tmp_path / "latin1.run"
    latin1.write_bytes(b"1 Q0 a 1 2.0 r\n1 Q0 caf\xe9 2 1.0 r\n")
    with pytest.raises(CrossrankError, match=r"latin1\.run:2: invalid UTF-8"):
        list(runs.read_run_blocks(latin1))
    data = gzip.compress(make_run(tmp_path / "run.txt", queries=50).read_bytes())
    truncated = tmp_path / "run.txt.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CrossrankError, match=r"run\.txt\.gz:\d+: the gzip file is truncated or corrupt"):
        list(runs.read_run_blocks(truncated))
    carriage = tmp_path / "cr.run"  # Arrow ends a line at a bare \r; the line reader (and so we) does not
    carriage.write_bytes(b"1 Q0 a 1 2.0 r\r\n1 Q0 b 2 1.0 r\r1 Q0 c 3 0.5 r\n1 Q0 d x 0.1 r\n")
    with pytest.raises(CrossrankError, match=r"cr\.run:2: run line has 12 columns"):
        list(runs.read_run_blocks(carriage))
    import pandas as pd

    pd.DataFrame({"qid": ["1"], "docno": ["a"], "rank": ["x"], "score": [1.0]}).to_parquet(tmp_path / "r.parquet")
    with pytest.raises(CrossrankError, match=r"r\.parquet: parquet run's rank column is \w*string \(expected integers"):
        list(runs.read_run_blocks(tmp_path / "r.parquet"))


KILLED_WRITER = """
import os, signal, sys
from crossrank.training import preprocessing
from crossrank.data import runs
blocks = preprocessing.read_run_blocks

def killed_after_one_block(path, lenient=False):  # kill -9 while both splits are half-written
    for i, table in enumerate(blocks(path, lenient)):
        if i == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield table

preprocessing.read_run_blocks = killed_after_one_block
runs.BLOCK_BYTES = 4096
preprocessing.preprocess_run(sys.argv[1], {}, sys.argv[2], evalperc=20, seed=1, progress=False)
"""


def test_rerun_after_kill_9_is_clean_and_identical(tmp_path):
    import pyarrow.parquet as pq

    run = make_run(tmp_path / "run.txt", queries=60)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(run), str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert len(list((tmp_path / "out").glob(".*.parquet.*.tmp"))) == 2  # what the kill left
    preprocess_run(run, {}, tmp_path / "out", evalperc=20, seed=1, progress=False)
    preprocess_run(run, {}, tmp_path / "clean", evalperc=20, seed=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.parquet", "valid.parquet"]
    for split in ("train", "valid"):
        assert pq.read_table(tmp_path / "out" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "clean" / f"{split}.parquet"))


def test_damaged_rankgpt_files_are_one_line_errors(tmp_path):
    import zipfile

    good = json.dumps({"query": "cats", "retrieved_passages": [{"docid": "p1", "rank": 1, "text": "cat"}]}) + "\n"
    answers = tmp_path / "answers.json"
    answers.write_text('["[1]",\n "[1]"\n')  # the closing bracket is missing
    data = tmp_path / "train.jsonl"
    data.write_text(good)
    with pytest.raises(CrossrankError, match=r"answers\.json:2: invalid JSON"):
        preprocessing.preprocess_rankgpt(data, answers, tmp_path / "kd", evalperc=0, seed=1)
    answers.write_text('["[1]", "[1]"]')
    data.write_bytes(good.encode() + b'{"query": "caf\xe9"}\n')
    with pytest.raises(CrossrankError, match=r"train\.jsonl:2: invalid UTF-8"):
        preprocessing.preprocess_rankgpt(data, answers, tmp_path / "kd", evalperc=0, seed=1)
    data.write_text(good + json.dumps({"query": ["cats"], "retrieved_passages": []}) + "\n")
    with pytest.raises(CrossrankError, match=r"train\.jsonl:2: not a RankGPT training line \(TypeError"):
        preprocessing.preprocess_rankgpt(data, answers, tmp_path / "kd", evalperc=0, seed=1)
    zipped = tmp_path / "train.jsonl.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train.jsonl", "".join(good.replace("p1", f"p{i * 7919}") for i in range(2000)))
    zipped.write_bytes(zipped.read_bytes()[: zipped.stat().st_size // 2])
    with pytest.raises(CrossrankError, match=r"train\.jsonl\.zip: the zip file is truncated or corrupt"):
        preprocessing.preprocess_rankgpt(zipped, answers, tmp_path / "kd", evalperc=0, seed=1)
    assert not (tmp_path / "kd" / "train.parquet").exists()
