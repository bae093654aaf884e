"""Evaluate and compare existing TREC runs against a dataset's qrels.

    python -m crossrank compare -d dl19 runs/dl19.bm25.run runs/dl19.bm25.bert.CL.f1.lr1e-05.s42.run --holm
    python -m crossrank compare --qrels qrels.txt --topics topics.tsv --rel-level 2 a.run b.run

The first run is the baseline of the paired t-tests unless `--baseline` names another (by position or path).
`--per-query` writes `<run>.perquery.csv` next to each run, `--plot` the per-query nDCG@10 difference against
the baseline as `<run>.ndcg10-diff.png` (`--out-dir DIR`: into DIR instead). Below the table, the p-values behind
its marks (Holm-adjusted with `--holm`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from crossrank import cli
from crossrank.evaluation import metrics as evaluation
from crossrank.errors import CrossrankError
from crossrank.data.outputs import refuse_overwriting_inputs
from crossrank.evaluation.report import report, write_per_run
from crossrank.data.runs import load_run
from crossrank.data.qrels import read_qrels
from crossrank.data.texts import read_topics


def run_label(path: str) -> str:
    name = Path(path).name
    return name[: -len(".run")] if name.endswith(".run") else name


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(_compare, argv)


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="TREC run files; the first is the baseline by default")
    parser.add_argument("-d", "--dataset", help="a configs/datasets key (qrels, topics and rel_level from it)")
    parser.add_argument("--qrels", help="qrels file or irds:<id> (overrides the dataset's)")
    parser.add_argument("--topics", help="topics restricting the judged queries (overrides the dataset's)")
    parser.add_argument("--rel-level", type=cli.int_in(1),
                        help="minimum grade of binary measures (default: dataset's, or 1)")
    parser.add_argument("--metrics", default=",".join(evaluation.DEFAULT_METRICS), help="comma-separated")
    parser.add_argument("--depth", type=cli.int_in(1), help="evaluate only the top DEPTH of each run")
    parser.add_argument("--baseline", default="0", help="index or path of the baseline run (default 0)")
    parser.add_argument("--holm", action="store_true", help="Holm-correct the p-values over the compared runs")
    parser.add_argument("--per-query", action="store_true", help="write <run>.perquery.csv next to each run")
    parser.add_argument("--plot", action="store_true", help="write <run>.ndcg10-diff.png next to each run")
    parser.add_argument("--out-dir", help="write the --per-query and --plot files into this folder instead of next "
                                          "to each run (e.g. when the runs are read-only)")
    parser.add_argument("--novelty", action="store_true", help="also alpha-nDCG@10 (alpha 0.99) on Jaccard "
                        "clusters of the judged passages as subtopics (needs the corpus: -d or --corpus)")
    parser.add_argument("--subtopics", choices=evaluation.SUBTOPICS, default="reference",
                        help="--novelty's subtopics: reference (the Set-Encoder's code: all judged passages, NLTK "
                        "tokens, grade >= 1 relevant) or relevant_words (grade >= rel-level passages, lower-cased words)")
    parser.add_argument("--corpus", help="corpus for --novelty (overrides the dataset's)")
    return parser


def _sources(args) -> tuple[str | None, str | None, int | None, str | None]:
    """(qrels, topics, rel_level, corpus): the flags, else the dataset's."""
    qrels_source, topics_source, rel_level, corpus = args.qrels, args.topics, args.rel_level, args.corpus
    if args.dataset:
        from crossrank.data.datasets import load_dataset

        dataset = load_dataset(args.dataset)
        qrels_source = qrels_source or dataset.source("qrels")
        topics_source = topics_source or (dataset.source("topics") if dataset.topics else None)
        rel_level = dataset.rel_level if rel_level is None else rel_level
        corpus = corpus or (dataset.source("corpus") if args.novelty else None)
    if not qrels_source:
        raise CrossrankError("command line: no qrels (expected -d DATASET or --qrels PATH)")
    return qrels_source, topics_source, rel_level, corpus


def _baseline(baseline: str, paths: list[str]) -> int:
    """`--baseline` as an index into the runs: a position, or one of the paths."""
    base = int(baseline) if baseline.isdigit() else paths.index(baseline) if baseline in paths else None
    if base is None or not 0 <= base < len(paths):
        raise CrossrankError(f"command line: --baseline {baseline} is not one of the runs "
                             f"(expected 0..{len(paths) - 1} or one of the paths)")
    return base


def _novelty(args, corpus: str | None, qrels, topics, rel_level: int, runs) -> str:
    """The alpha-nDCG table of `--novelty` on Jaccard clusters of the judged passages."""
    if not corpus:
        raise CrossrankError("command line: --novelty needs passage texts (expected -d DATASET or --corpus)")
    from crossrank.data.texts import load_corpus

    needed = evaluation.relevant_docnos(qrels, topics, rel_level, args.subtopics)
    subtopics = evaluation.cluster_subtopics(qrels, load_corpus(corpus, needed, missing_ok=True), rel_level,
                                             args.subtopics)
    return evaluation.format_alpha_ndcg(runs, subtopics, qrels, topics, args.subtopics)


def _stem(args, run_path: str) -> Path:
    """Where a run's --per-query CSV and --plot PNG go, without their suffix: next to it, or in --out-dir."""
    stem = Path(run_path).with_suffix("")
    return Path(args.out_dir) / stem.name if args.out_dir else stem


def _refuse_overwriting_inputs(args, qrels_source, topics_source, corpus) -> None:
    """`--per-query` and `--plot` write next to each run: never over one of the inputs, nor twice to one file."""
    outputs = []
    base = _baseline(args.baseline, args.runs) if args.plot else -1  # the baseline gets no plot
    for i, path in enumerate(args.runs):
        stem = _stem(args, path)
        if args.per_query:
            outputs.append((f"--per-query's CSV of {path}", f"{stem}.perquery.csv"))
        if args.plot and i != base:
            outputs.append((f"--plot's plot of {path}", f"{stem}.ndcg10-diff.png"))
    if outputs:
        inputs = [(f"the run {path}", path) for path in args.runs]
        inputs += [("the qrels", qrels_source), ("the topics", topics_source), ("the corpus", corpus)]
        if args.dataset:
            from crossrank.data.datasets import load_dataset

            inputs += load_dataset(args.dataset).inputs()
        refuse_overwriting_inputs(outputs, inputs)


def _compare(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    qrels_source, topics_source, rel_level, corpus = _sources(args)
    seen: dict[str, str] = {}
    for path in args.runs:  # before any run is read: the table names runs by file name
        if run_label(path) in seen:
            raise CrossrankError(f"command line: {seen[run_label(path)]} and {path} have the same file name "
                                 f"{run_label(path)!r} (expected distinct names: the table names runs by them)")
        seen[run_label(path)] = path
    _refuse_overwriting_inputs(args, qrels_source, topics_source, corpus)
    qrels = read_qrels(qrels_source)
    topics = read_topics(topics_source) if topics_source else None
    metrics = evaluation.parse_metrics([m for m in args.metrics.split(",") if m], rel_level or 1)
    warning = evaluation.no_relevant_warning(qrels, rel_level or 1, qrels_source)
    runs = {run_label(p): load_run(p, depth=args.depth) for p in args.runs}
    paths = dict(zip(runs, args.runs))
    base = _baseline(args.baseline, list(paths.values()))
    novelty = _novelty(args, corpus, qrels, topics, rel_level or 1, runs) if args.novelty else None
    result = report(runs, qrels, metrics, topics, base, "holm" if args.holm else None, novelty=novelty)
    if args.per_query or args.plot:
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        write_per_run(runs, qrels, metrics, topics, {n: _stem(args, p) for n, p in paths.items()}, base,
                      args.per_query, args.plot)
    if warning:
        print(warning, file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
