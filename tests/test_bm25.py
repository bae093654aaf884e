"""BM25 with PISA: obvious documents come first, runs are written sorted, the index is cached."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from crossrank.first_stage import bm25
from crossrank.data.runs import load_run

ROOT = Path(__file__).resolve().parent.parent


def test_bm25_ranks_the_obvious_document_first(tmp_path, monkeypatch):
    monkeypatch.setattr(bm25, "INDEXES", tmp_path / "indexes")
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("a\tthe cat sat on the mat\nb\tdogs bark loudly at the postman\n"
                      "c\tquantum chromodynamics describes quarks and gluons\nd\tthe weather is fine today\n")
    run = bm25.bm25_run(str(corpus), {"1": "quarks and gluons", "2": "barking dogs", "3": "zebra"}, k=10)
    assert run["1"][0][0] == "c" and len(run["1"]) == 1
    assert run["2"][0][0] == "b"  # stemming: barking -> bark
    assert run["3"] == []  # no match: no result, but the query stays known
    assert (tmp_path / "indexes").is_dir() and bm25.build_index(str(corpus)).built()


def test_index_folder_changes_when_the_corpus_changes(tmp_path):
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("a\tone\n")
    before = bm25.index_folder(str(corpus))
    corpus.write_text("a\tone two\n")
    assert bm25.index_folder(str(corpus)) != before


def test_create_bm25_baseline_run_script(tmp_path):
    corpus, topics = tmp_path / "corpus.tsv", tmp_path / "topics.tsv"
    corpus.write_text("".join(f"d{i}\tword{i} common text\n" for i in range(30)))
    topics.write_text("q1\tword7\nq2\tcommon\n")
    dataset = tmp_path / "tiny.yaml"
    dataset.write_text(f"name: tiny\ncorpus: {corpus}\ntopics: {topics}\n")
    out = tmp_path / "tiny.bm25.run"
    result = subprocess.run(["./create_bm25_baseline_run.sh", "-d", str(dataset), "-k", "5", "-o", str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "[info]" not in result.stdout + result.stderr  # PISA's indexing log is held back (first_stage.bm25)
    run = load_run(out)
    assert run["q1"][0][0] == "d7" and len(run["q2"]) == 5
    q2 = [line.split() for line in out.read_text().splitlines() if line.startswith("q2 ")]
    assert [cols[3] for cols in q2] == ["1", "2", "3", "4", "5"]
    scores = [float(cols[4]) for cols in q2]
    assert scores == sorted(scores, reverse=True)
    usage = subprocess.run(["./create_bm25_baseline_run.sh", "-h"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 0 and "Usage:" in usage.stdout
    missing = subprocess.run(["./create_bm25_baseline_run.sh", "-d", str(tmp_path / "nope.yaml")], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "error:" in missing.stderr


def test_empty_passage_fails_the_job_and_leaves_no_index_and_no_run(tmp_path):
    """PISA reads the corpus in a thread of its own: an error there must still stop the job (it used to
    exit 0 with an empty run, and the half-built index was reused later, even with -l)."""
    import shutil

    corpus, topics = tmp_path / "corpus.tsv", tmp_path / "topics.tsv"
    corpus.write_text("d1\tcats and dogs\nd2\t \nd3\tdogs bark\n")
    topics.write_text("q1\tdogs\n")
    dataset = tmp_path / "tiny.yaml"
    dataset.write_text(f"name: tiny\ncorpus: {corpus}\ntopics: {topics}\n")
    out = tmp_path / "tiny.bm25.run"
    strict, lenient = bm25.index_folder(str(corpus)), bm25.index_folder(str(corpus), lenient=True)
    script = ["./create_bm25_baseline_run.sh", "-d", str(dataset), "-o", str(out)]
    try:
        for attempt in range(2):  # the second attempt must not find anything of the first
            failed = subprocess.run(script, cwd=ROOT, capture_output=True, text=True)
            assert failed.returncode == 2, failed.stderr
            assert failed.stderr.strip().splitlines()[-1] == \
                f"error: {corpus}:2: empty text for docno d2 (expected non-empty text)"
            assert not out.exists() and not strict.parent.exists()
        skipped = subprocess.run(script + ["-L"], cwd=ROOT, capture_output=True, text=True)
        assert skipped.returncode == 0, skipped.stderr
        assert f"skipped 1 malformed corpus line(s) in {corpus}" in skipped.stderr
        assert [d for d, _ in load_run(out)["q1"]] == ["d3", "d1"]
        assert lenient.is_dir() and not strict.parent.exists()  # strict runs never use the lenient index
        out.unlink()
        again = subprocess.run(script, cwd=ROOT, capture_output=True, text=True)
        assert again.returncode == 2 and not out.exists()
    finally:
        shutil.rmtree(strict.parent, ignore_errors=True)
        shutil.rmtree(lenient.parent, ignore_errors=True)


def test_a_killed_build_leaves_no_index_that_is_trusted(tmp_path, monkeypatch):
    monkeypatch.setattr(bm25, "INDEXES", tmp_path / "indexes")
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("a\tcats\nb\tdogs\n")
    folder = bm25.index_folder(str(corpus))
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now belongs to no process
    leftover = folder.with_name(f".pisa.tmp-{socket.gethostname()}-{dead.pid}")
    leftover.mkdir(parents=True)  # what a build killed mid-way leaves
    (leftover / "fwd.docs").write_text("half")
    run = bm25.bm25_run(str(corpus), {"1": "dogs"}, k=5)
    assert run["1"][0][0] == "b"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["pisa"]
