"""The row's table: per dataset x first stage, the paper's figure, ours, the difference, and a paired two-sided
t-test of ours against the first stage's top-k (crossrank.evaluation.metrics.compare, as `crossrank compare`),
beside the first stage's own figure and the paper's one. Written to runs/reproduce/<row>.md and .json."""
from __future__ import annotations

import json

from crossrank.data.atomic import atomic_write
from crossrank.reproduce.rows import Plan

MEASURES = ("nDCG@10", "RR@10")
SMOKE = ("SMOKE RUN (--tiny): trained on the demo collection with a small backbone for a few steps on CPU; it "
         "checks the chain, its figures are not comparable to the paper's (paper column: n/a; where the first stage "
         "is the papers' own run, its paper figure is shown)")


def _holm(pvalues: list[float]) -> list[float]:
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def compute(plan: Plan, runner, holm: bool = False) -> list[dict]:
    from crossrank.data.datasets import load_dataset
    from crossrank.data.qrels import read_qrels
    from crossrank.data.runs import load_run
    from crossrank.data.texts import read_topics
    from crossrank.evaluation import metrics as evaluation

    expected = {} if plan.tiny else (plan.spec.get("expected") or {})
    first_expected = plan.first_stage_expected.get(plan.spec.get("paper"), {}) or {}
    rows = []
    for step in (s for s in plan.steps if s.kind == "rerank"):
        ours_path = runner.root / runner.resolve(step.outputs[0])
        first_path = runner.root / step.inputs[1]
        depth = int(step.command.split(" -k ")[1].split()[0])
        dataset = load_dataset(step.dataset)
        qrels, topics = read_qrels(dataset.source("qrels")), read_topics(dataset.source("topics"))
        names = [m if not m.startswith("RR") or dataset.rel_level == 1 else f"RR(rel={dataset.rel_level})@10"
                 for m in MEASURES]
        measures = evaluation.parse_metrics(names, dataset.rel_level)
        runs = {f"{step.first_stage} (top {depth})": load_run(first_path, depth=depth), "ours": load_run(ours_path)}
        frame, _ = evaluation.compare(runs, qrels, measures, topics, 0, None)
        first_row, ours_row = frame.iloc[0], frame.iloc[1]
        for short, measure in zip(MEASURES, measures):
            label = str(measure)
            paper = ((expected.get(step.first_stage) or {}).get(step.dataset) or {}).get(short)
            paper_first = ((first_expected.get(step.first_stage) or {}).get(step.dataset.removesuffix("-shared"))
                           or {}).get(short)
            ours = float(ours_row[label])
            rows.append({"dataset": step.dataset, "first_stage": step.first_stage, "measure": label,
                         "paper": paper, "ours": ours, "difference": None if paper is None else ours - paper,
                         "p_value": float(ours_row[f"{label} p-value"]), "first_stage_ours": float(first_row[label]),
                         "first_stage_paper": paper_first, "queries": len(evaluation.judged_qids(qrels, topics))})
    if "alpha-nDCG@10" in _measures(plan):
        rows += _alpha_rows(plan, runner, expected, first_expected)
    if holm and rows:
        for row, p in zip(rows, _holm([r["p_value"] for r in rows])):
            row["p_value_holm"] = p
    return rows


def _measures(plan: Plan) -> list[str]:
    spec = plan.spec.get("eval") or {}
    return list(spec.get("measures", [])) if "datasets" in spec else []


def _alpha_rows(plan: Plan, runner, expected: dict, first_expected: dict) -> list[dict]:
    """alpha-nDCG@10 (alpha 0.99) on the reference's subtopics (Jaccard clusters of the judged passages), as
    `crossrank compare --novelty` measures it, per dataset x first stage, with a paired t-test per query."""
    from scipy.stats import ttest_rel

    from crossrank.data.datasets import load_dataset
    from crossrank.data.qrels import read_qrels
    from crossrank.data.runs import load_run, sort_ranking
    from crossrank.data.texts import load_corpus, read_topics
    from crossrank.evaluation import metrics as evaluation
    from crossrank.novelty import alpha_ndcg

    rows, cache = [], {}
    for step in (s for s in plan.steps if s.kind == "rerank"):
        dataset = load_dataset(step.dataset)
        qrels, topics = read_qrels(dataset.source("qrels")), read_topics(dataset.source("topics"))
        if step.dataset not in cache:
            needed = evaluation.relevant_docnos(qrels, topics, dataset.rel_level, "reference")
            texts = load_corpus(dataset.source("corpus"), needed, missing_ok=True)
            cache[step.dataset] = evaluation.cluster_subtopics(qrels, texts, dataset.rel_level, "reference")
        subtopics = cache[step.dataset]
        qids = [q for q in evaluation.judged_qids(qrels, topics) if subtopics.get(q)]
        depth = int(step.command.split(" -k ")[1].split()[0])
        values = {}
        for name, path in (("first", runner.root / step.inputs[1]), ("ours", runner.root / runner.resolve(step.outputs[0]))):
            run = load_run(path, depth=depth)
            values[name] = [alpha_ndcg([d for d, _ in sort_ranking(run.get(q, []))], subtopics[q], 0.99, 10)
                            for q in qids]
        mean = {k: sum(v) / len(v) if v else 0.0 for k, v in values.items()}
        p = float(ttest_rel(values["ours"], values["first"]).pvalue) if len(qids) > 1 else float("nan")
        paper = ((expected.get(step.first_stage) or {}).get(step.dataset) or {}).get("alpha-nDCG@10")
        paper_first = ((first_expected.get(step.first_stage) or {}).get(step.dataset.removesuffix("-shared"))
                       or {}).get("alpha-nDCG@10")
        rows.append({"dataset": step.dataset, "first_stage": step.first_stage, "measure": "alpha-nDCG@10",
                     "paper": paper, "ours": mean["ours"], "difference": None if paper is None else mean["ours"] - paper,
                     "p_value": p if p == p else 1.0, "first_stage_ours": mean["first"],
                     "first_stage_paper": paper_first, "queries": len(qids)})
    return rows


def _num(value, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def render(plan: Plan, rows: list[dict], holm: bool = False) -> str:
    spec = plan.spec
    lines = [f"# {plan.row}: {spec.get('title', '')}{' (smoke run)' if plan.tiny else ''}", ""]
    if plan.tiny:
        lines += [SMOKE, ""]
    else:
        source = (spec.get("expected") or {}).get("source", "")
        lines += [f"paper: {spec.get('paper')}; figures from {source}", ""]
    p_name = "p (Holm)" if holm else "p"
    lines.append(f"| dataset | first stage | measure | paper | ours | difference | {p_name} vs first stage "
                 f"| first stage: paper | first stage: ours |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r.get("p_value_holm", r["p_value"])
        mark = "*" if p < 0.05 else ""
        lines.append(f"| {r['dataset']} | {r['first_stage']} | {r['measure']} | {_num(r['paper'])} | "
                     f"{_num(r['ours'])} | {_num(r['difference'], True)} | {p:.3g}{mark} | "
                     f"{_num(r['first_stage_paper'])} | {_num(r['first_stage_ours'])} |")
    lines += ["", "(* p < 0.05, paired two-sided t-test of ours against the first stage's top-k, per query)"]
    for key in ("not_knowable", "notes"):
        if spec.get(key) and not plan.tiny:
            lines += ["", f"{key.replace('_', ' ')}: {' '.join(str(spec[key]).split())}"]
    if not plan.tiny:
        lines += ["", "Every remaining difference from the papers: docs/reproducing.md, \"Known differences\"."]
    return "\n".join(lines) + "\n"


def write(plan: Plan, runner, outputs: list[str], holm: bool = False) -> str:
    rows = compute(plan, runner, holm)
    text = render(plan, rows, holm)
    md, js = (runner.root / o for o in outputs)
    md.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(js) as f:
        json.dump({"row": plan.row, "smoke_run": plan.tiny, "rows": rows}, f, indent=1)
    with atomic_write(md) as f:
        f.write(text)
    runner.out(text)
    return text
