"""The crossrank re-ranker as a PyTerrier transformer, so it composes with first stages and `pt.Experiment`:

    import pyterrier as pt
    from crossrank.inference.pyterrier import CrossEncoderReranker
    reranker = CrossEncoderReranker("models/bert.CL.f1.lr1e-05.s42/model")
    pipeline = bm25 % 100 >> pt.text.get_text(dataset, "text") >> reranker
    pt.Experiment([bm25, pipeline], topics, qrels, [nDCG@10, RR(rel=2)@10], baseline=0)

Input columns: qid, query, docno, text. Output: the same rows with `score` (the cross-encoder's) and `rank`
(0-based, in trec_eval's order: score desc, docno desc), sorted by qid then rank. Scoring is exactly
`crossrank.inference.rerank.score_candidates` (same blocks, same batches, scores rounded to 6 decimals as in the
run files), so a pipeline gives the same ranking as `infer.py` on the same candidates.
"""
from __future__ import annotations

import os

import pandas as pd
import pyterrier as pt
import torch

from crossrank.config import EvalConfig, ModelConfig
from crossrank.inference.candidates import Candidates
from crossrank.inference.rerank import score_candidates
from crossrank.models.loading import load_model
from crossrank.errors import CrossrankError
from crossrank.data.runs import sort_ranking

COLUMNS = ("qid", "query", "docno", "text")


class CrossEncoderReranker(pt.Transformer):
    """Re-ranks each query's candidates with a crossrank (or any 1-logit Hugging Face) cross-encoder.

    A crossrank checkpoint brings its settings (crossrank.json: kind, max length, truncation, field lengths), so
    `CrossEncoderReranker(folder)` re-ranks as infer.py does, a Set-Encoder included. Fields of `model` that
    differ from ModelConfig's defaults (or those named in `explicit`) are used instead, each conflict named in
    one line on stderr; `self.model_config` is what applies."""

    def __init__(self, model_path: str | os.PathLike, model: ModelConfig | None = None,
                 eval_cfg: EvalConfig | None = None, device: str | torch.device | None = None,
                 explicit: set[str] | None = None):
        self.eval_config = eval_cfg or EvalConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer = load_model(model_path, model or ModelConfig(), self.device,
                                                explicit=explicit)
        self.model_config = self.tokenizer.model

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in COLUMNS if c not in inp.columns]
        if missing:
            raise CrossrankError(f"CrossEncoderReranker: input lacks column(s) {', '.join(missing)} (expected "
                                 f"{', '.join(COLUMNS)}; add text with pt.text.get_text)")
        if inp.empty:
            return inp.assign(score=pd.Series(dtype=float), rank=pd.Series(dtype=int))
        qids, docnos = inp["qid"].astype(str), inp["docno"].astype(str)
        if (dup := int(pd.DataFrame({"q": qids, "d": docnos}).duplicated().sum())):
            raise CrossrankError(f"CrossEncoderReranker: {dup} duplicate (qid, docno) rows (expected each once)")
        first = inp["score"].astype(float) if "score" in inp.columns else pd.Series(0.0, index=inp.index)
        # Each row is scored with its own texts: a docno with other texts in other rows (another query's
        # get_text, a changed corpus) or a qid with two query texts gets one internal key per distinct text.
        # Without such conflicts the keys are the qids and docnos themselves (the same blocks as infer.py).
        query_keys = _keys(qids, inp["query"].astype(str))
        text_keys = _keys(docnos, inp["text"].astype(str))
        run: dict[str, list[tuple[str, float]]] = {}
        for q, d, s in zip(query_keys, text_keys, first):
            run.setdefault(q, []).append((d, s))
        candidates = Candidates(run={q: sort_ranking(r) for q, r in run.items()},
                                queries=dict(zip(query_keys, inp["query"].astype(str))),
                                texts=dict(zip(text_keys, inp["text"].astype(str))))
        internal = score_candidates(self.model, self.tokenizer, candidates, self.eval_config)
        real = dict(zip(zip(query_keys, text_keys), zip(qids, docnos)))
        merged: dict[str, list[tuple[str, float]]] = {}
        for key_q, ranking in internal.items():
            for key_d, score in ranking:
                q, d = real[key_q, key_d]
                merged.setdefault(q, []).append((d, score))
        scores = {q: sort_ranking(r) for q, r in merged.items()}
        rows = [(q, d, s, r) for q, ranking in scores.items() for r, (d, s) in enumerate(ranking)]
        ranked = pd.DataFrame(rows, columns=["qid", "docno", "score", "rank"])
        rest = inp.drop(columns=[c for c in ("score", "rank") if c in inp.columns]).assign(qid=qids, docno=docnos)
        out = rest.merge(ranked, on=["qid", "docno"], how="inner", validate="one_to_one")
        return out.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)


def _keys(ids: pd.Series, texts: pd.Series) -> list[str]:
    """The id of each row, or `id<NUL>n` for the n-th other text one id has (n >= 1): a key per distinct text."""
    seen: dict[str, dict[str, int]] = {}
    keys = []
    for i, text in zip(ids, texts):
        versions = seen.setdefault(i, {})
        n = versions.setdefault(text, len(versions))
        keys.append(i if n == 0 else f"{i}\x00{n}")
    return keys
