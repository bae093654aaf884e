"""Metric values against hand-computed ones on a tiny graded qrels (ties, unjudged documents, rel >= 2,
queries missing from the run or from the qrels), the pt.Experiment comparison and the compare entry point."""
from __future__ import annotations

import math

import pytest
from pathlib import Path

from crossrank.evaluation import compare
from crossrank.evaluation import metrics as evaluation
from crossrank.data.runs import load_run, sort_ranking
from crossrank.data.qrels import read_qrels

QRELS = """q1 0 d1 3
q1 0 d2 2
q1 0 d3 1
q1 0 d4 0
q2 0 d5 2
q2 0 d6 0
q3 0 d7 1
q4 0 d8 2
"""
# q1: d3 and d1 tie (trec_eval puts d3 first: docno desc), d9 is unjudged; q2: d6 and d5 tie;
# q4 is judged but missing from the run (counts 0); q5 is in the run but not judged (dropped).
RUN = """q1 Q0 d1 3 1.0 x
q1 Q0 d4 1 2.0 x
q1 Q0 d3 2 1.0 x
q1 Q0 d9 4 0.5 x
q1 Q0 d2 5 0.1 x
q2 Q0 d5 1 5.0 x
q2 Q0 d6 2 5.0 x
q3 Q0 d7 1 1.0 x
q5 Q0 d1 1 1.0 x
"""
L2 = math.log2
# q1 in trec_eval order: d4(0) d3(1) d1(3) d9(-) d2(2); ideal 3 2 1 0
NDCG_Q1 = (1 / L2(3) + 3 / L2(4) + 2 / L2(6)) / (3 + 2 / L2(3) + 1 / L2(4))
NDCG_Q2 = (2 / L2(3)) / 2  # d6(0) d5(2)
EXPECTED = {  # means over the 4 judged queries q1..q4 at rel_level 2
    "nDCG@10": (NDCG_Q1 + NDCG_Q2 + 1.0 + 0.0) / 4,
    "RR(rel=2)@10": (1 / 3 + 1 / 2 + 0 + 0) / 4,
    "AP(rel=2)": ((1 / 3 + 2 / 5) / 2 + 1 / 2 + 0 + 0) / 4,
    "R(rel=2)@100": (1 + 1 + 0 + 0) / 4,
}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "qrels.txt").write_text(QRELS)
    (tmp_path / "a.run").write_text(RUN)
    return tmp_path


def test_hand_computed_values_with_ties_unjudged_and_rel2(files):
    qrels, run = read_qrels(files / "qrels.txt"), load_run(files / "a.run")
    metrics = evaluation.parse_metrics(["nDCG@10", "RR@10", "AP", "R@100"], rel_level=2)
    assert [str(m) for m in metrics] == list(EXPECTED)
    result = evaluation.evaluate(run, qrels, metrics, name="a")
    assert list(result.per_query.index) == ["q1", "q2", "q3", "q4"]
    for name, value in EXPECTED.items():
        assert result.means[name] == pytest.approx(value, abs=1e-9), name
    assert result.per_query.loc["q1", "nDCG@10"] == pytest.approx(NDCG_Q1)
    assert result.per_query.loc["q4"].sum() == 0.0
    assert any("q4" in n and "count as 0" in n for n in result.notes)
    assert any("1 of 4 queries have no judgements" in n for n in result.notes)


def test_binary_threshold_follows_rel_level(files):
    qrels, run = read_qrels(files / "qrels.txt"), load_run(files / "a.run")
    rr1 = evaluation.evaluate(run, qrels, evaluation.parse_metrics(["RR@10"], rel_level=1))
    # rel >= 1: q1's first relevant is d3 at rank 2, q3's d7 at rank 1, q2's d5 at rank 2
    assert rr1.per_query["RR@10"].to_dict() == pytest.approx({"q1": 0.5, "q2": 0.5, "q3": 1.0, "q4": 0.0})


def test_ties_are_resolved_as_trec_eval_does(files):
    """Our writer's order (sort_ranking) is the order the measures use: the run re-ranked by position only
    (strictly decreasing scores in sort_ranking's order) gets exactly the same values."""
    qrels, run = read_qrels(files / "qrels.txt"), load_run(files / "a.run")
    assert [d for d, _ in sort_ranking(run["q1"])] == ["d4", "d3", "d1", "d9", "d2"]
    strict = {q: [(d, float(-i)) for i, (d, _) in enumerate(sort_ranking(r))] for q, r in run.items()}
    metrics = evaluation.parse_metrics(["nDCG@10", "RR@10", "AP"], rel_level=2)
    a = evaluation.evaluate(run, qrels, metrics).per_query
    b = evaluation.evaluate(strict, qrels, metrics).per_query
    assert a.equals(b)
    # and trec_eval itself (pytrec_eval, on the raw tied scores) agrees: RR at rel >= 2 and nDCG@10
    import pytrec_eval

    raw = {q: dict(r) for q, r in run.items() if q in qrels}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut_10"}, relevance_level=2).evaluate(raw)
    for q in ref:
        assert a.loc[q, "RR(rel=2)@10"] == pytest.approx(ref[q]["recip_rank"]), q
        assert a.loc[q, "nDCG@10"] == pytest.approx(ref[q]["ndcg_cut_10"]), q


def test_topics_restrict_the_judged_queries(files):
    qrels, run = read_qrels(files / "qrels.txt"), load_run(files / "a.run")
    result = evaluation.evaluate(run, qrels, evaluation.parse_metrics(["nDCG@10"], 2), topics={"q1": "", "q2": ""})
    assert result.means["nDCG@10"] == pytest.approx((NDCG_Q1 + NDCG_Q2) / 2)


def test_compare_matches_evaluate_and_marks_significance(files):
    qrels, run = read_qrels(files / "qrels.txt"), load_run(files / "a.run")
    worse = {q: [(d, -s) for d, s in r] for q, r in run.items()}  # reversed rankings
    metrics = evaluation.parse_metrics(["nDCG@10", "RR@10"], rel_level=2)
    table, notes = evaluation.compare({"a": run, "worse": worse, "same": run}, qrels, metrics, correction="holm")
    row = table.set_index("name")
    assert row.loc["a", "nDCG@10"] == pytest.approx(EXPECTED["nDCG@10"])  # q4 counted as 0 by pt too
    assert row.loc["same", "nDCG@10 p-value"] != row.loc["same", "nDCG@10 p-value"] or \
        row.loc["same", "nDCG@10 p-value"] == pytest.approx(1.0)  # identical run: NaN or 1
    assert row.loc["worse", "nDCG@10 p-value corrected"] >= row.loc["worse", "nDCG@10 p-value"]
    text = evaluation.format_table(table, metrics)
    assert text.splitlines()[0].split() == ["run", "nDCG@10", "RR(rel=2)@10"]
    assert len(text.splitlines()) == 4


def test_compare_cli_writes_csv_and_plot(files, capsys):
    run = files / "a.run"
    (files / "b.run").write_text(RUN.replace("d1 3 1.0", "d1 3 9.0"))  # d1 first for q1
    code = compare.main([str(run), str(files / "b.run"), "--qrels", str(files / "qrels.txt"), "--rel-level", "2",
                         "--metrics", "nDCG@10,RR@10", "--per-query", "--plot"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.splitlines()[1].startswith("a ") and out.out.splitlines()[2].startswith("b ")
    csv = (files / "b.perquery.csv").read_text().splitlines()
    assert csv[0] == "qid,nDCG@10,RR(rel=2)@10" and csv[1].startswith("q1,")
    assert (files / "b.ndcg10-diff.png").read_bytes()[:4] == b"\x89PNG"
    assert not (files / "a.ndcg10-diff.png").exists()


def test_compare_prints_the_p_values_and_writes_into_out_dir(files, tmp_path, capsys):
    """The p-values behind the marks are printed (the paired t-test's, recomputed here with scipy), and
    --out-dir takes the per-query CSVs where the runs' own folder is read-only."""
    from scipy import stats

    (files / "b.run").write_text(RUN.replace("d1 3 1.0", "d1 3 9.0"))
    runs = [str(files / "a.run"), str(files / "b.run")]
    for path in runs:
        Path(path).chmod(0o444)
    files.chmod(0o555)
    try:
        code = compare.main(runs + ["--qrels", str(files / "qrels.txt"), "--rel-level", "2", "--metrics", "nDCG@10",
                                    "--per-query", "--out-dir", str(tmp_path / "eval")])
    finally:
        files.chmod(0o755)
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = out.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("p-value"))
    assert lines[header].split() == ["p-value", "nDCG@10"] and lines[header + 1].split()[0] == "b"
    qrels = read_qrels(files / "qrels.txt")
    metric = evaluation.parse_metrics(["nDCG@10"], 2)
    a, b = (evaluation.evaluate(load_run(r), qrels, metric).per_query for r in runs)
    qids = sorted(a.index)
    expected = stats.ttest_rel(b.loc[qids, "nDCG@10"], a.loc[qids, "nDCG@10"]).pvalue
    assert float(lines[header + 1].split()[1]) == pytest.approx(expected, rel=1e-2)
    assert (tmp_path / "eval" / "b.perquery.csv").read_text().startswith("qid,nDCG@10")
    assert not (files / "b.perquery.csv").exists()


def test_compare_cli_bad_input_is_one_line_exit_2(files, capsys):
    assert compare.main([str(files / "a.run")]) == 2
    assert capsys.readouterr().err.strip() == "error: command line: no qrels (expected -d DATASET or --qrels PATH)"
    assert compare.main([str(files / "missing.run"), "--qrels", str(files / "qrels.txt")]) == 2
    assert "missing.run: no such file" in capsys.readouterr().err


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(evaluation.CrossrankError, match="nDGC@10"):
        evaluation.parse_metrics(["nDGC@10"], 2)


def test_dl19_bm25_matches_the_published_figures(shared_data):
    """Real data (skips without ../shared/data): BM25 top-100 on DL19 gets Anserini's nDCG@10 0.5058."""
    dl19 = shared_data / "trec-dl" / "dl19"
    qrels, run = read_qrels(dl19 / "qrels.tsv"), load_run(dl19 / "runs" / "bm25.top100.run")
    result = evaluation.evaluate(run, qrels, evaluation.parse_metrics(["nDCG@10", "RR@10"], 2),
                                 topics=dict.fromkeys(qrels, ""))
    assert len(result.per_query) == 43
    assert round(result.means["nDCG@10"], 4) == 0.5058


def test_alpha_ndcg_with_the_reference_subtopics_by_hand():
    """The Set-Encoder reference's protocol against a hand computation. Token sets (Jaccard distances):
    A = w1..w10 (grade 2), C = A + w11 (grade 0, 1 - 10/11 = 0.09 from A), B = w1..w6 + w12 (grade 1: 0.45 from A,
    0.5 from C), D = z1 z2 (grade 1, far from all). Reference: all judged passages are clustered, so A and C merge
    first, and {A, C} - B = max(0.45, 0.5) is not below 0.5: A and B are two subtopics. Clustering only the
    relevant passages (relevant_words, rel_level 1) merges A and B (0.45) into one."""
    from crossrank.evaluation.metrics import alpha_ndcg_means, cluster_subtopics

    words = [f"w{i}" for i in range(1, 13)]
    texts = {"A": " ".join(words[:10]), "C": " ".join(words[:11]), "B": " ".join(words[:6] + ["w12"]),
             "D": "z1 z2"}
    qrels = {"q": {"A": 2, "B": 1, "C": 0, "D": 1}}
    run = {"q": [("B", 4.0), ("C", 3.0), ("A", 2.0), ("D", 1.0)]}
    reference = cluster_subtopics(qrels, texts, rel_level=2)  # rel_level does not matter: grade >= 1 covers
    assert reference["q"]["A"] != reference["q"]["B"] and "C" not in reference["q"] and len(reference["q"]) == 3
    ours = cluster_subtopics(qrels, texts, rel_level=1, protocol="relevant_words")
    assert ours["q"]["A"] == ours["q"]["B"] != ours["q"]["D"]

    def discount(rank):
        return 1 / math.log2(rank + 1)

    # reference: B, C, A, D cover three new subtopics at ranks 1, 3, 4 (C is not relevant); the ideal covers them at 1-3
    expected = (1 + discount(3) + discount(4)) / (1 + discount(2) + discount(3))
    assert alpha_ndcg_means({"r": run}, reference, qrels)[0]["r"] == pytest.approx(expected, abs=1e-12)
    # relevant_words: A repeats B's subtopic (gain 1 - 0.99); the greedy ideal puts D second
    expected = (1 + 0.01 * discount(3) + discount(4)) / (1 + discount(2) + 0.01 * discount(3))
    assert alpha_ndcg_means({"r": run}, ours, qrels)[0]["r"] == pytest.approx(expected, abs=1e-12)


def test_an_explicit_rel_is_kept_and_binary_measures_get_the_dataset_level():
    parsed = [str(m) for m in evaluation.parse_metrics(["RR(rel=1)@10", "RR@10", "nDCG@10", "AP"], 2)]
    assert parsed == ["RR@10", "RR(rel=2)@10", "nDCG@10", "AP(rel=2)"]  # rel=1 is printed as the default
    assert [str(m) for m in evaluation.parse_metrics(["RR@10"], 1)] == ["RR@10"]


def _paired(n: int = 12) -> tuple[dict, dict, dict]:
    """n queries, one relevant passage each: `good` ranks it first, `bad` tenth."""
    qrels = {f"q{i}": {f"r{i}": 1} for i in range(n)}
    good = {f"q{i}": [(f"r{i}", 10.0)] + [(f"n{i}_{j}", 9.0 - j) for j in range(9)] for i in range(n)}
    bad = {f"q{i}": [(f"n{i}_{j}", 10.0 - j) for j in range(9)] + [(f"r{i}", 0.5)] for i in range(n)}
    return qrels, good, bad


def test_two_runs_are_tested_and_corrected_and_topics_restrict_compare():
    qrels, good, bad = _paired()
    metrics = evaluation.parse_metrics(["RR@10"], 1)
    table, _ = evaluation.compare({"good": good, "bad": bad}, qrels, metrics, correction="holm")
    row = table.set_index("name")
    assert row.loc["bad", "RR@10 p-value"] < 0.05 and "RR@10 p-value corrected" in table.columns
    assert "-*" in evaluation.format_table(table, metrics).splitlines()[2]
    # topics restrict the queries: only q0 and q1 count, where `bad` is as good as `good`
    bad.update({q: good[q] for q in ("q0", "q1")})
    table, _ = evaluation.compare({"good": good, "bad": bad}, qrels, metrics, topics={"q0": "x", "q1": "y"})
    assert table.set_index("name").loc["bad", "RR@10"] == pytest.approx(1.0)


def test_a_query_without_a_relevant_passage_counts_as_zero_not_one():
    qrels = {"q1": {"a": 2}, "q2": {"b": 1}}
    run = {"q1": [("a", 2.0)], "q2": [("b", 2.0)]}
    result = evaluation.evaluate(run, qrels, evaluation.parse_metrics(["RR@10", "R@100"], 2))
    assert result.per_query.loc["q2"].tolist() == [0.0, 0.0] and result.means["RR(rel=2)@10"] == pytest.approx(0.5)
    assert list(result.per_query.columns) == ["RR(rel=2)@10", "R(rel=2)@100"]


def test_no_relevant_warning_says_which_measures_are_zero():
    assert evaluation.no_relevant_warning({"q": {"a": 2}}, 2, "x") is None
    assert "RR, AP, R and P will be 0" in evaluation.no_relevant_warning({"q": {"a": 1}}, 2, "qrels.txt")
    assert evaluation.no_relevant_warning({"q": {"a": 0}}, 1, "qrels.txt") == (
        "warning: qrels.txt: no judged passage is relevant (every grade <= 0); every measure will be 0")
