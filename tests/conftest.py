"""Shared fixtures: tiny random BERT / ELECTRA / RoBERTa checkpoints with real tokenizers, built offline in
seconds once per test session, and the hand-written files in tests/data/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
# ../shared/data beside the project (found by walking up, so git worktrees nested deeper find it too)
SHARED_DATA = next((p / "shared" / "data" for p in Path(__file__).resolve().parents if (p / "shared" / "data").is_dir()),
                   Path(__file__).resolve().parents[2] / "shared" / "data")

# Words the tiny tokenizers know: enough for the hand-written test texts and the demo collection.
WORDS = """the a of and to in is for on with what how why who are was be by as at from that this it an or
cat cats dog dogs mat sat bark barks loudly quiet house garden tree trees river water fish boat sea ship
city cities river bank money loan interest rate paris france capital london england berlin germany
tall short fast slow red blue green big small old new good bad first last one two three
computer program code python java language model neural network learning data search engine query
passage document relevant answer question ranking retrieval score test train""".split()


def _wordpiece_vocab() -> dict[str, int]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces = [f"##{c}" for c in letters] + list(".,?!'-:;()")
    return {token: i for i, token in enumerate(dict.fromkeys(specials + WORDS + letters + pieces))}


def _build_bert_like(folder: Path, kind: str) -> Path:
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast,
                              ElectraConfig, ElectraForSequenceClassification)

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=_wordpiece_vocab(), do_lower_case=True)
    sizes = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=512, num_labels=1)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**sizes))
    else:
        model = ElectraForSequenceClassification(ElectraConfig(embedding_size=32, **sizes))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _build_roberta(folder: Path) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=520, num_labels=1,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{'bert': folder, 'electra': folder, 'roberta': folder}: random 2-layer, 32-hidden checkpoints."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {"bert": _build_bert_like(root / "bert", "bert"),
            "electra": _build_bert_like(root / "electra", "electra"),
            "roberta": _build_roberta(root / "roberta")}


@pytest.fixture(scope="module")
def one_thread():
    """Two cores shared by several jobs: one intra-op thread is several times faster for the tiny models (an
    OpenMP pool oversubscribed by another busy process spins instead of working)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tiny_models) -> Path:
    return tiny_models["bert"]


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real test collections); tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real collections are optional)")
    return SHARED_DATA


# ---------------------------------------------------------------------------------------------------------
# A tiny training collection in the preprocessed layout (data/<dataset>/<CL|KD>/), for training tests.

TINY_TOPICS = ["cat mat", "dog bark", "river fish", "bank money", "paris france", "london england",
               "computer program", "python code", "neural network", "search engine", "tree garden", "ship sea"]


def write_tiny_collection(root: Path, valid_is_train: bool = False) -> dict[str, Path]:
    """12 queries, 2 relevant passages each (grades 2 and 1, sharing the query's words), every other query's
    passages as candidates; writes corpus.tsv, topics.tsv and the CL and KD folders (train = first 10 queries,
    valid = the last 2, or the training queries themselves with `valid_is_train`). Returns the paths."""
    import random as _random

    from crossrank.training.examples import TrainingQuery, write_meta, write_split

    root.mkdir(parents=True, exist_ok=True)
    rng = _random.Random(0)
    filler = ["the", "a", "of", "and", "is", "for", "with", "on"]
    topics = {f"q{i}": text for i, text in enumerate(TINY_TOPICS)}
    corpus: dict[str, str] = {}
    for i, text in enumerate(TINY_TOPICS):
        for j in range(2):
            corpus[f"d{i}_{j}"] = " ".join(text.split() + rng.sample(filler, 3) + text.split()[j:])
    (root / "corpus.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in corpus.items()))
    (root / "topics.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in topics.items()))
    folders = {}
    for objective in ("CL", "KD"):
        queries = []
        for i in range(len(TINY_TOPICS)):
            relevant = [f"d{i}_0", f"d{i}_1"]
            others = sorted(d for d in corpus if d not in relevant)
            rng.shuffle(others)
            if objective == "CL":  # a first-stage run: relevant somewhere in the top 12
                docnos = others[:12]
                docnos.insert(rng.randrange(6), relevant[0])
                docnos.insert(rng.randrange(12), relevant[1])
            else:  # the teacher's top-8, relevant first
                docnos = relevant + others[:6]
            scores = [float(len(docnos) - r) for r in range(len(docnos))]
            judged = {relevant[0]: 2, relevant[1]: 1, others[0]: 0}
            queries.append(TrainingQuery(f"q{i}", docnos, scores, judged))
        folder = root / objective
        folder.mkdir(exist_ok=True)
        write_split(folder, "train", queries[:10])
        write_split(folder, "valid", queries[:10] if valid_is_train else queries[10:])
        write_meta(folder, {"dataset": "tiny", "objective": objective, "topics": str(root / "topics.tsv"),
                            "corpus": str(root / "corpus.tsv"), "qrels": "", "evalperc": 20, "seed": 42})
        folders[objective] = folder
    return folders


def interrupt_and_resume(train, cfg, metrics: Path, step: int):
    """`train(cfg)` with SIGTERM sent to this process once `metrics` has logged `step`, then `train(cfg)` again
    (the resume, as rerunning the same command does). Returns (interrupted state, resumed state)."""
    import os
    import signal
    import threading
    import time

    def kill() -> None:
        while not (metrics.is_file() and f'"step": {step},' in metrics.read_text()):
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill, daemon=True).start()
    interrupted = train(cfg)
    return interrupted, train(cfg)


# ---------------------------------------------------------------------------------------------------------
# Reference losses the tests hold training to (not used by the library itself)


def na_rank_net(scores, targets, mask, clusters, ties="first"):
    """Novelty-Aware RankNet (Schlatt et al., ECIR 2025, arXiv:2404.06912): RankNet on `novelty_targets`, i.e.
    per cluster only the highest-scored member keeps the cluster's best teacher target, the others get 0.
    scores, targets (e.g. 101 - teacher rank), mask and clusters (from `cluster_passages`): all [Q, D].
    Training composes `novelty_targets` with whichever `train.loss` is set (`training.parts.ranking_loss`); with
    `rank_net` that must be this."""
    from crossrank.novelty import novelty_targets
    from crossrank.training.losses import rank_net

    return rank_net(scores, novelty_targets(scores, targets, clusters, mask, ties), mask.bool())
