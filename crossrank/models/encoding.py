"""Tokenisation: (query, passage) pairs into model inputs, per-pair or per-field truncation, padding into
batches, and the Set-Encoder's lists with the `[INT]` token. Imported by `data` (training batches),
`set_encoder` (the model) and `inference` (re-ranking), so none of them needs another."""
from __future__ import annotations

import copy
import os

import torch
from tokenizers import Encoding
from transformers import AddedToken, PreTrainedTokenizerBase

from crossrank.config import ModelConfig
from crossrank.errors import CrossrankError
from crossrank.models.mono import load_tokenizer

INTERACTION_TOKEN = "[INT]"  # the Set-Encoder's interaction token, inserted after the first token of every pair

Pair = tuple[list[int], list[int]]  # (input_ids, token_type_ids) of one (query, passage) sequence


class PairTokenizer:
    """Tokenises (query, passage) pairs into `[CLS] query [SEP] passage [SEP]` under the model's rule:

    - `truncation: pair`: the whole pair is cut to `max_length` tokens, longest field first (the multi-stage
      seed's recipe and what `transformers` does with `truncation=True`);
    - `truncation: per_field`: the query is cut to `query_length` and the passage to `passage_length` tokens
      on their own, before the special tokens are added (the Set-Encoder's convention).

    It drives the fast (Rust) tokenizer directly and in batches: copies of it with padding and truncation
    switched off, because a `tokenizer.json` may ship with both enabled.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: ModelConfig):
        if not tokenizer.is_fast:
            raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; crossrank needs one")
        self.model = model
        self.tokenizer = tokenizer  # the Hugging Face tokenizer (saved with the model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.uses_token_types = "token_type_ids" in tokenizer.model_input_names
        self.fields = copy.deepcopy(tokenizer.backend_tokenizer)
        self.fields.no_padding()
        self.fields.no_truncation()
        self.whole_pairs = copy.deepcopy(self.fields)
        self.whole_pairs.enable_truncation(model.max_length, strategy="longest_first")

    def encode(self, queries: list[str], passages: list[str]) -> list[Pair]:
        """Token ids and token type ids of each pair, unpadded."""
        if self.model.truncation == "pair":
            encodings = self.whole_pairs.encode_batch(list(zip(queries, passages)))
        else:
            query_enc = self.encode_field(queries, self.model.query_length)
            passage_enc = self.encode_field(passages, self.model.passage_length)
            encodings = [self.fields.post_process(q, p, add_special_tokens=True)
                         for q, p in zip(query_enc, passage_enc)]
        return [(e.ids, e.type_ids) for e in encodings]

    def encode_field(self, texts: list[str], max_tokens: int) -> list[Encoding]:
        """One field's tokens without special tokens, cut to `max_tokens`."""
        encodings = self.fields.encode_batch(texts, add_special_tokens=False)
        for e in encodings:
            e.truncate(max_tokens)
        return encodings

    def pad(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        """Right-pad a list of pairs to the longest one: input_ids, attention_mask (+ token_type_ids)."""
        length = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(pairs), length), self.pad_id, dtype=torch.long)  # [N, L]
        attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)  # [N, L]
        token_type_ids = torch.zeros((len(pairs), length), dtype=torch.long)  # [N, L]
        for row, (ids, types) in enumerate(pairs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            token_type_ids[row, : len(ids)] = torch.tensor(types)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_types:
            batch["token_type_ids"] = token_type_ids
        return batch

    def pad_list(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        """`pad` as one list of N pairs, [1, N, L] (views), every row a pair (no mask): how the engines hand a
        pointwise model its token-budget chunks."""
        return {key: value[None] for key, value in self.pad(pairs).items()}

    def __call__(self, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        return self.pad(self.encode(queries, passages))


def empty_queries(tokenizer: PairTokenizer, queries: dict[str, str]) -> list[str]:
    """The qids whose text tokenises to no token at all (only characters the tokenizer drops, e.g. control or
    zero-width ones): their passages would be scored against an empty query."""
    qids = list(queries)
    encodings = tokenizer.fields.encode_batch([queries[q] for q in qids], add_special_tokens=False)
    return [q for q, e in zip(qids, encodings) if not e.ids]


def empty_query_warning(tokenizer: PairTokenizer, queries: dict[str, str], source: str) -> str | None:
    empty = empty_queries(tokenizer, queries)
    if not empty:
        return None
    return (f"warning: {source}: {len(empty)} of {len(queries)} queries tokenise to nothing (e.g. "
            f"{', '.join(empty[:5])}); their passages are scored against an empty query")


def load_set_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer with the special token [INT] added (a no-op if it is already there)."""
    tokenizer = load_tokenizer(path)
    if INTERACTION_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(INTERACTION_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def encode_lists(tokenizer: PairTokenizer, interaction_id: int, queries: list[str],
                 passages: list[list[str]]) -> dict[str, torch.Tensor]:
    """Tokenise Q queries with their passage lists for the Set-Encoder: each pair is the backbone's pair layout
    with [INT] inserted after the first token (`[CLS] [INT] q [SEP] p [SEP]`, RoBERTa `<s> [INT] q </s></s>
    p </s>`), query and passage truncated on their own (`tokenizer` must use `truncation: per_field`).

    Returns input_ids, attention_mask (and token_type_ids for BERT/ELECTRA) [Q, D, L] and mask [Q, D]."""
    if tokenizer.model.truncation != "per_field":
        raise CrossrankError(f"Set-Encoder: model.truncation must be per_field (got {tokenizer.model.truncation!r})")
    if len(queries) != len(passages):
        raise CrossrankError(f"Set-Encoder: {len(queries)} queries but {len(passages)} passage lists")
    Q, D = len(queries), max((len(p) for p in passages), default=0)
    query_enc = tokenizer.encode_field(queries, tokenizer.model.query_length)
    flat = [p for ps in passages for p in ps]
    passage_enc = iter(tokenizer.encode_field(flat, tokenizer.model.passage_length))
    encoded: list[tuple[list[int], list[int]]] = []
    mask = torch.zeros(Q, D, dtype=torch.bool)
    for qi, ps in enumerate(passages):
        for di in range(len(ps)):
            e = tokenizer.fields.post_process(query_enc[qi], next(passage_enc), add_special_tokens=True)
            encoded.append(([e.ids[0], interaction_id, *e.ids[1:]], [e.type_ids[0], 0, *e.type_ids[1:]]))
            mask[qi, di] = True
    # Pad rows for missing passages: a lone [CLS]-like pad row that the model never reads (mask is False).
    batch = tokenizer.pad(encoded) if encoded else {"input_ids": torch.zeros(0, 1, dtype=torch.long)}
    L = batch["input_ids"].shape[1]
    out = {}
    for key, value in batch.items():
        dense = value.new_full((Q * D, L), tokenizer.pad_id if key == "input_ids" else 0)  # [Q*D, L]
        dense[mask.reshape(-1).nonzero().squeeze(1)] = value
        out[key] = dense.view(Q, D, L)  # [Q, D, L]
    out["mask"] = mask
    return out


def plan_batches(lengths: list[int], groups: list[int], batch_tokens: int,
                 listwise: bool = False) -> list[list[int]]:
    """Indices of pairs per batch. Pointwise: pairs sorted by length (longest first, so an out-of-memory error
    shows at once), each batch as many pairs as fit `batch_tokens` padded tokens. `listwise` (the Set-Encoder):
    whole queries (`groups[i]` = query index of pair i) per batch, because a query's passages attend to each
    other."""
    if listwise:
        by_query: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            by_query.setdefault(g, []).append(i)
        return list(by_query.values())
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # sorted descending, so the first pair of a batch sets its padded length
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
