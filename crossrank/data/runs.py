"""TREC runs (`qid Q0 docno rank score tag`): the validating line reader, the bounded-memory block reader,
deterministic ordering and atomic writing.

`read_run` checks every line and names a bad `path:line`; `read_run_blocks` is the streaming reader behind
preprocessing (training files from a 400M-line run), first-stage imports and the teacher's candidates, and
falls back on `read_run` to name a bad line. Ties are broken the same way everywhere (`sort_ranking`: score
desc, docno desc), so the file's order is what trec_eval reads back.
"""
from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import concurrent.futures
from typing import TYPE_CHECKING
from crossrank.data.files import BadLines, GZIP_ERRORS, text_lines
from crossrank.data.atomic import atomic_write, remove_stale_temporaries
from crossrank.data.irds import IRDS_PREFIX, irds_errors, is_irds, open_irds
from crossrank.errors import CrossrankError


# qid -> [(docno, score), ...]; the order of the list is not implied, use `sort_ranking`.
Run = dict[str, list[tuple[str, float]]]


# ---------------------------------------------------------------------------------------------------------
# Runs


def read_run(path: str | os.PathLike, lenient: bool = False) -> Iterator[tuple[str, str, int, float]]:
    """Stream a TREC run as (qid, docno, rank, score) in file order.

    Checks: 6 columns, integer rank, finite float score, each docno at most once per query. Queries need not
    be contiguous. `irds:<id>` reads the dataset's scoreddocs (rank = position in the dataset's order).
    """
    if is_irds(path):
        yield from _read_irds_run(str(path))
        return
    bad = BadLines(path, "run", lenient)
    for _, qid, docno, rank, score in _run_rows(path, bad):
        yield qid, docno, rank, score
    bad.close()


def read_run_queries(path: str | os.PathLike, lenient: bool = False,
                     torn_ok: bool = False) -> Iterator[tuple[int, str, list[tuple[str, int, float]]]]:
    """Stream a TREC run as blocks of consecutive lines of one query: (first line, qid, [(docno, rank, score)])
    in file order, validated as `read_run` does (a query whose lines are not together gives several blocks).

    `torn_ok` ignores a last line without a line break (the torn write of a killed process) instead of
    checking it.
    """
    bad = BadLines(path, "run", lenient)
    block: tuple[int, str, list[tuple[str, int, float]]] | None = None
    for number, qid, docno, rank, score in _run_rows(path, bad, torn_ok):
        if block is None or block[1] != qid:
            if block is not None:
                yield block
            block = (number, qid, [])
        block[2].append((docno, rank, score))
    if block is not None:
        yield block
    bad.close()


def run_problems(path: str | os.PathLike) -> dict[str, int]:
    """How many lines of a run have each problem ("malformed", "duplicate"), for messages that give counts."""
    bad = BadLines(path, "run", lenient=True, quiet=True)
    for _ in _run_rows(path, bad):
        pass
    return bad.problems


def _run_rows(path: str | os.PathLike, bad: BadLines,
              torn_ok: bool = False) -> Iterator[tuple[int, str, str, int, float]]:
    """The one run-line validator: (line number, qid, docno, rank, score) of every good line; `bad` decides
    whether a bad line raises or is counted."""
    seen: dict[str, set[str]] = {}
    for number, line, ended in text_lines(path):
        if not line.strip() or (torn_ok and not ended):
            continue
        parts = line.split()
        if len(parts) != 6:
            bad(number, f"run line has {len(parts)} columns (expected 6: qid Q0 docno rank score tag, "
                        f"got {line[:80]!r})")
            continue
        qid, _, docno, rank, score, _ = parts
        try:
            rank_value = int(rank)
        except ValueError:
            bad(number, f"rank is not an integer (expected e.g. 1, got {rank!r})")
            continue
        try:
            score_value = float(score)
        except ValueError:
            bad(number, f"score is not a number (expected e.g. 12.5, got {score!r})")
            continue
        if not math.isfinite(score_value):
            bad(number, f"score is not finite (expected a finite number, got {score!r})")
            continue
        docnos = seen.setdefault(qid, set())
        if docno in docnos:
            bad(number, f"docno {docno} appears twice for query {qid} (expected each docno once per query)",
                "duplicate")
            continue
        docnos.add(docno)
        yield number, qid, docno, rank_value, score_value


def _read_irds_run(source: str) -> Iterator[tuple[str, str, int, float]]:
    dataset = open_irds(source)
    if not dataset.has_scoreddocs():
        raise CrossrankError(f"{source}: this ir_datasets id has no scoreddocs (a first-stage run)")
    ranks: dict[str, int] = {}
    with irds_errors(source):
        for sd in dataset.scoreddocs_iter():
            ranks[sd.query_id] = ranks.get(sd.query_id, 0) + 1
            yield sd.query_id, sd.doc_id, ranks[sd.query_id], float(sd.score)


def load_run(path: str | os.PathLike, depth: int | None = None, lenient: bool = False) -> Run:
    """Read a whole run into {qid: [(docno, score), ...]} sorted by score (ties: see `sort_ranking`),
    cut to the top `depth` per query when given. An empty run is an error."""
    run: Run = {}
    for qid, docno, _, score in read_run(path, lenient):
        run.setdefault(qid, []).append((docno, score))
    if not run:
        raise CrossrankError(f"{path}: the run is empty (expected at least one line)")
    for qid, ranking in run.items():
        run[qid] = sort_ranking(ranking)[:depth]
    return run


def sort_ranking(ranking: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """Sort (docno, score) by score, highest first; ties by docno, *descending*.

    The tie order is trec_eval's (and so pytrec_eval's and ir_measures'), which re-sorts every run by
    (score desc, docno desc) and ignores the rank column: the ranks we write then agree with what the
    evaluation tools score, and re-ranking the same scores twice gives the same file.
    """
    return sorted(ranking, key=lambda pair: (pair[1], pair[0]), reverse=True)


def clean_tag(tag: str, default: str = "crossrank") -> str:
    """A run tag as one column: whitespace removed (a tag with spaces would add columns), `default` if empty."""
    return "".join(tag.split()) or default


def format_run_lines(qid: str, ranking: Iterable[tuple[str, float]], tag: str) -> Iterator[str]:
    """TREC run lines for one query; `ranking` must already be sorted (see `sort_ranking`).

    Scores are written exactly (Python's shortest round-trip form), never rounded to a fixed number of
    decimals: rounding could turn two different scores into a tie that the evaluation tools then order by
    docno, against the ranks written here (and tiny scores such as PISA's on small corpora would all become 0).
    """
    for rank, (docno, score) in enumerate(ranking, 1):
        yield f"{qid} Q0 {docno} {rank} {float(score)!r} {tag}\n"


def write_run(path: str | os.PathLike, run: Run, tag: str = "crossrank", depth: int | None = None) -> Path:
    """Write a run atomically, each query sorted by score with deterministic ties, queries in qid order."""
    tag = clean_tag(tag)
    if Path(path).parent.is_dir():
        remove_stale_temporaries(path)  # a killed earlier attempt's half-written run
    with atomic_write(path) as f:
        for qid in sorted(run, key=qid_order):
            f.writelines(format_run_lines(qid, sort_ranking(run[qid])[:depth], tag))
    return Path(path)


def qid_order(qid: str) -> tuple[int, int | str]:
    """Numeric qids in numeric order, then the rest in string order (a stable, familiar file layout)."""
    return (0, int(qid)) if qid.isdigit() else (1, qid)

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

RUN_COLUMNS = ["qid", "q0", "docno", "rank", "score", "tag"]
BLOCK_BYTES = 1 << 24  # 16 MiB of run text per block: memory stays bounded whatever the file size


def read_run_blocks(path: str | Path, lenient: bool = False) -> "Iterator[pa.Table]":
    """Stream a TREC run (or a parquet run) as Arrow tables (qid, docno, score) of complete queries, each
    query sorted best first with crossrank's deterministic ties (score desc, docno desc).

    The fast path parses single-space or tab separated text with Arrow's multi-threaded CSV reader in 16 MiB
    blocks and never turns lines into Python objects, so memory stays bounded whatever the file size. A
    query's lines must be contiguous (as retrieval engines write them): a query that reappears later is an
    error, since bounded memory cannot regroup it. The rank column is parsed as an integer (and so checked) as
    the line reader does, though the score decides the order. Whatever the fast path rejects is re-read by
    `crossrank.data.runs.read_run`, which names the offending `path:line`. `lenient` uses that validating reader
    throughout and skips bad lines.
    """
    import pyarrow as pa

    path = Path(path)
    if lenient or _needs_line_reader(path):
        yield from _blocks_from_lines(path, lenient)
        return
    seen: set[str] = set()
    carry = None  # rows of the last query of the previous block, which may continue in this one
    try:
        for block in _raw_blocks(path):
            table = block if carry is None else pa.concat_tables([carry, block])
            starts = group_starts(table)
            cut = int(starts[-1])  # the last query may continue in the next block
            carry = table.slice(cut)
            if cut:
                yield _check_and_sort(table.slice(0, cut), starts[:-1], path, seen)
        if carry is not None:
            yield _check_and_sort(carry, group_starts(carry), path, seen)
    except (pa.ArrowInvalid, pa.ArrowTypeError, _BadRun, *GZIP_ERRORS) as error:
        failure = error
    else:
        return
    for _ in read_run(path):  # names the first bad line (or the damaged .gz), if it is a line-level problem
        pass
    raise CrossrankError(str(failure) if isinstance(failure, _BadRun) else
                         f"{path}: cannot parse the run ({failure})")


class _BadRun(Exception):
    """Raised inside the fast path; turned into a CrossrankError after the line reader had its say."""


def _needs_line_reader(path: Path) -> bool:
    """irds: and irregular whitespace (e.g. several spaces between columns) go through the line reader."""
    if str(path).startswith("irds:"):
        return True
    if path.suffix == ".parquet":
        return False
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8", errors="replace") as f:
            head = [line.rstrip("\r\n") for line in (f.readline() for _ in range(5)) if line.strip()]
    except (OSError, *GZIP_ERRORS):  # the line reader names the problem (missing, damaged .gz, ...)
        return True
    return not head or head[0].startswith("\ufeff") or any(len(line.split(_delimiter(head[0]))) != 6 for line in head)


def _delimiter(first_line: str) -> str:
    return "\t" if "\t" in first_line else " "


def _raw_blocks(path: Path) -> "Iterator[pa.Table]":
    """Parse the run in ~16 MiB chunks cut at line ends. Each chunk is parsed by Arrow on all cores, and only
    one chunk is in memory at a time (Arrow's own streaming CSV reader reads ahead without bound when its
    consumer is slower than its parser)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    if path.suffix == ".parquet":
        yield from _parquet_blocks(path)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        delimiter = _delimiter(f.readline().decode("utf-8", "replace"))
        f.seek(0)
        options = dict(
            read_options=pcsv.ReadOptions(column_names=RUN_COLUMNS),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pcsv.ConvertOptions(
                column_types={"qid": pa.string(), "docno": pa.string(), "rank": pa.int64(), "score": pa.float64()},
                # rank is parsed (and so checked, as the line reader does) even though the score decides
                include_columns=["qid", "docno", "rank", "score"]))
        def chunks() -> Iterator[bytes]:
            rest = b""
            while data := f.read(BLOCK_BYTES):
                chunk = rest + data
                cut = chunk.rfind(b"\n") + 1
                # Arrow would end a line at a bare \r (memchr first: counting is ~50x slower than finding)
                if b"\r" in chunk and chunk.count(b"\r", 0, cut) != chunk.count(b"\r\n", 0, cut):
                    raise _BadRun(f"{path}: a bare carriage return (\\r) inside a line (expected \\n or \\r\\n "
                                  f"line ends)")
                yield chunk[:cut]
                rest = chunk[cut:]
            yield rest

        # Parse the next chunk in a thread while the caller works on this one (Arrow releases the GIL):
        # two chunks in memory at most.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            parse = lambda chunk: (pcsv.read_csv(pa.py_buffer(chunk), **options).drop_columns(["rank"])
                                   if chunk.strip() else None)
            pending = None
            for chunk in chunks():
                following = pool.submit(parse, chunk)
                if pending is not None and (table := pending.result()) is not None:
                    yield table
                pending = following
            if pending is not None and (table := pending.result()) is not None:
                yield table


def _parquet_blocks(path: Path) -> "Iterator[pa.Table]":
    """Parquet runs in long format, one row per (query, document), under the column names webis'
    lightning-ir reads (query: qid, query_id, query-id; passage: docno, doc_id, docid, corpus-id; rank and/or
    score)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    options = {"qid": ("qid", "query_id", "query-id"), "docno": ("docno", "doc_id", "docid", "corpus-id"),
               "score": ("score",), "rank": ("rank",)}
    found = {ours: next((c for c in theirs if c in names), None) for ours, theirs in options.items()}
    for ours in ("qid", "docno"):
        if found[ours] is None:
            raise CrossrankError(f"{path}: parquet run has no {ours} column (expected one of "
                                 f"{', '.join(options[ours])}; it has {', '.join(names)})")
    if found["score"] is None and found["rank"] is None:
        raise CrossrankError(f"{path}: parquet run has neither a score nor a rank column")
    rank_type = file.schema_arrow.field(found["rank"]).type if found["rank"] else None
    if rank_type is not None and not pa.types.is_integer(rank_type):  # as the text paths check it
        raise CrossrankError(f"{path}: parquet run's rank column is {rank_type} (expected integers)")
    for batch in file.iter_batches(batch_size=1 << 20):
        if found["score"] is not None:  # as trec_eval does with TREC runs, the score decides the order
            score = batch[found["score"]].cast(pa.float64())
        else:  # a ranking without scores: better ranks get higher scores
            score = pc.negate(batch[found["rank"]].cast(pa.float64()))
        yield pa.table({"qid": batch[found["qid"]].cast(pa.string()),
                        "docno": batch[found["docno"]].cast(pa.string()), "score": score})


def _blocks_from_lines(path: Path, lenient: bool) -> "Iterator[pa.Table]":
    """The validating line reader, grouped into tables of complete queries (any query order is accepted
    here, since a query's rows are collected before its table is built)."""
    import pyarrow as pa

    rows: dict[str, list[tuple[str, float]]] = {}
    for qid, docno, _, score in read_run(path, lenient):
        rows.setdefault(qid, []).append((docno, score))
    queries = list(rows)
    for first in range(0, len(queries), 10_000):
        chunk = [(qid, docno, score) for qid in queries[first:first + 10_000] for docno, score in rows[qid]]
        qids, docnos, scores = zip(*chunk)
        table = pa.table({"qid": list(qids), "docno": list(docnos), "score": pa.array(scores, pa.float64())})
        yield _check_and_sort(table, group_starts(table), path, set())


def group_starts(table: "pa.Table") -> "np.ndarray":
    """Row indices where a new qid begins (0 included)."""
    import numpy as np
    import pyarrow.compute as pc

    qid = table["qid"].combine_chunks()
    changed = pc.not_equal(qid.slice(1), qid.slice(0, len(qid) - 1)).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(changed) + 1]).astype(np.int64)


def _check_and_sort(table: "pa.Table", starts: "np.ndarray", path: Path, seen: set[str]) -> "pa.Table":
    """Check a table of complete queries (each qid new, each docno once per qid, finite scores) and sort
    each query best first. Most runs are already in that order, so it is checked before anything is sorted."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.combine_chunks()
    for qid in table["qid"].take(pa.array(starts)).to_pylist():
        if qid in seen:
            raise _BadRun(f"{path}:{_line_of_reappearance(path, qid)}: query {qid} appears again after other "
                          f"queries (expected a query's lines together; sort the run, e.g. sort -s -k1,1)")
        seen.add(qid)
    score = table["score"].to_numpy()
    if not np.isfinite(score).all():
        raise _BadRun(f"{path}: a score is not finite")
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, table.num_rows)))  # [N] query index
    same_query = group[1:] == group[:-1]
    tied = same_query & (score[1:] == score[:-1])
    in_order = ~same_query | (score[:-1] > score[1:])
    if tied.any():
        where_tied = np.flatnonzero(tied)
        docno = table["docno"]
        before, after = docno.take(pa.array(where_tied)), docno.take(pa.array(where_tied + 1))
        if not pc.all(pc.not_equal(before, after)).as_py():
            raise _BadRun(f"{path}: a docno appears twice for one query")
        in_order[where_tied] = pc.greater(before, after).to_numpy(zero_copy_only=False)
    if not in_order.all():
        order = pc.sort_indices(pa.table({"g": group, "score": table["score"], "docno": table["docno"]}),
                                sort_keys=[("g", "ascending"), ("score", "descending"), ("docno", "descending")])
        table, group = table.take(order), group[order.to_numpy()]
    if _has_repeated_docno(group, table["docno"]):
        raise _BadRun(f"{path}: a docno appears twice for one query")
    return table


def _has_repeated_docno(group: "np.ndarray", docno: "pa.ChunkedArray") -> bool:
    """Whether some docno occurs twice within one query ([N] query index, [N] docno).

    Numeric docnos (MS MARCO, most passage collections) are checked as integers with a hash table, ~6x
    faster than hashing strings; since equal strings give equal integers, "no repeat" there is final, and
    only a suspected repeat (e.g. "7" and "007") is confirmed on the strings.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        numbers = pc.cast(docno, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        numbers = None
    if numbers is not None and len(numbers) and 0 <= numbers.min() and numbers.max() < 1 << 40:
        if not pd.Series((group.astype(np.int64) << 40) | numbers).duplicated().any():
            return False
    keys = pa.table({"g": group.astype(np.int32), "docno": docno})
    return keys.group_by(["g", "docno"]).aggregate([]).num_rows != len(group)


def _line_of_reappearance(path: Path, qid: str) -> int:
    """The line where `qid` starts again after other queries (computed only for the error message)."""
    started = left = False
    for number, line, _ in text_lines(path):
        current = line.split(maxsplit=1)[0] if line.strip() else None
        if current == qid:
            if left:
                return number
            started = True
        elif started and current is not None:
            left = True
    return 0


def top_k_docnos(run: str, k: int) -> dict[str, list[str]]:
    """{qid: top-k docnos, best first} of a run. Files stream through `read_run_blocks` (a 400M-line training
    run needs no more memory than its top-k); `irds:` goes through `crossrank.data.runs.load_run`."""
    if run.startswith(IRDS_PREFIX):
        return {qid: [docno for docno, _ in ranking] for qid, ranking in load_run(run, depth=k).items()}
    candidates: dict[str, list[str]] = {}
    for table in read_run_blocks(run):  # complete queries, each sorted best first
        for qid, docno in zip(table["qid"].to_pylist(), table["docno"].to_pylist()):
            ranking = candidates.setdefault(qid, [])
            if len(ranking) < k:
                ranking.append(docno)
    if not candidates:
        raise CrossrankError(f"{run}: the run is empty (expected at least one line)")
    return candidates
