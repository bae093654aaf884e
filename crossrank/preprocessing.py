"""Training files: first-stage or teacher rankings per query, split into train and validation queries.

`preprocessing.py` writes, for one dataset and one objective, a folder `data/<dataset>/<objective>/`:

    train.parquet, valid.parquet   one row per query: qid, docnos (ranked, best first), scores (float32),
                                   judged_docnos, judged_rels (the query's qrels; empty lists where none)
    meta.yaml                      dataset, objective, source files, topics and corpus sources (texts are
                                   resolved from them at training time), evalperc, seed, counts

Queries and passages are stored by id only; `train.py` reads the texts of the docnos it uses from the corpus.
Validation queries are chosen by a seeded hash of the qid (`is_validation`), so the split does not depend on
file order, is the same in a streaming pass as in memory, and is disjoint by construction.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from pathlib import Path

import yaml

from crossrank.io import CrossrankError

SPLITS = ("train", "valid")


@dataclasses.dataclass
class QueryCandidates:
    """One training query: its ranked candidates (first-stage run or teacher order) and its judgements."""

    qid: str
    docnos: list[str]  # best first
    scores: list[float]  # first-stage scores, or teacher scores (depth - rank + 1)
    judged: dict[str, int]  # docno -> relevance (empty when the source has no qrels)


def is_validation(qid: str, evalperc: float, seed: int) -> bool:
    """True for the ~`evalperc`% of qids held out for validation: a seeded hash, order-independent."""
    digest = hashlib.blake2b(f"{seed}\t{qid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < evalperc / 100.0


def load_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.yaml"
    if not path.is_file():
        raise CrossrankError(f"{path}: no such file (run preprocessing.py for this dataset and objective first)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_split(folder: str | Path, split: str) -> list[QueryCandidates]:
    """Read `train` or `valid` queries written by preprocessing.py."""
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise CrossrankError(f"split {split!r} is unknown (expected one of {', '.join(SPLITS)})")
    path = Path(folder) / f"{split}.parquet"
    if not path.is_file():
        raise CrossrankError(f"{path}: no such file (run preprocessing.py for this dataset and objective first)")
    table = pq.read_table(path).to_pydict()
    return [QueryCandidates(qid, list(docnos), [float(s) for s in scores], dict(zip(jd, map(int, jr))))
            for qid, docnos, scores, jd, jr in zip(table["qid"], table["docnos"], table["scores"],
                                                    table["judged_docnos"], table["judged_rels"])]


def write_split(folder: str | Path, split: str, queries: Iterable[QueryCandidates], rows_per_group: int = 10_000) -> int:
    """Write queries to `<folder>/<split>.parquet` atomically, streaming in row groups; returns the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crossrank.io import atomic_write

    schema = pa.schema([("qid", pa.string()), ("docnos", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
                        ("judged_docnos", pa.list_(pa.string())), ("judged_rels", pa.list_(pa.int32()))])
    count, buffer = 0, []

    def flush(writer: "pq.ParquetWriter") -> None:
        columns = list(zip(*[(q.qid, q.docnos, q.scores, list(q.judged), list(q.judged.values())) for q in buffer]))
        writer.write_table(pa.Table.from_arrays([pa.array(c, type=t) for c, t in zip(columns, schema.types)],
                                                schema=schema))
        buffer.clear()

    with atomic_write(Path(folder) / f"{split}.parquet", "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for query in queries:
            buffer.append(query)
            count += 1
            if len(buffer) >= rows_per_group:
                flush(writer)
        if buffer:
            flush(writer)
    return count


def write_meta(folder: str | Path, meta: dict) -> None:
    from crossrank.io import atomic_write

    with atomic_write(Path(folder) / "meta.yaml") as f:
        yaml.safe_dump(meta, f, sort_keys=False)
