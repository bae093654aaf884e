"""Importing precomputed first-stage runs (crossrank.first_stage.importing): TREC and parquet inputs made by hand."""
from __future__ import annotations

import pytest

from conftest import DATA
from crossrank.first_stage.importing import import_run, main
from crossrank.errors import CrossrankError

# tests/data/colbert.small.run, tab-separated like the Set-Encoder/Zenodo files: query 2 has a score tie
# (d21, d22 at 8.25) and 4 candidates, query 10 is listed out of score order, query 1 has one candidate.
# Cut to depth 3, sorted by score with ties by docno descending (trec_eval's order), ranks renumbered:
EXPECTED_DEPTH_3 = """\
2 Q0 d20 1 9.5 colbertv2
2 Q0 d22 2 8.25 colbertv2
2 Q0 d21 3 8.25 colbertv2
10 Q0 d11 1 7.5 colbertv2
10 Q0 d10 2 3.0 colbertv2
10 Q0 d12 3 -2.0 colbertv2
1 Q0 d1 1 4.0 colbertv2
"""


def write_parquet(path, columns: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_trec_run_is_sorted_cut_and_summarised(tmp_path):
    out = tmp_path / "runs" / "dl19.colbert.run"
    shape = import_run(DATA / "colbert.small.run", out, depth=3, progress=False)
    assert out.read_text() == EXPECTED_DEPTH_3
    assert (shape.queries, shape.rows, shape.depths, shape.cut, shape.shallow) == (3, 7, [4, 3, 1], 1, ["1"])
    assert "3 queries, 7 rows written" in shape.summary() and "1 cut to 3; 1 with fewer than 3 (e.g. 1)" in \
        shape.summary()
    assert not list(out.parent.glob(".*.tmp")), "the temporary file must be renamed, not left behind"


def test_parquet_in_lightning_ir_layout_gives_the_same_run(tmp_path):
    # long format as lightning-ir's RunDataset reads Rank-DistiLLM parquet runs: query_id, doc_id, rank, score
    rows = [("2", "d20", 1, 9.5), ("2", "d21", 2, 8.25), ("2", "d22", 3, 8.25), ("2", "d23", 4, 1.0),
            ("10", "d10", 2, 3.0), ("10", "d11", 1, 7.5), ("10", "d12", 3, -2.0), ("1", "d1", 1, 4.0)]
    source = tmp_path / "__colbert__msmarco-passage-train-judged.parquet"
    write_parquet(source, dict(zip(["query_id", "doc_id", "rank", "score"], map(list, zip(*rows)))))
    out = tmp_path / "converted.run"
    import_run(source, out, depth=3, progress=False)
    assert out.read_text() == EXPECTED_DEPTH_3


def test_parquet_with_ranks_only_orders_by_rank(tmp_path):
    source = tmp_path / "ranked.parquet"
    write_parquet(source, {"query-id": [7, 7, 7], "corpus-id": ["b", "a", "c"], "rank": [2, 1, 3]})
    out = tmp_path / "ranked.run"
    import_run(source, out, tag="llm ranking", progress=False)
    assert out.read_text() == ("7 Q0 a 1 -1.0 llmranking\n7 Q0 b 2 -2.0 llmranking\n"
                               "7 Q0 c 3 -3.0 llmranking\n")


def test_parquet_without_a_docno_column_names_what_it_has(tmp_path):
    source = tmp_path / "bad.parquet"
    write_parquet(source, {"qid": ["1"], "passage": ["x"], "score": [1.0]})
    with pytest.raises(CrossrankError, match=r"no docno column .*docno, doc_id, docid, corpus-id.*qid, passage, score"):
        import_run(source, tmp_path / "bad.run", progress=False)


def test_duplicate_docno_is_rejected_and_nothing_is_written(tmp_path):
    source = tmp_path / "dup.run"
    source.write_text("1 Q0 a 1 2.0 x\n1 Q0 b 2 1.5 x\n1 Q0 a 3 1.0 x\n")
    out = tmp_path / "out.run"
    with pytest.raises(CrossrankError, match="appears twice"):
        import_run(source, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_wrong_query_count_is_an_error_and_nothing_is_written(tmp_path):
    out = tmp_path / "out.run"
    with pytest.raises(CrossrankError, match=r"has 3 queries \(expected 43\); nothing written"):
        import_run(DATA / "colbert.small.run", out, depth=500, queries=43, progress=False)
    assert not out.exists()


def test_exact_depth_names_a_short_query(tmp_path):
    with pytest.raises(CrossrankError, match=r"2 queries have fewer than 4 candidates .* query 10 has 3"):
        import_run(DATA / "colbert.small.run", tmp_path / "out.run", depth=4, exact=True, progress=False)


def test_check_only_writes_nothing_and_the_cli_reports_one_line(tmp_path, capsys):
    assert main(["import", str(DATA / "colbert.small.run"), "--depth", "3", "--queries", "3"]) == 0
    assert "(checked; nothing written)" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "missing.run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.run" in err[0]


def test_real_set_encoder_colbert_run_keeps_its_effectiveness(shared_data, tmp_path):
    """The Set-Encoder's ColBERTv2 top-500 for TREC DL 2019 (the run the seeds re-rank): 43 judged queries,
    500 candidates each; re-sorting must keep nDCG@10 at 0.7320 (shared/data/README.md)."""
    import ir_measures
    from ir_measures import nDCG

    source = shared_data / "trec-dl/original/set-encoder/data/runs/first-stage-trec-dl/" \
                           "__colbert__msmarco-passage-trec-dl-2019-judged.run"
    out = tmp_path / "dl19.colbert.run"
    shape = import_run(source, out, depth=500, queries=43, exact=True, progress=False)
    assert (shape.rows, shape.cut, shape.shallow) == (43 * 500, 0, [])
    qrels_file = shared_data / "trec-dl/original/anserini-tools/qrels/qrels.dl19-passage.txt"
    qrels = ir_measures.read_trec_qrels(str(qrels_file))
    score = ir_measures.calc_aggregate([nDCG @ 10], qrels, ir_measures.read_trec_run(str(out)))[nDCG @ 10]
    assert score == pytest.approx(0.7320, abs=5e-5)
