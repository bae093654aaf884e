"""Readers and writers: round trips, every malformed-input message, atomic writes, deterministic ties."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from crossrank.data.atomic import atomic_write
from crossrank.data.qrels import read_qrels
from crossrank.data.runs import load_run, read_run, read_run_queries, run_problems, write_run
from crossrank.data.texts import load_corpus, read_corpus, read_topics
from crossrank.errors import CrossrankError

from conftest import DATA


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_line_error(read, path: Path, line: int, message: str) -> None:
    """`read(path)` fails with a message that starts `path:line: message`."""
    with pytest.raises(CrossrankError) as error:
        read(path)
    assert str(error.value).startswith(f"{path}:{line}: {message}")


# --- runs ------------------------------------------------------------------------------------------------


def test_read_run_streams_file_order():
    rows = list(read_run(DATA / "run.txt"))
    assert rows[0] == ("q1", "d1", 1, 3.5)
    assert rows[-1] == ("q2", "d1", 2, -0.5)
    assert len(rows) == 5


def test_load_run_sorts_by_score_with_trec_eval_ties():
    run = load_run(DATA / "run.txt")
    # d2 and d3 tie at 2.0: trec_eval orders ties by docno descending, so d3 comes before d2
    assert run["q1"] == [("d1", 3.5), ("d3", 2.0), ("d2", 2.0)]
    assert load_run(DATA / "run.txt", depth=1)["q1"] == [("d1", 3.5)]


def test_write_run_round_trip_is_sorted_ranked_and_stable(tmp_path):
    run = {"10": [("b", 1.0), ("a", 1.0), ("c", 5.0)], "9": [("x", 0.5)]}
    path = write_run(tmp_path / "out.run", run, tag="my tag")
    lines = path.read_text().splitlines()
    # numeric qids in numeric order; score desc, ties docno desc; ranks 1..n; tag without spaces
    assert lines == ["9 Q0 x 1 0.5 mytag", "10 Q0 c 1 5.0 mytag", "10 Q0 b 2 1.0 mytag", "10 Q0 a 3 1.0 mytag"]
    again = write_run(tmp_path / "again.run", load_run(path), tag="mytag")
    assert again.read_text() == path.read_text()


def test_written_scores_are_exact_so_no_tie_is_made_up(tmp_path):
    run = {"q": [("a", 0.1234567891), ("z", 0.1234567890), ("m", 9.4e-07), ("n", 9.3e-07)]}
    path = write_run(tmp_path / "exact.run", run)
    assert load_run(path) == {"q": sorted(run["q"], key=lambda p: -p[1])}
    assert [line.split()[2] for line in path.read_text().splitlines()] == ["a", "z", "m", "n"]


def test_write_run_agrees_with_ir_measures_on_ties(tmp_path):
    import ir_measures
    from ir_measures import P

    # d1 (judged relevant) ties with d2 at the cut-off 1: trec_eval puts d2 first (docno descending)
    path = write_run(tmp_path / "t.run", {"q": [("d1", 1.0), ("d2", 1.0)]})
    assert path.read_text().splitlines()[0].split()[2] == "d2"
    qrels = [ir_measures.Qrel("q", "d1", 1)]
    assert ir_measures.calc_aggregate([P @ 1], qrels, ir_measures.read_trec_run(str(path)))[P @ 1] == 0.0


@pytest.mark.parametrize("line, message", [
    ("q1 Q0 d1 1 2.0", "run line has 5 columns (expected 6: qid Q0 docno rank score tag"),
    ("q1 Q0 d1 first 2.0 t", "rank is not an integer (expected e.g. 1, got 'first')"),
    ("q1 Q0 d1 1 high t", "score is not a number (expected e.g. 12.5, got 'high')"),
    ("q1 Q0 d1 1 nan t", "score is not finite (expected a finite number, got 'nan')"),
    ("q1 Q0 d0 1 9.0 t", "docno d0 appears twice for query q1"),
])
def test_bad_run_line_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path, "bad.run", f"q1 Q0 d0 1 9.5 t\n{line}\nq1 Q0 d9 3 1.0 t\n")
    assert_line_error(lambda p: list(read_run(p)), path, 2, message)


def test_lenient_run_skips_and_reports(tmp_path, capsys):
    path = write(tmp_path, "bad.run", "q1 Q0 d1 1 1.0 t\nq1 Q0 d2 x 1.0 t\nq1 Q0 d3\nq1 Q0 d4 4 0.5 t\n")
    assert [r[1] for r in read_run(path, lenient=True)] == ["d1", "d4"]
    err = capsys.readouterr().err
    assert f"skipped 2 malformed run line(s) in {path}" in err and f"first: {path}:2:" in err


def test_empty_run_is_an_error(tmp_path):
    with pytest.raises(CrossrankError, match="the run is empty"):
        load_run(write(tmp_path, "empty.run", "\n"))


def test_missing_file_is_a_crossrank_error(tmp_path):
    with pytest.raises(CrossrankError, match="no such file"):
        list(read_run(tmp_path / "nope.run"))


# --- qrels -----------------------------------------------------------------------------------------------


def test_qrels_trec_and_beir_formats():
    assert read_qrels(DATA / "qrels.txt") == {"q1": {"d1": 2, "d3": 0, "d9": 3}, "q2": {"d4": 1}}
    assert read_qrels(DATA / "qrels.beir.tsv") == {"q1": {"d1": 2}, "q2": {"d4": 1}}
    assert read_qrels(DATA / "beir") == {"q1": {"d1": 1}}


@pytest.mark.parametrize("line, message", [
    ("q1 0 d2 high", "relevance is not an integer (expected e.g. 0..3, got 'high')"),
    ("q1 0 d2 1 extra", "qrels line has 5 columns"),
    ("q1 0 d1 0", "docno d1 is judged twice for query q1"),
])
def test_bad_qrels_line(tmp_path, line, message):
    assert_line_error(read_qrels, write(tmp_path, "bad.qrels", f"q1 0 d1 1\n{line}\n"), 2, message)


# --- topics ----------------------------------------------------------------------------------------------


def test_topics_tsv_jsonl_trec_and_beir():
    assert read_topics(DATA / "topics.tsv") == {"q1": "what is a cat", "q2": "dogs that bark"}
    assert read_topics(DATA / "beir") == {"q1": "what is a cat"}
    assert read_topics(DATA / "topics.trec.txt") == {"301": "international organized crime",
                                                        "302": "poliomyelitis and post-polio"}


@pytest.mark.parametrize("line, message", [
    ("q2 no tab here", "topics line has no tab (expected qid<TAB>text"),
    ("q2\t   ", "empty text for qid q2 (expected non-empty text)"),
    ("q1\tagain", "qid q1 appears twice"),
])
def test_bad_topics_line(tmp_path, line, message):
    assert_line_error(read_topics, write(tmp_path, "bad.tsv", f"q1\tfirst\n{line}\n"), 2, message)


# --- corpora ---------------------------------------------------------------------------------------------


def test_corpus_tsv_jsonl_and_beir_with_titles():
    assert dict(read_corpus(DATA / "corpus.tsv"))["d4"] == "the dog barks"
    assert dict(read_corpus(DATA / "corpus.jsonl")) == {"d1": "the cat sat on the mat",
                                                          "d2": "Dogs dogs bark loudly at night"}
    assert dict(read_corpus(DATA / "beir")) == {"d1": "the cat sat on the mat", "d2": "Dogs dogs bark"}


def test_load_corpus_keeps_only_wanted_and_reports_missing():
    assert load_corpus(DATA / "corpus.tsv", ["d2", "d4"]) == {"d2": "dogs bark loudly at night",
                                                                 "d4": "the dog barks"}
    with pytest.raises(CrossrankError, match=r"2 of 3 docnos are not in the corpus \(e.g. d7, d8\)"):
        load_corpus(DATA / "corpus.tsv", ["d1", "d7", "d8"])


@pytest.mark.parametrize("line, message", [
    ('{"docno": "d2", "text": ""}', "empty text for docno d2"),
    ('{"text": "no id"}', "no id field (expected one of docno, _id, doc_id)"),
    ('{"docno": "d1", "text": "again"}', "docno d1 appears twice"),
    ('{"docno": "d3", "text": "broken"', "invalid JSON"),
])
def test_bad_jsonl_corpus_line(tmp_path, line, message):
    path = write(tmp_path, "bad.jsonl", '{"docno": "d1", "text": "fine"}\n' + line + "\n")
    assert_line_error(lambda p: list(read_corpus(p)), path, 2, message)


def test_lenient_corpus_skips_empty_text(tmp_path, capsys):
    path = write(tmp_path, "c.tsv", "d1\tfine\nd2\t\nd3\talso fine\n")
    assert dict(read_corpus(path, lenient=True)) == {"d1": "fine", "d3": "also fine"}
    assert "skipped 1 malformed corpus line(s)" in capsys.readouterr().err


def test_gzipped_files_are_read(tmp_path):
    import gzip

    path = tmp_path / "corpus.tsv.gz"
    with gzip.open(path, "wt") as f:
        f.write("d1\tzipped text\n")
    assert dict(read_corpus(path)) == {"d1": "zipped text"}


def test_irds_sources_read_through_ir_datasets(tmp_path, shared_data):
    """vaswani from a copy of the pre-populated offline ir_datasets cache (skips without ../shared/data).
    In a subprocess: ir_datasets reads IR_DATASETS_HOME when it is first used."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(shared_data / "ir_datasets_home" / "vaswani", tmp_path / "vaswani")
    code = ("from crossrank.data.texts import read_corpus, read_topics; from crossrank.data.qrels import read_qrels\n"
            "t = read_topics('irds:vaswani'); q = read_qrels('irds:vaswani'); d = next(read_corpus('irds:vaswani'))\n"
            "print(len(t), sum(map(len, q.values())), d[0], bool(d[1]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "IR_DATASETS_HOME": str(tmp_path)}, cwd=Path(__file__).parent.parent)
    assert out.stdout.split() == ["93", "2083", "1", "True"]


def test_irds_offline_download_failure_is_explained(tmp_path):
    import subprocess
    import sys

    code = "from crossrank.data.texts import read_topics; read_topics('irds:cranfield')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "IR_DATASETS_HOME": str(tmp_path)}, cwd=Path(__file__).parent.parent)
    assert "irds:cranfield: ir_datasets could not download what its cache lacks" in out.stderr


# --- atomic writes ---------------------------------------------------------------------------------------


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    with atomic_write(tmp_path / "shared.run") as f:
        f.write("x")
    (tmp_path / "plain.run").write_text("x")
    assert (tmp_path / "shared.run").stat().st_mode == (tmp_path / "plain.run").stat().st_mode


def test_atomic_write_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "run.txt"
    target.write_text("old content\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half a file")
            raise RuntimeError("killed")
    assert target.read_text() == "old content\n"
    assert os.listdir(tmp_path) == ["run.txt"]


# --- damaged files: invalid UTF-8, damaged .gz, bare \r, JSONL types -------------------------------------


@pytest.mark.parametrize("read,first", [
    (lambda p: list(read_run(p)), b"q1 Q0 d1 1 2.0 t\n"), (lambda p: list(read_corpus(p)), b"d1\tone\n"),
    (read_topics, b"q1\tone\n"), (read_qrels, b"q1 0 d1 1\n")], ids=["run", "corpus", "topics", "qrels"])
def test_invalid_utf8_names_its_line(tmp_path, read, first):
    path = tmp_path / "bad.txt"
    path.write_bytes(first + b"caf\xe9 latin-1\n")
    with pytest.raises(CrossrankError, match=r"bad\.txt:2: invalid UTF-8 at byte 4 of the line"):
        read(path)


def test_truncated_and_corrupt_gzip_are_crossrank_errors(tmp_path):
    import gzip

    data = gzip.compress("".join(f"q1 Q0 d{i} {i} {100 - i} t\n" for i in range(1, 2000)).encode())
    truncated = write(tmp_path, "cut.run.gz", "")
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CrossrankError, match=r"cut\.run\.gz:\d+: the gzip file is truncated or corrupt"):
        list(read_run(truncated))
    not_gzip = write(tmp_path, "plain.tsv.gz", "d1\tnot compressed\n")
    with pytest.raises(CrossrankError, match=r"plain\.tsv\.gz:1: the gzip file is truncated or corrupt"):
        list(read_corpus(not_gzip))


def test_bare_carriage_return_neither_splits_a_text_nor_shifts_line_numbers(tmp_path):
    corpus = tmp_path / "corpus.tsv"
    corpus.write_bytes(b"d1\tone\rstill one\r\nd2\ttwo\nd3\t\n")
    with pytest.raises(CrossrankError, match=r"corpus\.tsv:3: empty text for docno d3"):
        list(read_corpus(corpus))
    assert list(read_corpus(corpus, lenient=True))[:2] == [("d1", "one\rstill one"), ("d2", "two")]
    run = tmp_path / "run.txt"
    run.write_bytes(b"q1 Q0 d1 1 2.0 t\r\nq1 Q0 d2 2 1.0 t\rq1 Q0 d3 x 0.5 t\nq1 Q0 d4 y 0.1 t\n")
    # line 2 holds a bare \r: as one line it has 12 columns, and line 3 is still line 3
    assert_line_error(lambda p: list(read_run(p)), run, 2, "run line has 12 columns")
    assert [row[1] for row in read_run(run, lenient=True)] == ["d1"]


@pytest.mark.parametrize("line,message", [
    ('{"_id": null, "text": "x"}', '"_id" is null (expected a string or an integer id)'),
    ('{"_id": ["d1"], "text": "x"}', '"_id" is a list (expected a string or an integer id)'),
    ('{"_id": 1.5, "text": "x"}', '"_id" is a number (expected a string or an integer id)'),
    ('{"_id": "d1", "text": ["x", "y"]}', '"text" is a list (expected a string)'),
    ('{"_id": "d1", "text": 7}', '"text" is a number (expected a string)'),
    ('{"_id": "d1", "title": {"a": 1}, "text": "x"}', '"title" is an object (expected a string)'),
    ('{"_id": "d1", "text": null}', "empty text for docno d1"),
])
def test_jsonl_field_types_are_checked(tmp_path, line, message):
    path = write(tmp_path, "corpus.jsonl", '{"_id": 7, "text": "an integer id is fine"}\n' + line + "\n")
    assert_line_error(lambda p: list(read_corpus(p)), path, 2, message)
    assert list(read_corpus(path, lenient=True)) == [("7", "an integer id is fine")]


def test_read_run_queries_groups_consecutive_lines_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "partial.run"
    path.write_bytes(b"q1 Q0 a 1 2 t\nq1 Q0 b 2 1 t\nq2 Q0 c 1 2 t\nq2 Q0 d 2")  # killed mid-line
    assert list(read_run_queries(path, torn_ok=True)) == [
        (1, "q1", [("a", 1, 2.0), ("b", 2, 1.0)]), (3, "q2", [("c", 1, 2.0)])]
    assert_line_error(lambda p: list(read_run_queries(p)), path, 4, "run line has 4 columns")


def test_run_problems_counts_by_kind(tmp_path):
    path = write(tmp_path, "run.txt", "q1 Q0 a 1 2 t\nq1 Q0 a 2 1 t\nq1 Q0 b 3\nq2 Q0 a 1 2 t\nq2 Q0 a 1 2 t\n")
    assert run_problems(path) == {"duplicate": 2, "malformed": 1}


BOM = "\ufeff"


@pytest.mark.parametrize("name, text, read, expected", [
    ("topics.tsv", "q201\tcats\nq202\tdogs\n", read_topics, {"q201": "cats", "q202": "dogs"}),
    ("topics.jsonl", '{"_id": "q201", "text": "cats"}\n', read_topics, {"q201": "cats"}),
    ("corpus.tsv", "d1\tone\nd2\ttwo\n", lambda p: dict(read_corpus(p)), {"d1": "one", "d2": "two"}),
    ("qrels.txt", "q201 0 d1 2\n", read_qrels, {"q201": {"d1": 2}}),
    ("run.txt", "q201 Q0 d1 1 2.0 r\nq201 Q0 d2 2 1.0 r\n", load_run, {"q201": [("d1", 2.0), ("d2", 1.0)]}),
    ("run.tsv", "q201\tQ0\td1\t1\t2.0\tr\n", load_run, {"q201": [("d1", 2.0)]}),
])
def test_a_byte_order_mark_at_the_start_is_not_part_of_the_first_id(tmp_path, name, text, read, expected):
    """Editors on Windows start UTF-8 files with a BOM: "q201 not in the topics" must not follow from it."""
    (tmp_path / name).write_text(BOM + text, encoding="utf-8")
    assert read(tmp_path / name) == expected
    (tmp_path / ("gz-" + name + ".gz")).write_bytes(__import__("gzip").compress((BOM + text).encode()))
    assert read(tmp_path / ("gz-" + name + ".gz")) == expected


def test_lenient_load_run_keeps_every_good_line_after_bad_and_blank_ones(tmp_path, capsys):
    """Blank and bad lines in the middle (wrong columns, a non-integer rank, a non-finite score) are skipped one
    by one, never the end of the file; strict is the default and stops at the first one."""
    path = tmp_path / "r.run"
    path.write_text("1 Q0 a 1 3.0 t\n\n1 Q0 b 2 2.0\n1 Q0 c x 1.0 t\n1 Q0 d 4 inf t\n1 Q0 g 6 abc t\n"
                    "1 Q0 e 5 0.5 t\n2 Q0 f 1 1.0 t")  # the last line without its line break: still a line
    assert load_run(path, lenient=True) == {"1": [("a", 3.0), ("e", 0.5)], "2": [("f", 1.0)]}
    assert "skipped 4 malformed run line(s)" in capsys.readouterr().err
    with pytest.raises(CrossrankError, match=r"r\.run:3: run line has 5 columns"):
        load_run(path)
    assert run_problems(path) == {"malformed": 4} and capsys.readouterr().err == ""  # counts, quietly
    path.write_text("1 Q0 a 1 3.0 t\n1 Q0 a 2 2.0 t\n1 Q0 b 3 1.0 t\n")
    assert run_problems(path) == {"duplicate": 1}


def test_numeric_qids_sort_numerically_before_the_others(tmp_path):
    from crossrank.data.runs import qid_order

    assert sorted(["b", "10", "2", "a", "1"], key=qid_order) == ["1", "2", "10", "a", "b"]
    out = write_run(tmp_path / "o.run", {"10": [("x", 1.0)], "2": [("y", 1.0)], "a": [("z", 1.0)]})
    assert [line.split() for line in out.read_text().splitlines()] == [
        ["2", "Q0", "y", "1", "1.0", "crossrank"], ["10", "Q0", "x", "1", "1.0", "crossrank"],
        ["a", "Q0", "z", "1", "1.0", "crossrank"]]
