"""Set-Encoder: permutation invariance, isolation of queries, the inter-passage mask against a naive loop,
backbones, duplicate head, pseudo-states, gradient checkpointing, save/load."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModel

from crossrank.config import ModelConfig
from crossrank.models.encoding import INTERACTION_TOKEN, PairTokenizer, encode_lists, load_set_tokenizer
from crossrank.errors import CrossrankError
from crossrank.novelty import duplicate_bce, duplicate_targets
from crossrank.models.set_encoder import SetEncoder, replace_self_attention

QUERIES = ["what is a cat", "river bank money"]
PASSAGES = [["the cat sat on the mat", "dogs bark loudly", "a small red fish in the river", "cats and dogs"],
            ["the bank of the river", "money loan interest rate"]]


def load(folder, **overrides):
    torch.manual_seed(0)
    tokenizer = load_set_tokenizer(folder)
    model = SetEncoder.from_pretrained(folder, **overrides).eval()
    with torch.no_grad():  # random weights at the usual std 0.02 make passages barely interact (~1e-7)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.2)
    pairs = PairTokenizer(tokenizer, ModelConfig(truncation="per_field", query_length=32, passage_length=256))
    interaction_id = tokenizer.convert_tokens_to_ids(INTERACTION_TOKEN)
    return model, tokenizer, lambda queries, passages: encode_lists(pairs, interaction_id, queries, passages)


@pytest.fixture(scope="module")
def bert(tiny_models):
    return load(tiny_models["bert"])


def naive_scores(model: SetEncoder, batch: dict) -> torch.Tensor:
    """The Set-Encoder written as loops: each passage on its own, unpadded; in every layer its keys/values are
    its tokens plus the [INT] states of the other passages of its query, each projected for every passage."""
    backbone = model.backbone
    Q, D, _ = batch["input_ids"].shape
    scores = torch.zeros(Q, D)
    for q in range(Q):
        real = [d for d in range(D) if batch["mask"][q, d]]
        states = {}
        for d in real:
            n = int(batch["attention_mask"][q, d].sum())
            extra = {"token_type_ids": batch["token_type_ids"][q, d, :n][None]} if "token_type_ids" in batch else {}
            h = backbone.embeddings(input_ids=batch["input_ids"][q, d, :n][None], **extra)
            if hasattr(backbone, "embeddings_project"):
                h = backbone.embeddings_project(h)
            states[d] = h[0]  # [l, H]
        for layer in backbone.encoder.layer:
            attention = layer.attention.self
            heads, size = attention.num_heads, attention.head_size
            new = {}
            for d in real:
                own = states[d]
                keys_in = torch.cat([own] + [states[e][1:2] for e in real if e != d])  # [l + others, H]
                query = attention.query(own).view(-1, heads, size).transpose(0, 1)
                key = attention.key(keys_in).view(-1, heads, size).transpose(0, 1)
                value = attention.value(keys_in).view(-1, heads, size).transpose(0, 1)
                weights = torch.softmax(query @ key.transpose(1, 2) * size ** -0.5, dim=-1)
                context = (weights @ value).transpose(0, 1).reshape(own.shape)
                a = layer.attention.output(context, own)
                new[d] = layer.output(layer.intermediate(a), a)
            states = new
        for d in real:
            scores[q, d] = model.score(states[d][0])
    return scores


@pytest.mark.parametrize("kind", ["bert", "electra", "roberta"])
def test_matches_naive_reference(tiny_models, kind):
    model, _, encode = load(tiny_models[kind])
    batch = encode(QUERIES, PASSAGES)
    with torch.no_grad():
        fast, slow = model(**batch), naive_scores(model, batch)
        alone = torch.stack([model(**encode([QUERIES[0]], [[p]]))[0, 0] for p in PASSAGES[0]])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    assert (fast[1, 2:] == 0).all()  # padding scores 0
    # The other passages matter: a passage scored alone gets another score.
    assert (fast[0] - alone).abs().max() > 1e-4


def test_shuffling_permutes_scores_and_changes_nothing_else(bert):
    model, _, encode = bert
    order = [2, 0, 3, 1]
    shuffled = [[PASSAGES[0][i] for i in order], PASSAGES[1]]
    with torch.no_grad():
        scores, dups = model.scores_and_duplicates(**encode(QUERIES, PASSAGES))
        scores2, dups2 = model.scores_and_duplicates(**encode(QUERIES, shuffled))
    torch.testing.assert_close(scores2[0], scores[0, order], atol=1e-5, rtol=0)
    torch.testing.assert_close(dups2[0], dups[0, order], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores2[1], scores[1], atol=1e-5, rtol=0)
    assert len(set(scores[0].tolist())) == 4  # distinct scores, so a wrong permutation would show


def test_queries_do_not_interact(bert):
    model, _, encode = bert
    changed = [["the cat sat on the mat", "python java code", "a small red fish in the river", "cats and dogs"],
               PASSAGES[1]]
    with torch.no_grad():
        scores, scores2 = model(**encode(QUERIES, PASSAGES)), model(**encode(QUERIES, changed))
        # Query B alone in its own batch: same scores as next to query A.
        alone = model(**encode(QUERIES[1:], PASSAGES[1:]))
    assert torch.equal(scores2[1], scores[1])
    torch.testing.assert_close(alone[0], scores[1, :2], atol=1e-6, rtol=0)
    # ... while the unchanged passages of query A do see the change.
    assert (scores2[0, [0, 2, 3]] - scores[0, [0, 2, 3]]).abs().min() > 1e-6


@pytest.mark.parametrize("kind", ["bert", "electra", "roberta"])
def test_backbones_forward_backward(tiny_models, kind):
    model, tokenizer, encode = load(tiny_models[kind])
    model.train()
    batch = encode(QUERIES, PASSAGES)
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][0, 0, :2].tolist())[1] == INTERACTION_TOKEN
    scores, dups = model.scores_and_duplicates(**batch)
    assert scores.shape == dups.shape == (2, 4)
    (scores.sum() + dups.sum()).backward()
    for layer in model.backbone.encoder.layer:
        assert layer.attention.self.key.weight.grad.abs().sum() > 0
    assert model.score.weight.grad.abs().sum() > 0 and model.duplicate.weight.grad.abs().sum() > 0
    assert model.score.bias is None


def test_unsupported_backbone_and_truncation_are_refused(tiny_bert):
    from transformers import DistilBertConfig, DistilBertModel
    with pytest.raises(CrossrankError, match="not supported"):
        replace_self_attention(DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)))
    tokenizer = load_set_tokenizer(tiny_bert)
    with pytest.raises(CrossrankError, match="per_field"):
        encode_lists(PairTokenizer(tokenizer, ModelConfig(truncation="pair")), 0, ["q"], [["p"]])


def test_per_field_truncation_and_layout(bert):
    model, tokenizer, _ = bert
    pairs = PairTokenizer(tokenizer, ModelConfig(truncation="per_field", query_length=2, passage_length=3))
    batch = encode_lists(pairs, tokenizer.convert_tokens_to_ids(INTERACTION_TOKEN),
                         ["what is a cat"], [["the cat sat on the mat", "dogs"]])
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0, 0].tolist())
    assert tokens == ["[CLS]", "[INT]", "what", "is", "[SEP]", "the", "cat", "sat", "[SEP]"]
    assert batch["token_type_ids"][0, 0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["attention_mask"][0, 1].tolist() == [1] * 7 + [0] * 2
    assert batch["mask"].tolist() == [[True, True]]


def test_duplicate_head_learns_toy_set(tiny_bert):
    """The same passage is a duplicate in one list and not in another: only a model that looks at the other
    passages of the list can fit these targets."""
    model, _, encode = load(tiny_bert)
    rng = random.Random(0)
    words = "cat dog mat house garden tree river water fish boat sea ship city bank money loan".split()
    pool = [" ".join(rng.sample(words, 5)) for _ in range(6)]
    lists = []
    for passage in pool:
        others = [p for p in pool if p != passage]
        lists += [[passage, passage] + rng.sample(others, 2), [passage] + rng.sample(others, 3)]
    batch, targets = encode(["what is it"] * len(lists), lists), duplicate_targets(lists)
    score_head = model.score.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # 3e-3 sat on the edge of stability: it fit or not by thread count
    for _ in range(200):  # eval mode: no dropout, so the toy fit is quick and deterministic
        _, logits = model.scores_and_duplicates(**batch)
        loss = duplicate_bce(logits, targets, batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, logits = model.scores_and_duplicates(**batch)
    # The best a pointwise model can do: predict each text's duplicate rate over all its occurrences.
    labels: dict[str, list[float]] = {}
    for q, passages in enumerate(lists):
        for d, passage in enumerate(passages):
            labels.setdefault(passage, []).append(float(targets[q, d]))
    rates = torch.tensor([[sum(labels[p]) / len(labels[p]) for p in passages] for passages in lists])
    pointwise = torch.nn.functional.binary_cross_entropy(rates, targets)
    loss = duplicate_bce(logits, targets, batch["mask"])
    assert loss < 0.75 * pointwise, (loss, pointwise)
    accuracy = ((logits > 0).float() == targets).float().mean()
    assert accuracy > ((rates > 0.5).float() == targets).float().mean(), accuracy
    assert torch.equal(model.score.weight, score_head)  # the score head is a separate head


def test_pseudo_states_only_in_training(tiny_bert):
    model, _, encode = load(tiny_bert, sample_missing_docs=True, depth=10)
    plain, _, _ = load(tiny_bert)
    batch = encode(QUERIES, PASSAGES)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), plain(**batch), atol=0, rtol=0)  # eval: ignored
        model.train()
        model.backbone.config.hidden_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        plain.train()
        for module in plain.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        torch.manual_seed(1)
        first = model(**batch)
        torch.manual_seed(2)
        second = model(**batch)
    assert (first - plain(**batch)).abs().max() > 1e-5  # the 6 / 8 pseudo-states are attended
    assert (first - second).abs().max() > 1e-6  # and drawn anew


def test_short_lists_at_inference_are_deterministic_and_sample_only_on_request(tiny_bert):
    """Default: in eval mode a list shorter than depth attends to its own passages only (scores as without
    pseudo-states). sample_at_inference (the reference's behaviour): the set is filled to depth with
    pseudo-states, drawn from a fixed-seed generator, so the scores differ but repeat exactly."""
    plain, _, _ = load(tiny_bert)
    default, _, encode = load(tiny_bert, sample_missing_docs=True, depth=10)
    sampled, _, _ = load(tiny_bert, sample_missing_docs=True, sample_at_inference=True, depth=10)
    batch = encode(QUERIES, PASSAGES)
    with torch.no_grad():
        torch.testing.assert_close(default(**batch), plain(**batch), atol=0, rtol=0)
        assert default.layout(batch["attention_mask"], batch["mask"]).num_slots == 4  # the list's own width
        assert sampled.layout(batch["attention_mask"], batch["mask"]).num_slots == 10  # depth
        torch.manual_seed(1)
        first = sampled(**batch)
        torch.manual_seed(2)
        second = sampled(**batch)
    assert torch.equal(first, second)  # reproducible whatever the global RNG
    assert (first - plain(**batch)).abs().max() > 1e-5  # the pseudo-states are attended


def test_gradient_checkpointing_gives_same_gradients(tiny_bert):
    grads = []
    for checkpointing in (False, True):
        model, _, encode = load(tiny_bert, sample_missing_docs=True, depth=8)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(3)
        model(**encode(QUERIES, PASSAGES)).sum().backward()
        grads.append(model.backbone.encoder.layer[0].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_save_load_round_trip(bert, tmp_path):
    model, tokenizer, encode = bert
    with torch.no_grad():
        model.score.weight.normal_()
        model.duplicate.bias.fill_(0.25)
    model.config.depth = 7
    model.save_pretrained(tmp_path, tokenizer)
    assert {"model.safetensors", "heads.safetensors", "set_encoder.json", "config.json"} <= \
        {p.name for p in tmp_path.iterdir()}
    loaded = SetEncoder.from_pretrained(tmp_path).eval()
    tokenizer2 = load_set_tokenizer(tmp_path)
    assert tokenizer2.convert_tokens_to_ids(INTERACTION_TOKEN) == tokenizer.convert_tokens_to_ids(INTERACTION_TOKEN)
    assert loaded.config == model.config
    batch = encode(QUERIES, PASSAGES)
    with torch.no_grad():
        for a, b in zip(model.scores_and_duplicates(**batch), loaded.scores_and_duplicates(**batch)):
            assert torch.equal(a, b)
    # The backbone part is a plain encoder folder, [INT] embedding included.
    plain = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(plain.embeddings.word_embeddings.weight, model.backbone.embeddings.word_embeddings.weight)


def test_bf16_autocast_with_pseudo_states(tiny_bert):
    """The CUDA recipe runs under bf16 autocast; the same code path on CPU must keep dtypes consistent."""
    model, _, encode = load(tiny_bert, sample_missing_docs=True, depth=6)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, dups = model.scores_and_duplicates(**encode(QUERIES, PASSAGES))
    (scores.float().sum() + dups.float().sum()).backward()
    assert torch.isfinite(scores.float()).all() and model.score.weight.grad.abs().sum() > 0
