"""The training files preprocessing.py writes and train.py reads, in `data/<dataset>/<objective>/`:

    train.parquet, valid.parquet   one row per query: qid, docnos (ranked, best first), scores (float32),
                                   judged_docnos, judged_rels (the query's qrels; empty lists where none)
    meta.yaml                      dataset, objective, source files, topics and corpus sources (texts are
                                   resolved from them at training time), evalperc, seed, counts

Queries and passages are stored by id only; `train.py` reads the texts of the docnos it uses from the corpus.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from crossrank.data.atomic import atomic_write, remove_stale_temporaries
from crossrank.errors import CrossrankError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

SPLITS = ("train", "valid")


@dataclasses.dataclass
class TrainingQuery:
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


def load_split(folder: str | Path, split: str) -> list[TrainingQuery]:
    """Read `train` or `valid` queries written by preprocessing.py."""
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise CrossrankError(f"split {split!r} is unknown (expected one of {', '.join(SPLITS)})")
    path = Path(folder) / f"{split}.parquet"
    if not path.is_file():
        raise CrossrankError(f"{path}: no such file (run preprocessing.py for this dataset and objective first)")
    table = pq.read_table(path).to_pydict()
    return [TrainingQuery(qid, list(docnos), [float(s) for s in scores], dict(zip(jd, map(int, jr))))
            for qid, docnos, scores, jd, jr in zip(table["qid"], table["docnos"], table["scores"],
                                                    table["judged_docnos"], table["judged_rels"])]


def parquet_schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([("qid", pa.string()), ("docnos", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
                      ("judged_docnos", pa.list_(pa.string())), ("judged_rels", pa.list_(pa.int32()))])


def _queries_table(queries: list[TrainingQuery]) -> "pa.Table":
    import pyarrow as pa

    columns = [[q.qid for q in queries], [q.docnos for q in queries], [q.scores for q in queries],
               [list(q.judged) for q in queries], [list(q.judged.values()) for q in queries]]
    schema = parquet_schema()
    return pa.Table.from_arrays([pa.array(c, type=t) for c, t in zip(columns, schema.types)], schema=schema)


@contextlib.contextmanager
def split_writers(folder: str | Path) -> "Iterator[dict[str, pq.ParquetWriter]]":
    """{'train': writer, 'valid': writer} for `<folder>/{train,valid}.parquet`, both renamed into place only
    when the block exits without an error (so a half-written split never replaces a good one)."""
    import pyarrow.parquet as pq

    Path(folder).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        writers = {}
        for split in SPLITS:
            remove_stale_temporaries(Path(folder) / f"{split}.parquet")  # left by a killed earlier attempt
            f = stack.enter_context(atomic_write(Path(folder) / f"{split}.parquet", "wb"))
            writers[split] = stack.enter_context(pq.ParquetWriter(f, parquet_schema()))
        yield writers


def write_split(folder: str | Path, split: str, queries: Iterable[TrainingQuery]) -> int:
    """Write queries to `<folder>/<split>.parquet` atomically (small data: tests, RankGPT files)."""
    import pyarrow.parquet as pq

    queries = list(queries)
    Path(folder).mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(Path(folder) / f"{split}.parquet")
    with atomic_write(Path(folder) / f"{split}.parquet", "wb") as f:
        pq.write_table(_queries_table(queries), f)
    return len(queries)


def write_meta(folder: str | Path, meta: dict) -> None:
    with atomic_write(Path(folder) / "meta.yaml") as f:
        yaml.safe_dump(meta, f, sort_keys=False)
