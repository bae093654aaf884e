#!/usr/bin/env python
"""Which BM25 engine: PISA (pyterrier-pisa, what crossrank uses) against bm25s on real collections from
../shared/data, same queries, same depth, in the same run: index + retrieval time and nDCG@10.

    pip install bm25s PyStemmer   # the peer, not a crossrank dependency
    python bench/bm25.py
Last line: PISA's mean nDCG@10 minus bm25s' (we pick the engine for effectiveness that matches Anserini's
BM25 first, and for scale: PISA's compiled BlockMax-WAND index is built for MS MARCO-size corpora).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

from crossrank.data.qrels import Qrels, read_qrels
from crossrank.data.runs import Run
from crossrank.data.texts import read_corpus, read_topics


def evaluate(run: Run, qrels: Qrels) -> float:
    import ir_measures
    from ir_measures import nDCG

    results = [ir_measures.ScoredDoc(q, d, s) for q, ranking in run.items() for d, s in ranking]
    judged = [ir_measures.Qrel(q, d, r) for q, docs in qrels.items() for d, r in docs.items()]
    return ir_measures.calc_aggregate([nDCG @ 10], judged, results)[nDCG @ 10]


def pisa(corpus: list[tuple[str, str]], topics: dict[str, str], k: int) -> Run:
    import pandas as pd
    from pyterrier_pisa import PisaIndex

    with tempfile.TemporaryDirectory() as tmp:
        index = PisaIndex(tmp + "/idx", text_field="text", stemmer="porter2", stops="terrier")
        index.index({"docno": d, "text": t} for d, t in corpus)
        res = index.bm25(k1=0.9, b=0.4, num_results=k)(pd.DataFrame({"qid": list(topics), "query": list(topics.values())}))
    run: Run = {}
    for q, d, s in zip(res["qid"], res["docno"], res["score"]):
        run.setdefault(q, []).append((d, float(s)))
    return run


def bm25s_run(corpus: list[tuple[str, str]], topics: dict[str, str], k: int) -> Run:
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(bm25s.tokenize([t for _, t in corpus], stopwords="en", stemmer=stemmer, show_progress=False),
                    show_progress=False)
    tokens = bm25s.tokenize(list(topics.values()), stopwords="en", stemmer=stemmer, show_progress=False)
    docs, scores = retriever.retrieve(tokens, k=min(k, len(corpus)), show_progress=False)
    return {q: [(corpus[i][0], float(s)) for i, s in zip(row, srow) if s > 0]
            for q, row, srow in zip(topics, docs, scores)}


def main() -> None:
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: nothing to measure")
        return
    collections = {"vaswani": SHARED / "vaswani", "cranfield": SHARED / "cranfield", "trec-dl-19": SHARED / "trec-dl" / "dl19"}
    totals = {"pisa": 0.0, "bm25s": 0.0}
    quality = {"pisa": [], "bm25s": []}
    for name, folder in collections.items():
        corpus = list(read_corpus(folder / "corpus.jsonl", lenient=True))
        topics = read_topics(folder / "queries.jsonl")
        qrels = read_qrels(folder / "qrels.tsv")
        topics = {q: t for q, t in topics.items() if q in qrels}
        for engine, fn in (("pisa", pisa), ("bm25s", bm25s_run)):
            start = time.perf_counter()
            run = fn(corpus, topics, 100)
            seconds = time.perf_counter() - start
            totals[engine] += seconds
            quality[engine].append(evaluate(run, qrels))
            print(f"{name:10s} {engine:6s} {len(corpus):6d} docs {len(topics):4d} queries: {seconds:6.2f}s "
                  f"nDCG@10 {quality[engine][-1]:.4f}")
    ratio = totals["pisa"] / totals["bm25s"]
    gap = sum(quality["pisa"]) / len(quality["pisa"]) - sum(quality["bm25s"]) / len(quality["bm25s"])
    print(f"PISA time / bm25s time (index + retrieval) = {ratio:.2f}")
    print(f"mean nDCG@10 PISA - bm25s = {gap:+.4f} (target >= +0.0000) {'PASS' if gap >= 0 else 'FAIL'}")


if __name__ == "__main__":
    main()
