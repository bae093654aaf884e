"""Evaluation of TREC runs with ir_measures, and comparisons of several runs with significance tests.

Conventions (those of trec_eval / ir_measures, made explicit):
- Measures: graded nDCG@k uses the qrels grades as gains; the binary measures (RR, AP, R, P, Success) count
  a document as relevant when its grade is >= the dataset's `rel_level` (2 on TREC DL), via ir_measures'
  `rel=` parameter (`RR(rel=2)@10`). Unjudged documents are non-relevant.
- Which queries count: the *judged* queries, i.e. those in the qrels (restricted to the dataset's topics when
  they are given, so qrels shared by train and test topics do not leak in). Queries of the run without
  judgements are dropped and counted in a note. A judged query that the run lacks counts as an empty ranking:
  0 for every measure (trec_eval -c), so a system cannot gain by skipping hard queries.
- Ties: trec_eval (and pytrec_eval) re-sort each query by (score desc, docno desc) and ignore the rank
  column, exactly as `crossrank.data.runs.sort_ranking` orders the runs we write. ir_measures' providers disagree on
  ties (its msmarco provider, which computes RR@k, breaks them by docno *ascending*), so we break ties before
  handing a run over: each document gets its position in `sort_ranking` order as a strictly decreasing score.
- Comparisons go through `pt.Experiment` (paired two-sided t-test against a baseline, optional Holm correction).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import ir_measures
import pandas as pd

from crossrank.errors import CrossrankError
from crossrank.data.qrels import Qrels
from crossrank.data.runs import Run, sort_ranking
from crossrank.data.atomic import atomic_write

BINARY = {"RR", "AP", "R", "P", "Success"}  # measures that need a relevance threshold
DEFAULT_METRICS = ["nDCG@10", "RR@10", "AP", "R@100", "R@1000"]
# A judged query missing from a run is given this one unjudged document, so that ir_measures and pt.Experiment
# both score it 0 on every measure (and the per-query tables of all runs have the same queries for the t-test).
EMPTY_DOCNO = "crossrank:no-result"


def parse_metrics(names: list[str], rel_level: int) -> list[ir_measures.Measure]:
    """`["nDCG@10", "RR@10", "AP"]` -> ir_measures objects, binary ones at `rel=rel_level` unless given."""
    measures = []
    for name in names:
        try:
            measure = ir_measures.parse_measure(name)
        except (ValueError, NameError, KeyError, SyntaxError) as e:
            raise CrossrankError(f"metric {name!r} is not an ir_measures measure (expected e.g. nDCG@10, "
                                 f"RR@10, AP, R@1000; {e})") from None
        if measure.NAME in BINARY and "rel" not in measure.params and rel_level != 1:
            measure = measure(rel=rel_level)
        measures.append(measure)
    return measures


def no_relevant_warning(qrels: Qrels, rel_level: int, source: str) -> str | None:
    """The one warning line for qrels in which no passage reaches `rel_level` (every measure would be 0)."""
    grades = [r for judged in qrels.values() for r in judged.values()]
    if any(r >= rel_level for r in grades):
        return None
    if any(r > 0 for r in grades):
        return (f"warning: {source}: no judged passage reaches grade {rel_level} (the binary measures' relevance "
                f"level); RR, AP, R and P will be 0")
    return f"warning: {source}: no judged passage is relevant (every grade <= 0); every measure will be 0"


@dataclasses.dataclass
class Evaluation:
    """One run evaluated: mean and per-query values (rows qid, columns measure names) and what was dropped."""

    means: dict[str, float]
    per_query: pd.DataFrame
    notes: list[str]


def judged_qids(qrels: Qrels, topics: dict[str, str] | None = None) -> list[str]:
    """The queries that are evaluated: in the qrels, and in the topics when given."""
    qids = [q for q in qrels if topics is None or q in topics]
    if not qids:
        raise CrossrankError(f"no judged queries: none of the {len(topics or {})} topics is in the qrels "
                             f"({len(qrels)} queries) (expected the topics and qrels of one collection)")
    return qids


def _complete(run: Run, qids: list[str], name: str, notes: list[str]) -> Run:
    """The run restricted to `qids`, with an empty-result placeholder for judged queries it lacks."""
    wanted = set(qids)
    dropped = [q for q in run if q not in wanted]
    missing = [q for q in qids if not run.get(q)]
    if dropped:
        notes.append(f"{name}: {len(dropped)} of {len(run)} queries have no judgements and are not evaluated")
    if missing:
        notes.append(f"{name}: {len(missing)} of {len(qids)} judged queries are missing from the run and "
                     f"count as 0 (e.g. {', '.join(missing[:3])})")
    return {q: (run[q] if run.get(q) else [(EMPTY_DOCNO, 0.0)]) for q in qids}


def untie(run: Run) -> Run:
    """Scores replaced by -position in trec_eval order (score desc, docno desc): no ties left for any provider."""
    return {q: [(docno, float(-i)) for i, (docno, _) in enumerate(sort_ranking(r))] for q, r in run.items()}


def _to_frame(run: Run) -> pd.DataFrame:
    rows = [(qid, docno, score, -int(score)) for qid, ranking in untie(run).items() for docno, score in ranking]
    return pd.DataFrame(rows, columns=["qid", "docno", "score", "rank"])


def _qrels_frame(qrels: Qrels, qids: list[str]) -> pd.DataFrame:
    rows = [(qid, docno, rel) for qid in qids for docno, rel in qrels[qid].items()]
    return pd.DataFrame(rows, columns=["qid", "docno", "label"])


def evaluate(run: Run, qrels: Qrels, metrics: list[ir_measures.Measure], topics: dict[str, str] | None = None,
             name: str = "run") -> Evaluation:
    """Per-query and mean values of `metrics` over the judged queries (see the module docstring)."""
    qids = judged_qids(qrels, topics)
    notes: list[str] = []
    complete = _complete(run, qids, name, notes)
    ir_run = {q: dict(ranking) for q, ranking in untie(complete).items()}
    ir_qrels = {q: qrels[q] for q in qids}
    values: dict[str, dict[str, float]] = {q: {} for q in qids}
    for metric in ir_measures.iter_calc(metrics, ir_qrels, ir_run):
        values[metric.query_id][str(metric.measure)] = metric.value
    per_query = pd.DataFrame.from_dict(values, orient="index", columns=[str(m) for m in metrics]).fillna(0.0)
    per_query.index.name = "qid"
    return Evaluation(per_query.mean().to_dict(), per_query, notes)


def write_per_query(evaluation: Evaluation, path: str | os.PathLike) -> Path:
    """Per-query values as CSV (qid, one column per measure), written atomically."""
    with atomic_write(path) as f:
        evaluation.per_query.to_csv(f, float_format="%.4f")
    return Path(path)


def compare(runs: dict[str, Run], qrels: Qrels, metrics: list[ir_measures.Measure],
            topics: dict[str, str] | None = None, baseline: int | None = 0,
            correction: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Mean values of several runs and paired two-sided t-tests against `runs[baseline]` via `pt.Experiment`;
    `correction="holm"` adjusts the p-values for the number of compared runs (per measure). Returns the
    pt.Experiment table and the notes about dropped/missing queries."""
    import pyterrier as pt

    qids = judged_qids(qrels, topics)
    notes: list[str] = []
    frames = [_to_frame(_complete(run, qids, name, notes)) for name, run in runs.items()]
    topic_frame = pd.DataFrame({"qid": qids, "query": [(topics or {}).get(q, q) for q in qids]})
    table = pt.Experiment(frames, topic_frame, _qrels_frame(qrels, qids), list(metrics), names=list(runs),
                          baseline=baseline if len(runs) > 1 else None, test="t",
                          correction=correction if len(runs) > 1 else None,
                          verbose=False)
    return table, notes


def format_table(table: pd.DataFrame, metrics: list[ir_measures.Measure], alpha: float = 0.05) -> str:
    """A plain-text table: one row per run, one column per measure; `*` marks a significant difference
    from the baseline (p < alpha, after correction when one was applied), with the direction (+/-)."""
    names = [str(m) for m in metrics]
    width = max(len(n) for n in table["name"]) + 2
    lines = ["run".ljust(width) + "".join(n.rjust(16) for n in names)]
    for _, row in table.iterrows():
        cells = []
        for n in names:
            p = row.get(f"{n} p-value corrected", row.get(f"{n} p-value"))
            mark = ""
            if p is not None and pd.notna(p) and p < alpha:
                mark = "+*" if row.get(f"{n} +", 0) >= row.get(f"{n} -", 0) else "-*"
            cells.append(f"{row[n]:.4f}{mark:<2}".rjust(16))
        lines.append(str(row["name"]).ljust(width) + "".join(cells))
    return "\n".join(lines)


def format_p_values(table: pd.DataFrame, metrics: list[ir_measures.Measure]) -> str:
    """The p-values behind `format_table`'s marks: one row per compared run (not the baseline), one column per
    measure; the corrected p-value where a correction was applied. Empty with a single run."""
    names = [str(m) for m in metrics]
    rows = [row for _, row in table.iterrows() if any(pd.notna(row.get(f"{n} p-value")) for n in names)]
    if not rows:
        return ""
    width = max(len(str(row["name"])) for row in rows) + 2
    lines = ["p-value".ljust(width) + "".join(n.rjust(16) for n in names)]
    for row in rows:
        cells = [row.get(f"{n} p-value corrected", row.get(f"{n} p-value")) for n in names]
        lines.append(str(row["name"]).ljust(width) + "".join(
            (f"{p:.3g}" if p is not None and pd.notna(p) else "-").rjust(16) for p in cells))
    return "\n".join(lines)


SUBTOPICS = ("reference", "relevant_words")  # eval.novelty_subtopics: how α-nDCG's subtopics are made
REFERENCE_MAX_JUDGED = (1000, 5000)  # the reference clusters only grade >= 1 above 1000 judged, nothing above 5000


def relevant_docnos(qrels: Qrels, topics: dict[str, str] | None, rel_level: int,
                    protocol: str = "reference") -> set[str]:
    """The judged queries' passages whose texts `cluster_subtopics` needs: every judged one for the reference
    protocol, those with grade >= rel_level for `relevant_words`."""
    floor = -math.inf if protocol == "reference" else rel_level
    return {d for q in judged_qids(qrels, topics) for d, rel in qrels[q].items() if rel >= floor}


def cluster_subtopics(qrels: Qrels, texts: dict[str, str], rel_level: int = 1,
                      protocol: str = "reference") -> dict[str, dict[str, set[int]]]:
    """Cluster "subtopic" qrels for α-nDCG (the Set-Encoder's novelty evaluation); each relevant passage covers
    one subtopic, its cluster (`novelty.cluster_passages`: complete linkage, Jaccard distance < 0.5).

    reference        as the paper's code (webis-de/set-encoder, utils/create_novelty_runs.py): per query *all*
                     judged passages are clustered, non-relevant ones too (they shape the complete-linkage
                     clusters), on NLTK tokens (`novelty.reference_tokens`); a passage of grade >= 1 covers
                     its cluster, whatever the dataset's rel_level (ndeval counts judgements > 0). Above 1000
                     judged passages only grade >= 1 ones are clustered; above 5000 none (one subtopic).
    relevant_words   crossrank's earlier protocol: only passages with grade >= `rel_level`, on lower-cased
                     `\\w+` words.

    Either way the subtopics are a property of the qrels, the same for every run compared. Passages without
    text are left out."""
    from crossrank.novelty import cluster_passages, subtopic_qrels

    if protocol not in SUBTOPICS:
        raise CrossrankError(f"eval.novelty_subtopics is unknown (expected one of {', '.join(SUBTOPICS)}, "
                             f"got {protocol!r})")
    subtopics = {}
    for qid, judged in qrels.items():
        if protocol == "relevant_words":
            relevant = sorted(d for d, rel in judged.items() if rel >= rel_level and d in texts)
            clusters = dict(zip(relevant, cluster_passages([texts[d] for d in relevant], tokens="words")))
            subtopics[qid] = subtopic_qrels(judged, clusters, rel_level)
            continue
        pool = sorted(d for d in judged if d in texts)
        if len(pool) > REFERENCE_MAX_JUDGED[0]:
            pool = [d for d in pool if judged[d] > 0]
        labels = cluster_passages([texts[d] for d in pool]) if len(pool) <= REFERENCE_MAX_JUDGED[1] else [0] * len(pool)
        subtopics[qid] = subtopic_qrels(judged, dict(zip(pool, labels)), 1)
    return subtopics


def alpha_ndcg_means(runs: dict[str, Run], subtopics: dict[str, dict[str, set[int]]], qrels: Qrels,
                     topics: dict[str, str] | None = None, alpha: float = 0.99, k: int = 10
                     ) -> tuple[dict[str, float], int]:
    """Mean α-nDCG@k of each run over the judged queries that have a subtopic (a query the run lacks counts 0),
    rankings in trec_eval order; returns the means and the number of queries averaged over."""
    from crossrank.novelty import alpha_ndcg

    qids = [q for q in judged_qids(qrels, topics) if subtopics.get(q)]
    means = {}
    for name, run in runs.items():
        values = [alpha_ndcg([d for d, _ in sort_ranking(run.get(q, []))], subtopics[q], alpha, k) for q in qids]
        means[name] = sum(values) / len(values) if values else 0.0
    return means, len(qids)


def format_alpha_ndcg(runs: dict[str, Run], subtopics: dict[str, dict[str, set[int]]], qrels: Qrels,
                      topics: dict[str, str] | None = None, protocol: str = "reference") -> str:
    """One line per run: α-nDCG@10 (α = 0.99) on cluster subtopics, and how it was measured."""
    means, n = alpha_ndcg_means(runs, subtopics, qrels, topics)
    width = max(len(name) for name in runs) + 2
    how = ("all judged passages, NLTK tokens (the Set-Encoder reference's protocol); relevant = grade >= 1"
           if protocol == "reference" else "each query's relevant passages, lower-cased words")
    return "\n".join([f"{'run'.ljust(width)}{'alpha-nDCG@10':>16}",
                      *(f"{name.ljust(width)}{value:>16.4f}" for name, value in means.items()),
                      f"(α = 0.99; subtopics = Jaccard clusters (complete linkage, < 0.5) of {how}; "
                      f"{n} queries with a relevant passage that has text)"])


def plot_difference(evaluation: Evaluation, baseline: Evaluation, path: str | os.PathLike,
                    measure: str = "nDCG@10", title: str = "") -> Path:
    """Bar chart of per-query `measure` differences (run - baseline), sorted, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    if measure not in evaluation.per_query or measure not in baseline.per_query:
        raise CrossrankError(f"plot: {measure} was not computed (expected it among the metrics)")
    diff = (evaluation.per_query[measure] - baseline.per_query[measure].reindex(evaluation.per_query.index,
                                                                                 fill_value=0.0))
    diff = diff.sort_values(ascending=False)
    fig, ax = plt.subplots(figsize=(max(6.0, len(diff) * 0.08), 3.5))
    ax.bar(range(len(diff)), diff.values, color=["tab:green" if v >= 0 else "tab:red" for v in diff.values],
           width=1.0)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"queries (sorted), n = {len(diff)}")
    ax.set_ylabel(f"Δ {measure}")
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    ax.set_title(f"{title} (+{wins} / -{losses}, mean {diff.mean():+.4f})".strip())
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return Path(path)

