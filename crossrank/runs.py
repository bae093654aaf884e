"""Streaming a large TREC run: blocks of whole queries as Arrow tables (qid, docno, score), validated.

`read_run_blocks` is the bounded-memory reader behind preprocessing (training files from a 400M-line run),
first-stage imports and the teacher's candidates; `crossrank.io.read_run` is the line reader it falls back
on to name a bad `path:line`.
"""
from __future__ import annotations

import concurrent.futures
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from crossrank.io import GZIP_ERRORS, IRDS_PREFIX, CrossrankError, load_run, read_run, text_lines

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
    `crossrank.io.read_run`, which names the offending `path:line`. `lenient` uses that validating reader
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
    return not head or any(len(line.split(_delimiter(head[0]))) != 6 for line in head)


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
    run needs no more memory than its top-k); `irds:` goes through `crossrank.io.load_run`."""
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
