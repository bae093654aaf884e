"""The PyTerrier transformer: `first_stage >> reranker` gives the run infer.py writes, and pt.Experiment on the
pipeline gives the numbers crossrank.evaluation.metrics computes on that run."""
from __future__ import annotations

import pandas as pd
import pytest
import pyterrier as pt
import torch
from pyterrier.measures import RR, nDCG

from crossrank.evaluation import metrics as evaluation
from crossrank.inference import rerank as inference
from crossrank.models.loading import load_model
from crossrank.inference.candidates import load_candidates
from crossrank.config import EvalConfig, ModelConfig
from crossrank.errors import CrossrankError
from crossrank.data.runs import load_run
from crossrank.data.texts import read_corpus, read_topics
from crossrank.data.qrels import read_qrels
from crossrank.inference.pyterrier import CrossEncoderReranker
from test_inference import collection  # noqa: F401  (the same toy collection)


@pytest.fixture
def frames(collection):  # noqa: F811
    topics = read_topics(collection["topics.tsv"])
    texts = dict(read_corpus(collection["corpus.tsv"]))
    run = load_run(collection["run.txt"])
    first = pd.DataFrame([(q, topics[q], d, texts[d], s) for q, r in run.items() for d, s in r],
                         columns=["qid", "query", "docno", "text", "score"])
    topic_frame = pd.DataFrame({"qid": list(topics), "query": list(topics.values())})
    return first, topic_frame


def test_pipeline_equals_inference_run(tiny_bert, collection, frames, tmp_path):  # noqa: F811
    first, topic_frame = frames
    cfg = EvalConfig(block_queries=2, batch_tokens=600, precision="fp32")  # no bf16 ties of the tiny model
    reranker = CrossEncoderReranker(tiny_bert, ModelConfig(), cfg, device="cpu")
    pipeline = pt.Transformer.from_df(first) >> reranker
    result = pipeline.transform(topic_frame)
    assert {"qid", "query", "docno", "text", "score", "rank"} <= set(result.columns)

    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    cands = load_candidates(str(collection["run.txt"]), str(collection["topics.tsv"]),
                                      str(collection["corpus.tsv"]), 100)
    inference.rerank(model, tok, cands, tmp_path / "infer.run", cfg, "fp")
    lines = [line.split() for line in (tmp_path / "infer.run").read_text().splitlines()]
    expected = [(q, d, int(r) - 1, float(s)) for q, _, d, r, s, _ in lines]
    got = [(q, d, r, round(s, 6)) for q, d, r, s in result[["qid", "docno", "rank", "score"]].itertuples(index=False)]
    key = lambda row: (int(row[0]), row[2])  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)

    qrels = read_qrels(collection["qrels.txt"])
    qrels_frame = pd.DataFrame([(q, d, r) for q, j in qrels.items() for d, r in j.items()],
                               columns=["qid", "docno", "label"])
    table = pt.Experiment([pipeline], topic_frame, qrels_frame, [nDCG @ 10, RR(rel=2) @ 10], names=["ce"])
    ours = evaluation.evaluate(load_run(tmp_path / "infer.run"), qrels,
                               evaluation.parse_metrics(["nDCG@10", "RR@10"], 2))
    assert table.loc[0, "nDCG@10"] == pytest.approx(ours.means["nDCG@10"])
    assert table.loc[0, "RR(rel=2)@10"] == pytest.approx(ours.means["RR(rel=2)@10"])


def test_missing_text_column_is_a_clear_error(tiny_bert, frames):
    first, topic_frame = frames
    reranker = CrossEncoderReranker(tiny_bert, device="cpu")
    with pytest.raises(CrossrankError, match="lacks column\\(s\\) text"):
        reranker.transform(first.drop(columns=["text"]))


def test_each_row_is_scored_with_its_own_texts(tiny_bert):
    """A docno with another text in another query's rows, and a qid with two query texts: every row gets the
    score of its own (query, passage) pair, as if scored alone."""
    rows = [("1", "the cat sat", "d1", "the cat sat on the mat"), ("1", "the cat sat", "d2", "a dog barks loudly"),
            ("2", "river water", "d1", "the river water is blue"), ("2", "river water", "d3", "fish in the sea"),
            ("3", "paris france", "d4", "paris is the capital of france"),
            ("3", "london england", "d5", "london is the capital of england")]
    frame = pd.DataFrame(rows, columns=["qid", "query", "docno", "text"])
    reranker = CrossEncoderReranker(tiny_bert, ModelConfig(), EvalConfig(precision="fp32"), device="cpu")
    with torch.no_grad():  # the random head gives near-equal scores: spread them so that texts tell apart
        reranker.model.encoder.classifier.weight.mul_(1000)
    result = reranker.transform(frame)
    alone = {}
    for q, query, d, text in rows:
        one = reranker.transform(pd.DataFrame([(q, query, d, text)], columns=["qid", "query", "docno", "text"]))
        alone[q, d] = one.loc[0, "score"]
    got = {(q, d): s for q, d, s in result[["qid", "docno", "score"]].itertuples(index=False)}
    assert got == pytest.approx(alone, abs=1e-4)
    # the bug this guards against: d1 of query 2 scored with query 1's text of d1 (the first one seen)
    wrong = reranker.transform(pd.DataFrame([("2", "river water", "d1", "the cat sat on the mat")],
                                            columns=["qid", "query", "docno", "text"])).loc[0, "score"]
    assert abs(wrong - got["2", "d1"]) > 1e-3
    assert list(result["qid"]) == ["1", "1", "2", "2", "3", "3"] and list(result["rank"]) == [0, 1] * 3
    for q in ("1", "2", "3"):  # ranked by score within each qid
        scores = list(result[result["qid"] == q]["score"])
        assert scores == sorted(scores, reverse=True)
