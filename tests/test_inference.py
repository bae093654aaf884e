"""Re-ranking: batching, order and ties, sharding (2 gloo processes) equal to one process, resume after an
interruption, the score cache, bad input, and infer.py end to end; all with the tiny random BERT."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossrank import config
from crossrank.inference import pipeline as experiment
from crossrank.inference import rerank as inference
from crossrank.models.loading import load_model
from crossrank.inference.candidates import Candidates, load_candidates
from crossrank.models import mono as models
from crossrank.config import EvalConfig, ModelConfig
from crossrank.errors import CrossrankError
from crossrank.data.runs import sort_ranking

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the cat dog mat sat bark river water fish boat sea ship city bank money loan paris france capital "
         "london tree trees garden house computer program code python search engine query passage").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def collection(tmp_path) -> dict[str, Path]:
    """9 queries x 12 candidates, passages of 3..60 words; d0 and d1 have the same text (a score tie)."""
    rng = random.Random(0)
    docs = {f"d{i}": _text(rng, rng.randint(3, 60)) for i in range(40)}
    docs["d1"] = docs["d0"]
    (tmp_path / "corpus.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in docs.items()))
    (tmp_path / "topics.tsv").write_text("".join(f"{q}\t{_text(rng, rng.randint(2, 8))}\n" for q in range(1, 10)))
    lines = []
    for q in range(1, 10):
        chosen = ["d0", "d1"] + rng.sample(sorted(docs)[2:], 10)
        lines += [f"{q} Q0 {d} {r + 1} {20.0 - r} bm25\n" for r, d in enumerate(chosen)]
    (tmp_path / "run.txt").write_text("".join(lines))
    (tmp_path / "qrels.txt").write_text("".join(f"{q} 0 d{q} {q % 4}\n" for q in range(1, 10)))
    return {name: tmp_path / name for name in ("corpus.tsv", "topics.tsv", "run.txt", "qrels.txt")}


def _candidates(c, **kwargs):
    return load_candidates(str(c["run.txt"]), str(c["topics.tsv"]), str(c["corpus.tsv"]), 100, **kwargs)


def _eval_cfg(**kwargs) -> EvalConfig:
    # fp32 unless a test says otherwise: these tests compare with the model called directly, in fp32
    return dataclasses.replace(EvalConfig(), block_queries=2, batch_tokens=600, **{"precision": "fp32", **kwargs})


def test_plan_batches_respects_the_token_budget():
    lengths = [5, 40, 12, 40, 7, 33, 2, 19]
    batches = inference.plan_batches(lengths, [0] * 8, batch_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(8))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)  # longest first
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b[0]] <= 80
    assert [len(b) for b in batches] == [2, 2, 4]  # 40,40 | 33,19 | 12,7,5,2
    assert inference.plan_batches(lengths, [0, 0, 1, 1, 1, 2, 2, 2], 80, listwise=True) == \
        [[0, 1], [2, 3, 4], [5, 6, 7]]


@pytest.mark.parametrize("kind", ["bert", "electra", "roberta"])
def test_first_token_last_layer_gives_the_full_models_scores(tiny_models, kind):
    from crossrank.models.mono import MonoEncoder

    model, tok = load_model(tiny_models[kind], ModelConfig(), torch.device("cpu"))
    assert isinstance(model.encoder.base_model.encoder.layer[-1], models.FirstTokenLayer)
    full = MonoEncoder.from_pretrained(tiny_models[kind]).eval()
    batch = tok(["the cat sat", "what is a dog", "python"], ["on the mat", "a dog barks loudly in the house", "code"])
    assert batch["attention_mask"].sum(1).tolist() != [batch["attention_mask"].shape[1]] * 3  # padding present
    one_list = {k: v[None] for k, v in batch.items()}  # [1, 3, L]
    with torch.inference_mode():
        assert torch.allclose(model(**one_list), full(**one_list), atol=1e-6)


def test_reranked_order_follows_scores_with_deterministic_ties(tiny_bert, collection, tmp_path):
    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    cands = _candidates(collection)
    run = inference.rerank(model, tok, cands, tmp_path / "out.run", _eval_cfg(), "fp")
    # every score equals the model's score for that pair alone (no batch or padding effects beyond fp noise)
    q = "3"
    alone = {d: model(**tok.pad_list(tok.encode([cands.queries[q]], [cands.texts[d]]))).item() for d, _ in cands.run[q]}
    assert {d: s for d, s in run[q]} == pytest.approx(alone, abs=2e-6)
    lines = [line.split() for line in (tmp_path / "out.run").read_text().splitlines()]
    assert [int(x[0]) for x in lines] == sorted(int(x[0]) for x in lines)
    for qid in {x[0] for x in lines}:
        ranking = [(x[2], float(x[4])) for x in lines if x[0] == qid]
        assert [int(x[3]) for x in lines if x[0] == qid] == list(range(1, 13))
        assert ranking == sorted(ranking, key=lambda p: (p[1], p[0]), reverse=True)  # score desc, docno desc
        scores = dict(ranking)
        assert scores["d0"] == scores["d1"]  # same text, same score: d1 must come first
        assert [d for d, _ in ranking].index("d1") + 1 == [d for d, _ in ranking].index("d0")
    assert not list(tmp_path.glob(".out.run.parts-*"))  # parts are removed after the merge


def _shard(rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model_path, c, out = args
    model, tok = load_model(model_path, ModelConfig(), torch.device("cpu"))
    cands = _candidates(c)
    inference.rerank(model, tok, cands, out, _eval_cfg(), "fp", inference.Distributed(rank, world))
    torch.distributed.destroy_process_group()


def test_two_gloo_shards_give_the_single_process_run(tiny_bert, collection, tmp_path):
    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    inference.rerank(model, tok, _candidates(collection), tmp_path / "single.run", _eval_cfg(), "fp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_shard, args=(2, port, (tiny_bert, collection, tmp_path / "sharded.run")),
                                nprocs=2, join=True)
    assert (tmp_path / "sharded.run").read_bytes() == (tmp_path / "single.run").read_bytes()


class _Interrupting(torch.nn.Module):
    """Wraps a model and raises on its n-th call, like a job killed in the middle of a block."""

    def __init__(self, model, fail_at: int):
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0
        self.listwise = model.listwise

    def forward(self, **batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.model(**batch)


def test_resume_after_interruption_gives_the_same_run(tiny_bert, collection, tmp_path):
    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    cands, cfg = _candidates(collection), _eval_cfg()
    full = _Interrupting(model, fail_at=-1)
    inference.rerank(full, tok, cands, tmp_path / "full.run", cfg, "fp")
    interrupted = _Interrupting(model, fail_at=10)
    with pytest.raises(KeyboardInterrupt):
        inference.rerank(interrupted, tok, cands, tmp_path / "resumed.run", cfg, "fp")
    assert not (tmp_path / "resumed.run").exists()  # never a half-written run
    parts = sorted(p.name for p in next(tmp_path.glob(".resumed.run.parts-*")).iterdir())
    assert 0 < len(parts) < 5  # some of the 5 blocks finished
    resumed = _Interrupting(model, fail_at=-1)
    inference.rerank(resumed, tok, cands, tmp_path / "resumed.run", cfg, "fp")
    assert (tmp_path / "resumed.run").read_bytes() == (tmp_path / "full.run").read_bytes()
    # finished blocks were not scored again; the interrupted block was scored again from its start
    assert interrupted.calls - 1 < full.calls and resumed.calls < full.calls
    assert resumed.calls + interrupted.calls - 1 >= full.calls


@pytest.mark.parametrize("damage", ["cut", "no-trailer", "edited", "foreign"])
def test_resume_scores_a_damaged_part_again(tiny_bert, collection, tmp_path, capsys, damage):
    """A part cut in half (960 of 1000 lines), without its trailer, edited, or holding another block's pairs is
    never trusted: the resume scores that block again, says so in one line, and gives the uninterrupted run."""
    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    cands, cfg = _candidates(collection), _eval_cfg()
    inference.rerank(model, tok, cands, tmp_path / "full.run", cfg, "fp")
    with pytest.raises(KeyboardInterrupt):
        inference.rerank(_Interrupting(model, fail_at=10), tok, cands, tmp_path / "r.run", cfg, "fp")
    part = sorted(next(tmp_path.glob(".r.run.parts-*")).iterdir())[0]
    lines = part.read_text().splitlines(keepends=True)
    assert lines[-1].startswith("#end\t") and len(lines) > 3
    if damage == "cut":
        part.write_text("".join(lines[: len(lines) // 2]))
    elif damage == "no-trailer":
        part.write_text("".join(lines[:-1]))
    elif damage == "edited":  # a score changed after the trailer was written
        q, d, _ = lines[0].rstrip("\n").split("\t")
        part.write_text("".join([f"{q}\t{d}\t99.0\n", *lines[1:]]))
    else:  # a complete part, but of the block after it
        part.write_text(sorted(part.parent.iterdir())[1].read_text())
    capsys.readouterr()
    counting = _Interrupting(model, fail_at=-1)
    inference.rerank(counting, tok, cands, tmp_path / "r.run", cfg, "fp")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(part) in warnings[0] and "scoring it again" in warnings[0]
    assert (tmp_path / "r.run").read_bytes() == (tmp_path / "full.run").read_bytes()


def test_merge_refuses_a_part_damaged_after_the_check(tmp_path):
    with inference.atomic_write(tmp_path / "000000.tsv") as f:
        inference.write_part(f, [("1", "d1", 0.5), ("1", "d2", 0.25)])
    assert inference.merge_parts(tmp_path, 1) == {"1": [("d1", 0.5), ("d2", 0.25)]}
    data = (tmp_path / "000000.tsv").read_text()
    (tmp_path / "000000.tsv").write_text(data.replace("0.25", "0.75"))
    with pytest.raises(CrossrankError, match="000000.tsv: block 0 is incomplete or damaged"):
        inference.merge_parts(tmp_path, 1)


class _Killing(torch.nn.Module):
    def __init__(self, model, kill_at: int):
        super().__init__()
        self.model, self.kill_at, self.calls = model, kill_at, 0
        self.listwise = model.listwise

    def forward(self, **batch):
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no exception, no clean-up: what a scheduler's kill does
        return self.model(**batch)


def _killed_rerank(model_path, c, out) -> None:
    model, tok = load_model(model_path, ModelConfig(), torch.device("cpu"))
    inference.rerank(_Killing(model, kill_at=10), tok, _candidates(c), out, _eval_cfg(), "fp")


def test_resume_after_sigkill_gives_the_same_run(tiny_bert, collection, tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=_killed_rerank,
                                                           args=(tiny_bert, collection, tmp_path / "k.run"))
    process.start()
    process.join()
    assert process.exitcode == -signal.SIGKILL and not (tmp_path / "k.run").exists()
    assert 0 < len(list(next(tmp_path.glob(".k.run.parts-*")).glob("*.tsv"))) < 5  # finished blocks kept
    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    inference.rerank(model, tok, _candidates(collection), tmp_path / "k.run", _eval_cfg(), "fp")
    inference.rerank(model, tok, _candidates(collection), tmp_path / "ref.run", _eval_cfg(), "fp")
    assert (tmp_path / "k.run").read_bytes() == (tmp_path / "ref.run").read_bytes()


def test_score_cache_skips_scored_pairs(tiny_bert, collection, tmp_path):
    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    cands, cfg = _candidates(collection), _eval_cfg(score_cache=str(tmp_path / "cache.sqlite"))
    inference.rerank(model, tok, cands, tmp_path / "a.run", cfg, "fp")
    counting = _Interrupting(model, fail_at=-1)
    inference.rerank(counting, tok, cands, tmp_path / "b.run", cfg, "fp")
    assert counting.calls == 0
    assert (tmp_path / "a.run").read_bytes() == (tmp_path / "b.run").read_bytes()
    inference.rerank(counting, tok, cands, tmp_path / "c.run", cfg, "other-model")  # another fingerprint
    assert counting.calls > 0


def test_bf16_precision_on_cpu_is_close_and_cached_apart(tiny_bert, collection, tmp_path):
    model, tok = load_model(tiny_bert, ModelConfig(), torch.device("cpu"))
    cands = _candidates(collection)
    fp32 = inference.score_candidates(model, tok, cands, _eval_cfg())
    bf16 = inference.score_candidates(model, tok, cands, _eval_cfg(precision="bf16"))
    pairs32 = {(q, d): s for q, r in fp32.items() for d, s in r}
    pairs16 = {(q, d): s for q, r in bf16.items() for d, s in r}
    assert pairs32.keys() == pairs16.keys() and pairs32 != pairs16  # autocast really ran
    assert max(abs(pairs32[k] - pairs16[k]) for k in pairs32) < 0.05
    cache = str(tmp_path / "cache.sqlite")
    inference.rerank(model, tok, cands, tmp_path / "a.run", _eval_cfg(score_cache=cache), "fp")
    counting = _Interrupting(model, fail_at=-1)
    inference.rerank(counting, tok, cands, tmp_path / "b.run", _eval_cfg(score_cache=cache, precision="bf16"), "fp")
    assert counting.calls > 0  # fp32 scores are not reused for bf16


def test_set_encoder_scores_each_query_list_in_one_pass(tiny_bert, collection, tmp_path):
    from crossrank.models.encoding import encode_lists, load_set_tokenizer
    from crossrank.models.set_encoder import SetEncoder

    torch.manual_seed(0)
    SetEncoder.from_pretrained(tiny_bert).save_pretrained(tmp_path / "se", load_set_tokenizer(tiny_bert))
    model_cfg = ModelConfig(kind="set-encoder")
    model, tok = load_model(tmp_path / "se", model_cfg, torch.device("cpu"))
    cands = _candidates(collection)
    run = inference.rerank(model, tok, cands, tmp_path / "se.run", _eval_cfg(), "fp")
    q = "4"
    docnos = [d for d, _ in cands.run[q]]
    direct = model(**encode_lists(tok, model.config.interaction_token_id, [cands.queries[q]],
                                  [[cands.texts[d] for d in docnos]]))[0]  # [D]
    assert dict(run[q]) == pytest.approx({d: round(s, 6) for d, s in zip(docnos, direct.tolist())}, abs=2e-6)
    # the list is a set: another first-stage order gives the same scores
    reversed_run = {qid: sort_ranking([(d, -s) for d, s in r]) for qid, r in cands.run.items()}
    assert [d for d, _ in reversed_run[q]] == docnos[::-1]
    flipped = Candidates(reversed_run, cands.queries, cands.texts)
    again = inference.rerank(model, tok, flipped, tmp_path / "se2.run", _eval_cfg(), "fp")
    assert dict(again[q]) == pytest.approx(dict(run[q]), abs=2e-6)
    with pytest.raises(CrossrankError, match="score_cache cannot be used"):
        inference.rerank(model, tok, cands, tmp_path / "se3.run", _eval_cfg(score_cache=str(tmp_path / "c")), "fp")


def test_bad_input_messages_with_counts_and_lenient(collection):
    c = collection
    text = c["run.txt"].read_text()
    c["run.txt"].write_text(text + "1 Q0 nope1 13 1.0 x\n2 Q0 nope2 13 1.0 x\n2 Q0 nope1 14 0.5 x\n")
    with pytest.raises(CrossrankError, match=r"run.txt: 2 of \d+ docnos \(3 run lines\) are not in the corpus"):
        _candidates(c)
    lenient = _candidates(c, lenient=True)
    assert "nope1" not in dict(lenient.run["1"]) and len(lenient.run["2"]) == 12
    assert "skipped (--lenient)" in lenient.notes[0]

    c["run.txt"].write_text(text + "77 Q0 d3 1 1.0 x\n")
    with pytest.raises(CrossrankError, match=r"1 of 10 queries are not in the topics .* \(e.g. 77\)"):
        _candidates(c)
    assert "77" not in _candidates(c, lenient=True).run

    c["run.txt"].write_text(text + "1 Q0 d0 13 1.0 x\n1 Q0 d1 14 1.0 x\n")
    with pytest.raises(CrossrankError, match=r"run.txt:109: docno d0 appears twice .*; 2 duplicate"):
        _candidates(c)

    c["run.txt"].write_text("")
    with pytest.raises(CrossrankError, match="the run is empty"):
        _candidates(c)


def test_infer_end_to_end_and_error_exit(tiny_bert, collection, tmp_path, monkeypatch, capsys):
    dataset = tmp_path / "toy.yaml"
    dataset.write_text(f"name: toy\ncorpus: {collection['corpus.tsv']}\ntopics: {collection['topics.tsv']}\n"
                       f"qrels: {collection['qrels.txt']}\nruns: {{bm25: {collection['run.txt']}}}\nrel_level: 2\n")
    monkeypatch.setattr(config, "ROOT", tmp_path)
    cfg = config.load_run_config(overrides=[f"eval.dataset={dataset}", "eval.block_queries=2"])
    experiment.run_inference(cfg, str(tiny_bert))
    out = capsys.readouterr().out
    stem = tmp_path / "runs" / f"toy.bm25.{tiny_bert.name}"
    assert Path(f"{stem}.run").is_file() and Path(f"{stem}.perquery.csv").is_file()
    lines = [line.split() for line in Path(f"{stem}.run").read_text().splitlines()]
    assert len(lines) == 9 * 12 and {q for q, *_ in lines} == {str(q) for q in range(1, 10)}
    for q in range(1, 10):  # each query's candidates, ranked 1..12 by falling score
        rows = [row for row in lines if row[0] == str(q)]
        assert [int(r[3]) for r in rows] == list(range(1, 13)) and [float(r[4]) for r in rows] == sorted(
            (float(r[4]) for r in rows), reverse=True)
    assert len(Path(f"{stem}.perquery.csv").read_text().splitlines()) >= 9  # a row per judged query
    assert Path(f"{stem}.ndcg10-diff.png").is_file() and Path(f"{stem}.yaml").is_file()
    assert "bm25 (top 100)" in out and "RR(rel=2)@10" in out and "9 judged queries" in out

    result = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model", str(tiny_bert),
                             "eval.dataset=no-such-dataset"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "no config 'no-such-dataset'" in \
        result.stderr


def test_infer_warns_once_about_unjudgeable_qrels_and_empty_queries(tiny_bert, collection, tmp_path, monkeypatch,
                                                                    capsys):
    """qrels in which no passage reaches the relevance level, and a query of zero-width spaces only (it tokenises
    to nothing): the run is still made, with one warning line each (before the model banner for the qrels)."""
    topics = collection["topics.tsv"].read_text().splitlines()
    topics[0] = topics[0].split("\t")[0] + "\t\u200b\u200b"
    collection["topics.tsv"].write_text("\n".join(topics) + "\n")
    qrels = tmp_path / "qrels0.txt"
    qrels.write_text("".join(f"{q} 0 d{q} 0\n" for q in range(1, 10)))
    dataset = tmp_path / "toy.yaml"
    dataset.write_text(f"name: toy\ncorpus: {collection['corpus.tsv']}\ntopics: {collection['topics.tsv']}\n"
                       f"qrels: {qrels}\nruns: {{bm25: {collection['run.txt']}}}\nrel_level: 2\n")
    monkeypatch.setattr(config, "ROOT", tmp_path)
    experiment.run_inference(config.load_run_config(overrides=[f"eval.dataset={dataset}"]), str(tiny_bert))
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("re-rank")]
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert warnings[0].startswith(f"warning: {qrels}: no judged passage is relevant") and err[0] == warnings[0]
    assert warnings[1].startswith(f"warning: {collection['topics.tsv']}: 1 of 9 queries tokenise to nothing (e.g. 1)")
    assert (tmp_path / "runs" / f"toy.bm25.{tiny_bert.name}.run").is_file()


def test_rerank_a_few_dl19_queries_with_minilm(shared_data, tmp_path):
    """Real data (skips without ../shared/data): 3 DL19 queries x BM25 top-20 from corpus.jsonl, re-ranked by
    the packaged MiniLM (random head: this checks the plumbing on real ids and texts, not effectiveness)."""
    dl19 = shared_data / "trec-dl" / "dl19"
    lines = (dl19 / "runs" / "bm25.top100.run").read_text().splitlines()
    qids = list(dict.fromkeys(line.split()[0] for line in lines))[:3]
    (tmp_path / "run.txt").write_text("".join(f"{line}\n" for line in lines if line.split()[0] in qids))
    cands = load_candidates(str(tmp_path / "run.txt"), str(dl19 / "queries.jsonl"),
                                      str(dl19 / "corpus.jsonl"), depth=20)
    assert cands.num_pairs == 60
    model, tok = load_model("packaged:all-MiniLM-L6-v2", ModelConfig(), torch.device("cpu"))
    run = inference.rerank(model, tok, cands, tmp_path / "out.run", EvalConfig(), "fp")
    assert sorted(run) == sorted(qids) and all(len(r) == 20 for r in run.values())
    assert {d for d, _ in run[qids[0]]} == {d for d, _ in cands.run[qids[0]]}


def test_duplicate_count_reads_gzipped_runs(collection, tmp_path):
    import gzip

    lines = collection["run.txt"].read_text().splitlines(keepends=True)
    zipped = tmp_path / "dup.run.gz"
    zipped.write_bytes(gzip.compress("".join(lines + lines[:3]).encode()))  # 3 lines again
    with pytest.raises(CrossrankError, match=r"dup\.run\.gz:109: docno .* appears twice .*; 3 duplicate \(qid, docno\) "
                                             r"lines in all \(--lenient skips them\)"):
        load_candidates(str(zipped), str(collection["topics.tsv"]), str(collection["corpus.tsv"]), 100)
