"""The evaluation report of a set of runs, written the same way by infer.py (the re-ranked run against its first
stage) and `python -m crossrank compare` (any runs): the comparison table with significance marks, its
footer, the notes about missing queries, the optional alpha-nDCG table, and the per-query CSVs and nDCG@10
difference plots next to the runs."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import ir_measures

from crossrank.data.qrels import Qrels
from crossrank.data.runs import Run
from crossrank.evaluation import metrics as evaluation


@dataclasses.dataclass
class Report:
    text: str  # the table, its footer, the p-values and (with novelty) the alpha-nDCG table
    notes: list[str]  # about queries missing from a run, each once


def report(runs: dict[str, Run], qrels: Qrels, metrics: list[ir_measures.Measure],
           topics: dict[str, str] | None = None, baseline: int = 0, correction: str | None = None,
           baseline_label: str | None = None, rel_level: int | None = None,
           novelty: str | None = None) -> Report:
    """Means of `metrics` for every run, paired two-sided t-tests against `runs[baseline]` (Holm-corrected with
    `correction="holm"`). `baseline_label` names the baseline in the footer (default: its name); `rel_level`
    adds the grade binary measures use; `novelty`: the alpha-nDCG table, appended."""
    names = list(runs)
    table, notes = evaluation.compare(runs, qrels, metrics, topics, baseline, correction)
    footer = (f"(* p < 0.05, paired two-sided t-test against {baseline_label or names[baseline]}"
              f"{', Holm-corrected' if correction else ''}; {len(evaluation.judged_qids(qrels, topics))} judged "
              f"queries" + (f"; binary measures at rel >= {rel_level})" if rel_level is not None else ")"))
    parts = [evaluation.format_table(table, metrics), footer]
    p_values = evaluation.format_p_values(table, metrics)
    if p_values:
        parts.append(p_values)
    if novelty:
        parts.append(novelty)
    return Report("\n".join(parts), list(dict.fromkeys(notes)))


def write_per_run(runs: dict[str, Run], qrels: Qrels, metrics: list[ir_measures.Measure],
                  topics: dict[str, str] | None, stems: dict[str, str | os.PathLike], baseline: int = 0,
                  per_query: bool = True, plot: bool = True,
                  title: Callable[[str, str], str] = lambda name, base: f"{name} vs {base}") -> None:
    """Next to each run of `stems` (name -> path without suffix): `<stem>.perquery.csv` (`per_query`) and, but
    for the baseline, `<stem>.ndcg10-diff.png`, its per-query nDCG@10 difference to the baseline (`plot`: an
    error without nDCG@10 among the metrics)."""
    baseline_name = list(runs)[baseline]
    evals = {n: evaluation.evaluate(r, qrels, metrics, topics, n) for n, r in runs.items()
             if n in stems or n == baseline_name}
    for name, stem in stems.items():
        if per_query:
            evaluation.write_per_query(evals[name], f"{stem}.perquery.csv")
        if plot and name != baseline_name:
            evaluation.plot_difference(evals[name], evals[baseline_name], f"{Path(stem)}.ndcg10-diff.png",
                                       title=title(name, baseline_name))
