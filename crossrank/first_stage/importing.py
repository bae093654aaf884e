"""Precomputed first-stage runs: check and import the seeds' published ColBERTv2 runs.

    python -m crossrank first-stage import SOURCE [OUT] [--depth 500] [--queries N] [--exact] [--tag colbertv2]

SOURCE is a TREC run (tab- or space-separated, optionally gzipped) or a parquet run in long format, one row per
(query, passage), with the column names webis' lightning-ir reads for its Rank-DistiLLM parquet runs: the query
in `qid`, `query_id` or `query-id`, the passage in `docno`, `doc_id`, `docid` or `corpus-id`, and `score` (or only
`rank`, then better ranks get higher scores). The run is streamed (the 9.5 GB MS MARCO train run never sits in
memory) through `crossrank.data.runs.read_run_blocks`, which rejects duplicate docnos, non-finite scores and
queries split across the file, and sorts each query by score with deterministic ties (score desc, docno desc,
as trec_eval). Each query is cut to `--depth`, and the result is written atomically as a TREC run to OUT (ranks
renumbered 1..n, queries in source order); without OUT the run is only checked. A summary line reports the shape
(queries, depth per query); `--queries` and `--exact` turn a wrong shape into an error, and no file is written.

The ColBERT engine itself (index a corpus, retrieve) is `crossrank.first_stage.colbert`, run in its own environment by
`create_colbert_baseline_runs.sh`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import statistics
import sys
from pathlib import Path

from crossrank import cli
from crossrank.errors import CrossrankError
from crossrank.data.atomic import atomic_write
from crossrank.data.outputs import output_lock, refuse_overwriting_inputs
from crossrank.data.runs import clean_tag, format_run_lines
from crossrank.data.runs import read_run_blocks


@dataclasses.dataclass
class RunShape:
    """What an import found: query count, rows written, and the per-query depth before cutting."""

    source: str
    depth: int | None  # expected depth (None: keep everything)
    queries: int = 0
    rows: int = 0
    depths: list[int] = dataclasses.field(default_factory=list)  # candidates per query, before the cut
    shallow: list[str] = dataclasses.field(default_factory=list)  # qids with fewer than `depth` candidates

    @property
    def cut(self) -> int:
        return sum(1 for d in self.depths if self.depth is not None and d > self.depth)

    def summary(self) -> str:
        if not self.depths:
            return f"{self.source}: empty run"
        text = (f"{self.source}: {self.queries:,} queries, {self.rows:,} rows written; candidates per query "
                f"min {min(self.depths)} / median {statistics.median(self.depths):g} / max {max(self.depths)}")
        if self.depth is not None:
            text += f"; {self.cut:,} cut to {self.depth}; {len(self.shallow):,} with fewer than {self.depth}"
            if self.shallow:
                text += f" (e.g. {', '.join(self.shallow[:5])})"
        return text


def import_run(source: str | Path, out: str | Path | None = None, depth: int | None = None,
               queries: int | None = None, exact: bool = False, tag: str = "colbertv2",
               lenient: bool = False, progress: bool = True) -> RunShape:
    """Stream `source` into a checked TREC run at `out` (or only check it when `out` is None).

    `depth` cuts every query to its top `depth`; `queries` is the expected number of queries and `exact` demands
    at least `depth` candidates for every query: either mismatch raises CrossrankError and leaves no output behind.
    """
    from tqdm import tqdm

    if depth is not None and depth < 1:
        raise CrossrankError(f"--depth must be at least 1 (got {depth})")
    if exact and depth is None:
        raise CrossrankError("--exact needs --depth (the number of candidates every query must have)")
    if not str(source).startswith("irds:") and not Path(source).is_file():
        raise CrossrankError(f"{source}: no such file")
    shape = RunShape(str(source), depth)
    tag = clean_tag(tag)
    with (atomic_write(out) if out else contextlib.nullcontext()) as f, \
            tqdm(desc="importing", unit=" queries", disable=not progress, file=sys.stderr) as bar:
        for table in read_run_blocks(source, lenient):
            before = shape.queries
            rows = zip(table["qid"].to_pylist(), table["docno"].to_pylist(), table["score"].to_pylist())
            for qid, group in itertools.groupby(rows, key=lambda row: row[0]):
                # read_run_blocks yields whole queries, each sorted best first with deterministic ties
                ranking = [(docno, score) for _, docno, score in group]
                shape.queries += 1
                shape.depths.append(len(ranking))
                if depth is not None and len(ranking) < depth:
                    shape.shallow.append(qid)
                ranking = ranking[:depth]
                shape.rows += len(ranking)
                if f is not None:
                    f.writelines(format_run_lines(qid, ranking, tag))
            bar.update(shape.queries - before)
        _check_shape(shape, queries, exact)
    return shape


def _check_shape(shape: RunShape, queries: int | None, exact: bool) -> None:
    if not shape.queries:
        raise CrossrankError(f"{shape.source}: the run is empty (expected at least one line)")
    if queries is not None and shape.queries != queries:
        raise CrossrankError(f"{shape.source}: the run has {shape.queries:,} queries (expected {queries:,}); "
                             f"nothing written")
    if exact and shape.shallow:
        raise CrossrankError(f"{shape.source}: {len(shape.shallow):,} queries have fewer than {shape.depth} "
                             f"candidates (expected at least {shape.depth}; e.g. query {shape.shallow[0]} has "
                             f"{shape.depths[_first_index(shape)]}); nothing written")


def _first_index(shape: RunShape) -> int:
    return next(i for i, d in enumerate(shape.depths) if d < shape.depth)


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(_import, argv)


def _import(argv: list[str] | None) -> int:
    parser = cli.ArgumentParser(description="Precomputed first-stage runs (see the module docstring).")
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="check a TREC or parquet run and write it as a sorted TREC run")
    imp.add_argument("source", help="TREC run (.run, .txt, .gz) or parquet run")
    imp.add_argument("out", nargs="?", default="", help="TREC run to write (omit to only check the source)")
    imp.add_argument("--depth", type=cli.int_in(1), help="keep the top DEPTH per query; the expected depth for --exact")
    imp.add_argument("--queries", type=cli.int_in(1), help="expected number of queries (an error otherwise)")
    imp.add_argument("--exact", action="store_true", help="every query must have at least --depth candidates")
    imp.add_argument("--tag", default="colbertv2", help="run tag written in the last column (default colbertv2)")
    imp.add_argument("--lenient", action="store_true", help="skip malformed lines and report how many")
    args = parser.parse_args(argv)
    refuse_overwriting_inputs([("OUT", args.out)], [("the SOURCE run", args.source)])
    with output_lock(args.out) if args.out else contextlib.nullcontext():
        shape = import_run(args.source, args.out or None, args.depth, args.queries, args.exact, args.tag,
                           args.lenient)
    print(shape.summary() + (f" -> {args.out}" if args.out else " (checked; nothing written)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
