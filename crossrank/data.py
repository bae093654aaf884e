"""Turning texts into model inputs: per-pair or per-field truncation, and padding into batches.

Training examples (sampling negatives from runs, teacher targets) are built on top of these helpers.
"""
from __future__ import annotations

import copy

import torch
from tokenizers import Encoding
from transformers import PreTrainedTokenizerBase

from crossrank.config import ModelConfig

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
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.uses_token_types = "token_type_ids" in tokenizer.model_input_names
        self.fields = copy.deepcopy(tokenizer.backend_tokenizer)
        self.fields.no_padding()
        self.fields.no_truncation()
        self.pairs = copy.deepcopy(self.fields)
        self.pairs.enable_truncation(model.max_length, strategy="longest_first")

    def encode(self, queries: list[str], passages: list[str]) -> list[Pair]:
        """Token ids and token type ids of each pair, unpadded."""
        if self.model.truncation == "pair":
            encodings = self.pairs.encode_batch(list(zip(queries, passages)))
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

    def __call__(self, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        return self.pad(self.encode(queries, passages))
