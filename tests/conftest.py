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


@pytest.fixture(scope="session")
def tiny_bert(tiny_models) -> Path:
    return tiny_models["bert"]


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real test collections); tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real collections are optional)")
    return SHARED_DATA
