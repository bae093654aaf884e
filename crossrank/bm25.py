"""BM25 first-stage runs with PISA (pyterrier-pisa): a compiled engine from PyPI that indexes and retrieves
offline, with no Java. The index of a corpus is built once and cached under data/indexes/.

    python -m crossrank.bm25 --dataset demo --k 1000        (or ./create_bm25_baseline_run.sh -d demo)

Parameters follow Anserini's MS MARCO passage defaults (k1 0.9, b 0.4, Porter2 stemming, Terrier stopwords).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from crossrank import cli, config
from crossrank.datasets import load_dataset
from crossrank.io import Run, read_corpus, read_topics, write_run

if TYPE_CHECKING:
    from pyterrier_pisa import PisaIndex

INDEXES = config.ROOT / "data" / "indexes"


def index_folder(corpus: str) -> Path:
    """A cache folder per corpus source: its name plus a hash of its path, size and mtime (so a changed
    file gets a new index, and datasets sharing a corpus share one)."""
    stat = os.stat(corpus) if os.path.exists(corpus) else None
    key = f"{corpus}|{stat.st_size if stat else ''}|{stat.st_mtime_ns if stat else ''}"
    name = Path(corpus.replace(":", "_")).name.split(".")[0]
    return INDEXES / f"{name}-{hashlib.blake2b(key.encode(), digest_size=6).hexdigest()}" / "pisa"


def build_index(corpus: str, threads: int = 1, lenient: bool = False) -> "PisaIndex":
    """Open the cached PISA index of `corpus`, building it first if needed (a half-built one is rebuilt)."""
    from pyterrier_pisa import PisaIndex

    folder = index_folder(corpus)
    index = PisaIndex(str(folder), stemmer="porter2", stops="terrier", threads=threads)
    if not index.built():
        print(f"indexing {corpus} into {folder}", file=sys.stderr)
        index = PisaIndex(str(folder), text_field="text", stemmer="porter2", stops="terrier", threads=threads,
                          overwrite=True)
        index.index({"docno": docno, "text": text} for docno, text in read_corpus(corpus, lenient))
    return index


def bm25_run(corpus: str, topics: dict[str, str], k: int = 1000, threads: int = 1, lenient: bool = False) -> Run:
    """Top-`k` BM25 results per topic as {qid: [(docno, score)]}."""
    import pandas as pd

    retriever = build_index(corpus, threads, lenient).bm25(k1=0.9, b=0.4, num_results=k, threads=threads)
    queries = pd.DataFrame({"qid": list(topics), "query": list(topics.values())})
    results = retriever(queries)
    run: Run = {qid: [] for qid in topics}
    for qid, docno, score in zip(results["qid"], results["docno"], results["score"]):
        run[qid].append((docno, float(score)))
    return run


def main() -> int:
    parser = cli.ArgumentParser(description="BM25 run for a dataset's topics over its corpus (PISA).")
    parser.add_argument("--dataset", required=True, help="a configs/datasets key or a YAML path")
    parser.add_argument("--k", type=cli.int_in(1), default=1000, help="results per query (default 1000)")
    parser.add_argument("--threads", type=cli.int_in(1), default=1)
    parser.add_argument("--out", default="", help="run file (default: runs/<dataset>.bm25.run)")
    parser.add_argument("--lenient", action="store_true", help="skip malformed corpus/topic lines")
    args = parser.parse_args()
    dataset = load_dataset(args.dataset)
    topics = read_topics(dataset.source("topics"), args.lenient)
    run = bm25_run(dataset.source("corpus"), topics, args.k, args.threads, args.lenient)
    out = Path(args.out) if args.out else config.ROOT / "runs" / f"{dataset.name}.bm25.run"
    write_run(out, run, tag="bm25")
    empty = sum(1 for ranking in run.values() if not ranking)
    print(f"wrote {out}: {len(run)} queries, top {args.k}" + (f" ({empty} with no result)" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
