"""eval.precision: the choice on faked CPU flag sets, the one-line note for a precision the CPU cannot run
natively, int8 re-ranking close to fp32, and the resolved precision (never auto) plus the passage text in the
score cache key and the resume (parts) key."""
from __future__ import annotations

import dataclasses
import sqlite3

import pytest
import torch
from scipy.stats import kendalltau

from crossrank.inference import rerank as inference
from crossrank.models.loading import load_model
from crossrank.models import precision
from crossrank.config import ModelConfig
from crossrank.errors import CrossrankError
from test_inference import _candidates, _eval_cfg, _Interrupting, collection  # noqa: F401  (the toy collection)

SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
ZEN4 = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}  # like this machine's Zen 5
EPYC_AVX2 = {"sse4_2", "avx", "avx2", "fma"}  # issue 16's CPU: no AVX-512, no native bf16
OLD = {"sse4_2", "avx"}


@pytest.mark.parametrize("flags, expected", [(SAPPHIRE_RAPIDS, "bf16"), (ZEN4, "bf16"), (EPYC_AVX2, "fp32"),
                                             ({"amx_bf16"}, "bf16"), (OLD, "fp32"), (set(), "fp32")])
def test_auto_picks_by_cpu_flags(flags, expected):
    assert precision.resolve_precision("auto", "cpu", flags) == expected


def test_explicit_and_cuda_choices():
    for p in ("fp32", "bf16", "fp16", "int8"):
        assert precision.resolve_precision(p, "cpu", OLD) == p  # an explicit choice is kept
    assert precision.resolve_precision("auto", "cuda", set()) == "bf16"
    assert precision.resolve_precision("fp32", "cuda", set()) == "fp32"
    assert precision.resolve_precision("auto", "cpu", ZEN4, listwise=True) == "fp32"
    assert precision.resolve_precision("int8", "cpu", ZEN4, listwise=True) == "int8"
    with pytest.raises(CrossrankError, match=r"eval.precision=int8 runs on the CPU only .*got int8"):
        precision.resolve_precision("int8", "cuda", SAPPHIRE_RAPIDS)
    with pytest.raises(CrossrankError, match=r"expected auto, fp32, bf16, fp16, int8, got 'int4'"):
        precision.resolve_precision("int4", "cpu", ZEN4)


def test_a_precision_without_native_support_is_reported_in_one_line():
    note = precision.slow_precision_note("bf16", "cpu", EPYC_AVX2, "AMD EPYC 7B13")
    assert note is not None and "\n" not in note
    assert note.startswith("warning: eval.precision=bf16 on this CPU (AMD EPYC 7B13) has no native support")
    assert "amx_bf16, avx512_bf16" in note
    assert precision.slow_precision_note("bf16", "cpu", ZEN4) is None
    assert precision.slow_precision_note("int8", "cpu", EPYC_AVX2) is None
    assert "int8" in precision.slow_precision_note("int8", "cpu", OLD)
    assert precision.slow_precision_note("fp32", "cpu", OLD) is None
    assert precision.slow_precision_note("bf16", "cuda", set()) is None


def test_real_cpu_flags_are_read():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    assert precision.resolve_precision("auto", "cpu", flags) in ("fp32", "bf16", "int8")
    assert precision.cpu_model()


def _scores(run):
    return {(q, d): s for q, r in run.items() for d, s in r}


@pytest.fixture
def spread_bert(tiny_bert, tmp_path):
    """The tiny BERT re-initialised with weights of std 0.2: at the default 0.02 all its scores lie within 1e-4
    (every [CLS] state alike), below int8's rounding, so rank agreement would mean nothing."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert, initializer_range=0.2))
    model.save_pretrained(tmp_path / "spread")
    BertTokenizerFast.from_pretrained(tiny_bert).save_pretrained(tmp_path / "spread")
    return tmp_path / "spread"


def test_int8_scores_are_close_to_fp32_and_rank_alike(spread_bert, collection):
    model, tok = load_model(spread_bert, ModelConfig(), torch.device("cpu"))
    cands = _candidates(collection)
    fp32 = _scores(inference.score_candidates(model, tok, cands, _eval_cfg(precision="fp32")))
    int8 = _scores(inference.score_candidates(model, tok, cands, _eval_cfg(precision="int8")))
    assert fp32.keys() == int8.keys() and fp32 != int8  # quantisation really ran
    assert isinstance(model.encoder.classifier, torch.nn.Linear)  # on a copy: the model itself is untouched
    spread = max(fp32.values()) - min(fp32.values())
    assert spread > 0.5
    assert max(abs(fp32[k] - int8[k]) for k in fp32) < 0.2 * spread
    taus = [kendalltau([fp32[(q, d)] for d, _ in r], [int8[(q, d)] for d, _ in r]).statistic
            for q, r in cands.run.items()]
    assert sum(taus) / len(taus) > 0.85
    with torch.no_grad():  # new weights (as after an optimiser step): the int8 copy is rebuilt, never stale
        model.encoder.classifier.weight.mul_(-1)
    again = _scores(inference.score_candidates(model, tok, cands, _eval_cfg(precision="int8")))
    assert all(again[k] == pytest.approx(-int8[k], abs=0.2 * spread) for k in int8)


class _Counting(torch.nn.Module):
    """Counts the pairs the model scores."""

    def __init__(self, model):
        super().__init__()
        self.model, self.pairs, self.listwise = model, 0, model.listwise

    def forward(self, **batch):
        self.pairs += batch["input_ids"].shape[:-1].numel()  # [Q, D, L]: Q x D pairs
        return self.model(**batch)


def test_cache_key_has_resolved_precision_and_passage_text(tiny_bert, collection, tmp_path, monkeypatch):
    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    cands, cache = _candidates(collection), str(tmp_path / "cache.sqlite")
    inference.rerank(model, tok, cands, tmp_path / "a.run", _eval_cfg(score_cache=cache, precision="fp32"), "fp")
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset(OLD))  # a CPU where auto means fp32
    counting = _Counting(model)
    inference.rerank(counting, tok, cands, tmp_path / "b.run", _eval_cfg(score_cache=cache, precision="auto"),
                     "fp")
    assert counting.pairs == 0  # auto resolved to fp32: fp32's scores are served
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset(ZEN4))  # now auto means bf16
    inference.rerank(model, tok, cands, tmp_path / "c.run", _eval_cfg(score_cache=cache, precision="auto"), "fp")
    inference.rerank(model, tok, cands, tmp_path / "e.run", _eval_cfg(score_cache=cache, precision="int8"), "fp")
    keys = {row[0] for row in sqlite3.connect(cache).execute("SELECT DISTINCT model FROM pair_scores")}
    assert keys == {"fp/fp32", "fp/bf16", "fp/int8"}  # never "auto"
    # edit one passage: exactly its pairs are scored again, every other pair comes from the cache
    edited = dataclasses.replace(cands, texts={**cands.texts, "d0": cands.texts["d0"] + " river"})
    counting = _Counting(model)
    run = inference.rerank(counting, tok, edited, tmp_path / "d.run", _eval_cfg(score_cache=cache,
                                                                                 precision="fp32"), "fp")
    assert counting.pairs == sum(d == "d0" for r in cands.run.values() for d, _ in r) == 9
    fresh = inference.score_candidates(model, tok, edited, _eval_cfg(precision="fp32"))
    assert _scores(run) == _scores(fresh)


def test_resume_key_has_the_resolved_precision(tiny_bert, collection, tmp_path, monkeypatch):
    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    cands, out = _candidates(collection), tmp_path / "r.run"
    fp32, bf16 = _eval_cfg(precision="fp32"), _eval_cfg(precision="bf16")
    assert inference.parts_folder(out, "fp", cands, fp32) != inference.parts_folder(out, "fp", cands, bf16)
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset(ZEN4))  # auto = bf16 here
    with pytest.raises(KeyboardInterrupt):
        inference.rerank(_Interrupting(model, fail_at=3), tok, cands, out, _eval_cfg(precision="auto"), "fp")
    assert [p.name for p in tmp_path.glob(".r.run.parts-*")] == [inference.parts_folder(out, "fp", cands, bf16).name]
    edited = dataclasses.replace(cands, texts={**cands.texts, "d0": "another text"})
    assert inference.parts_folder(out, "fp", edited, bf16) != inference.parts_folder(out, "fp", cands, bf16)
