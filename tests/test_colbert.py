"""End to end: create_colbert_baseline_runs.sh with a tiny random BERT -> PyLate PLAID index -> TREC run.

Runs only where the ColBERT environment exists (it has its own torch 2.11, ~5.5 GB): create it once with
`python3 -m venv .venv-colbert && .venv-colbert/bin/pip install -r requirements-colbert.txt && touch
.venv-colbert/.crossrank-ready` (or by running the wrapper once), or point CROSSRANK_COLBERT_ENV at one. Then
`python -m pytest -q tests/test_colbert.py` (about a minute on 2 CPU cores).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from crossrank.config import ROOT

ENV = Path(os.environ.get("CROSSRANK_COLBERT_ENV", ROOT / ".venv-colbert")).absolute()
pytestmark = pytest.mark.skipif(
    not (ENV / ".crossrank-ready").is_file(),
    reason=f"no ColBERT environment at {ENV} (create it: README 'ColBERTv2 first stage'; or set CROSSRANK_COLBERT_ENV)")

PASSAGES = {
    "d1": "the cat sat on the mat in the house", "d2": "the dog barks loudly in the garden",
    "d3": "paris is the capital of france", "d4": "python is a programming language for data",
    "d5": "fish swim in the river water", "d6": "the bank loan interest rate is high",
    "d7": "london is the capital of england", "d8": "a neural network model for search ranking",
    "d9": "the old ship on the blue sea", "d10": "berlin is a big city in germany",
    "d11": "tall green trees in the quiet garden", "d12": "the first question and the last answer",
}
# each query is a copy of one passage, which must come first
TOPICS = {"q1": PASSAGES["d3"], "q2": PASSAGES["d9"], "q3": PASSAGES["d8"]}
SHARD = "6"  # 12 passages in shards of 6: the index is built in two add_documents steps


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("colbert-collection")
    (folder / "corpus.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in PASSAGES.items()))
    (folder / "topics.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in TOPICS.items()))
    (folder / "tiny.yaml").write_text(f"name: tiny\ncorpus: {folder / 'corpus.tsv'}\ntopics: {folder / 'topics.tsv'}\n")
    return folder


def run(command: list[str]) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CROSSRANK_COLBERT_ENV": str(ENV), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def engine(collection: Path, tiny_bert: Path, indexes: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run([str(ENV / "bin" / "python"), "-m", "crossrank", "colbert", "--dataset", str(collection / "tiny.yaml"),
                "--k", "5", "--checkpoint", str(tiny_bert), "--devices", "cpu", "--batch-size", "4",
                "--shard-docs", SHARD, "--indexes", str(indexes), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def wrapper_run(collection, tiny_bert) -> tuple[str, Path]:
    """One uninterrupted build and retrieval through the wrapper: (run text, index root)."""
    indexes, out = collection / "indexes", collection / "wrapper.run"
    done = run(["./create_colbert_baseline_runs.sh", "-d", str(collection / "tiny.yaml"), "-k", "5", "-M",
                str(tiny_bert), "-g", "cpu", "-b", "4", "-S", SHARD, "-i", str(indexes), "-o", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout and "3 queries, top 5" in done.stdout
    return out.read_text(), indexes


def test_copied_passage_is_retrieved_first(wrapper_run):
    text, _ = wrapper_run
    rankings: dict[str, list[tuple[str, int, float]]] = {}
    for line in text.splitlines():
        qid, q0, docno, rank, score, tag = line.split()
        assert (q0, tag) == ("Q0", "colbert")
        rankings.setdefault(qid, []).append((docno, int(rank), float(score)))
    assert sorted(rankings) == ["q1", "q2", "q3"]
    for qid, source in (("q1", "d3"), ("q2", "d9"), ("q3", "d8")):
        ranking = rankings[qid]
        assert len(ranking) == 5 and len({d for d, _, _ in ranking}) == 5
        assert [r for _, r, _ in ranking] == [1, 2, 3, 4, 5]
        assert [s for _, _, s in ranking] == sorted((s for _, _, s in ranking), reverse=True)
        assert ranking[0][0] == source, f"{qid}: expected {source} first, got {ranking}"


def test_cached_index_is_reused(wrapper_run, collection, tiny_bert):
    text, indexes = wrapper_run
    (folder,) = indexes.glob("*/colbert-*")
    assert json.loads((folder / "progress.json").read_text()) == {"documents": 12, "last_docno": "d12",
                                                                  "complete": True}
    again = engine(collection, tiny_bert, indexes, collection / "again.run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "indexing" not in again.stderr, "a complete cached index must not be touched"
    assert (collection / "again.run").read_text() == text


def test_interrupted_build_resumes_to_the_same_run(wrapper_run, collection, tiny_bert):
    text, _ = wrapper_run
    indexes, out = collection / "resumed-indexes", collection / "resumed.run"
    first = engine(collection, tiny_bert, indexes, out, "--max-shards", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after 1 shard(s): 6 passages indexed" in first.stdout and not out.exists()
    (folder,) = indexes.glob("*/colbert-*")
    progress = folder / "progress.json"
    assert json.loads(progress.read_text()) == {"documents": 6, "last_docno": "d6", "complete": False}

    # a count that disagrees with the index (as after a kill inside add_documents) is refused, not papered over
    progress.write_text(json.dumps({"documents": 5, "last_docno": "d5", "complete": False}))
    refused = engine(collection, tiny_bert, indexes, out)
    assert refused.returncode == 2
    assert "the index holds 6 passages but progress.json records 5" in refused.stderr and "-R" in refused.stderr

    progress.write_text(json.dumps({"documents": 6, "last_docno": "d6", "complete": False}))
    resumed = engine(collection, tiny_bert, indexes, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after 6 passages" in resumed.stderr
    assert out.read_text() == text, "a resumed build must give the same run as an uninterrupted one"
