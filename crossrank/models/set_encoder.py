"""The Set-Encoder (Schlatt et al., "Set-Encoder: Permutation-Invariant Inter-Passage Attention for Listwise
Passage Re-Ranking with Cross-Encoders", ECIR 2025, arXiv:2404.06912): a listwise cross-encoder.

Every (query, passage) pair is its own sequence `[CLS] [INT] query [SEP] passage [SEP]` (RoBERTa:
`<s> [INT] query </s></s> passage </s>`), the query cut to 32 and the passage to 256 tokens on their own, with
position ids restarting in every pair. In every self-attention layer the keys/values of a passage are its own
tokens plus the `[INT]` states of the *other* passages of the same query, so passages exchange information
without any list position being encoded: the scores are permutation-invariant (equivariant), and passages of
different queries in the same batch never interact.

How it is built: the backbone is a plain `transformers` BERT/ELECTRA/RoBERTa encoder whose self-attention
*instances* are replaced at construction by `InterPassageAttention` (`replace_self_attention`), which takes over
the original `query`/`key`/`value` Linear modules (same parameter names, no new weights) and runs one SDPA call
with an additive mask. The list structure reaches the layers as a keyword argument (`list_layout`) that
`transformers` passes down unchanged through `BertModel -> BertLayer -> BertAttention -> self`.

A checkpoint folder holds the backbone's `config.json` + `model.safetensors` (a plain encoder that
`AutoModel` loads), `set_encoder.json` (this model's own config), `heads.safetensors` (score and duplicate
heads) and the tokenizer with `[INT]`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerBase
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.electra.modeling_electra import ElectraSelfAttention
from transformers.models.roberta.modeling_roberta import RobertaSelfAttention

from crossrank.models.encoding import INTERACTION_TOKEN, load_set_tokenizer
from crossrank.errors import CrossrankError
from crossrank.models.mono import (SET_ENCODER_FILE, announce_new_weights, check_model_folder, quiet_transformers,
                                   resolve_model_path)

INT_POSITION = 1  # the [INT] token sits right after [CLS] / <s> in every pair
CONFIG_FILE = SET_ENCODER_FILE  # "set_encoder.json"
HEADS_FILE = "heads.safetensors"
# model_type -> the self-attention class whose instances are replaced (they share one structure in
# transformers 5: query/key/value Linear, num_attention_heads, attention_head_size, scaling, dropout).
SELF_ATTENTION = {"bert": BertSelfAttention, "electra": ElectraSelfAttention, "roberta": RobertaSelfAttention}


@dataclasses.dataclass
class SetEncoderConfig:
    depth: int = 100  # with sampling on, each query's [INT] set is padded to this many states
    sample_missing_docs: bool = False  # training: Gaussian pseudo-[INT] states for missing passages
    sample_at_inference: bool = False  # eval mode: the same (the reference's behaviour), from a fixed-seed generator
    interaction_token_id: int = -1  # id of [INT] in the tokenizer saved with the model
    format: int = 1


@dataclasses.dataclass
class ListLayout:
    """Where the passages of a [Q, D] batch sit once packed into N real rows; built once per forward and
    handed to every layer. Slots are the M = D (or `depth`) [INT] places of a query's set."""
    rows: torch.Tensor  # [N] flat index q * D + d of each real passage
    spans: list[tuple[int, int]]  # per query: its passages are the real rows start:end (rows are sorted)
    real_slots: torch.Tensor  # [Q, M] bool: slot holds a real passage (the others hold pseudo-states or nothing)
    additive_mask: torch.Tensor  # [N, 1, 1, L + M] float32: 0 = may attend, -inf-like = masked
    num_queries: int
    list_width: int  # D
    num_slots: int  # M
    sample: bool  # fill the non-real slots with pseudo-states
    generator: torch.Generator | None = None  # eval mode: a fresh fixed-seed one per forward (reproducible)


class ListScores(NamedTuple):
    """What `SetEncoder.scores_and_duplicates` returns: both heads' outputs for one [Q, D] batch."""
    scores: torch.Tensor  # [Q, D], as `forward` gives them
    duplicate_logits: torch.Tensor  # [Q, D]: "this passage has a copy in its list" (stage 1's auxiliary task)


class InterPassageAttention(nn.Module):
    """Self-attention of one layer where each passage also attends to the other passages' [INT] states.

    Replaces a BERT/ELECTRA/RoBERTa self-attention instance and reuses its `query`, `key` and `value` Linear
    modules (the state dict keeps the names `...attention.self.query.weight` etc.). Keys/values of passage n are
    [its L tokens ; the M [INT] slots of its query], with n's own slot, padding slots and padding tokens masked.
    The [INT] keys/values are taken from the projection already computed for each passage's own tokens
    (position 1) and broadcast per query, so nothing is projected twice; only pseudo-states are projected anew.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.query, self.key, self.value = original.query, original.key, original.value
        self.num_heads = original.num_attention_heads
        self.head_size = original.attention_head_size
        self.scaling = original.scaling
        self.dropout_p = original.dropout.p

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                list_layout: ListLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        if list_layout is None:
            raise CrossrankError("InterPassageAttention: called without list_layout (run the model through "
                                 "SetEncoder.forward, not the bare backbone)")
        N, L, H = hidden_states.shape
        pseudo = pseudo_states(hidden_states[:, INT_POSITION], list_layout) if list_layout.sample else None
        q = self.query(hidden_states).view(N, L, self.num_heads, self.head_size).transpose(1, 2)  # [N, h, L, dh]
        k = self.extend(self.key, hidden_states, pseudo, list_layout)  # [N, h, L + M, dh]
        v = self.extend(self.value, hidden_states, pseudo, list_layout)  # [N, h, L + M, dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=list_layout.additive_mask.to(q.dtype),
                                             dropout_p=self.dropout_p if self.training else 0.0,
                                             scale=self.scaling)  # [N, h, L, dh]
        return out.transpose(1, 2).reshape(N, L, H), None  # [N, L, H]

    def extend(self, linear: nn.Linear, hidden_states: torch.Tensor, pseudo: torch.Tensor | None,
               layout: ListLayout) -> torch.Tensor:
        """Keys (or values) of every passage's own tokens followed by its query's M [INT] slots.

        The slots reuse the projection of each passage's own [INT] token (no second projection) and are
        broadcast into one token-major buffer per layer, query by query (a strided copy, no gathered copy)."""
        N, L, H = hidden_states.shape
        own = linear(hidden_states)  # [N, L, H]
        slots = to_slots(own[:, INT_POSITION], layout)  # [Q, M, H]
        if pseudo is not None:
            slots = torch.where(layout.real_slots[:, :, None], slots, linear(pseudo).to(slots.dtype))
        out = own.new_empty(N, L + layout.num_slots, H)  # [N, L + M, H]
        out[:, :L] = own
        for q, (start, end) in enumerate(layout.spans):  # the passages of query q are rows start:end
            out[start:end, L:] = slots[q]
        return out.view(N, L + layout.num_slots, self.num_heads, self.head_size).transpose(1, 2)


def to_slots(per_passage: torch.Tensor, layout: ListLayout) -> torch.Tensor:
    """[N, H] states of the real passages -> [Q, M, H] slots (zeros where no real passage)."""
    N, H = per_passage.shape
    dense = per_passage.new_zeros(layout.num_queries * layout.list_width, H)
    dense = dense.index_copy(0, layout.rows, per_passage).view(layout.num_queries, layout.list_width, H)
    return F.pad(dense, (0, 0, 0, layout.num_slots - layout.list_width))  # [Q, M, H]


def pseudo_states(interaction: torch.Tensor, layout: ListLayout) -> torch.Tensor:
    """Gaussian pseudo-[INT] states [Q, M, H] drawn per query from the per-dimension mean and (unbiased) std of
    its real [INT] states `interaction` [N, H]; a query with one passage gets std 0. Detached: like
    `torch.normal` in the reference implementation, they carry no gradient."""
    x = to_slots(interaction.detach(), layout).float()  # [Q, M, H]
    real = layout.real_slots[:, :, None].float()  # [Q, M, 1]
    n = real.sum(1, keepdim=True)  # [Q, 1, 1]
    mean = (x * real).sum(1, keepdim=True) / n.clamp(min=1)  # [Q, 1, H]
    var = (((x - mean) * real) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)  # [Q, 1, H]
    noise = torch.randn(x.shape, generator=layout.generator, device=x.device) if layout.generator is not None \
        else torch.randn_like(x)  # [Q, M, H]
    return (mean + var.sqrt() * noise).to(interaction.dtype)  # [Q, M, H]


def replace_self_attention(backbone: nn.Module) -> int:
    """Swap every self-attention instance of a BERT/ELECTRA/RoBERTa encoder for an `InterPassageAttention`
    that reuses its weights. The one place the backbone is altered; transformers' classes stay untouched.
    Returns the number of layers swapped."""
    model_type = backbone.config.model_type
    if model_type not in SELF_ATTENTION:
        raise CrossrankError(f"Set-Encoder: backbone type {model_type!r} is not supported "
                             f"(expected one of {', '.join(SELF_ATTENTION)})")
    swapped = 0
    for layer in backbone.encoder.layer:
        if not isinstance(layer.attention.self, SELF_ATTENTION[model_type]):
            raise CrossrankError(f"Set-Encoder: unexpected attention module {type(layer.attention.self).__name__} "
                                 f"in a {model_type} backbone (expected {SELF_ATTENTION[model_type].__name__})")
        layer.attention.self = InterPassageAttention(layer.attention.self)
        swapped += 1
    return swapped


class SetEncoder(nn.Module):
    """Listwise cross-encoder: Q queries x D passages ([Q, D] mask for padded lists) -> scores [Q, D].

    Score = Linear(final [CLS]) without bias; `duplicate` = a separate Linear(final [CLS]) (with bias) whose
    logit says "this passage has a copy in the list" (the stage-1 auxiliary task; `scores_and_duplicates`)."""

    listwise = True  # a query's passages attend to each other: one forward must hold the whole list

    def __init__(self, backbone: nn.Module, config: SetEncoderConfig):
        super().__init__()
        self.config = config
        self.backbone = backbone
        replace_self_attention(backbone)
        hidden = backbone.config.hidden_size
        self.score = nn.Linear(hidden, 1, bias=False)
        self.duplicate = nn.Linear(hidden, 1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "SetEncoder":
        """Load a Set-Encoder folder, or start one from a bare BERT/ELECTRA/RoBERTa backbone (or a mono
        checkpoint): then [INT] is added to the vocabulary (embedding initialised to the mean of the others by
        `resize_token_embeddings`) and the heads start random. `overrides` set `SetEncoderConfig` fields."""
        name, path = str(path), resolve_model_path(str(path))
        check_model_folder(path, tokenizer=False)  # the weights alone; load_set_tokenizer checks the vocabulary
        saved = Path(path) / CONFIG_FILE
        backbone_config = AutoConfig.from_pretrained(path)
        if backbone_config.model_type not in SELF_ATTENTION:
            raise CrossrankError(f"{path}: Set-Encoder backbone type {backbone_config.model_type!r} is not "
                                 f"supported (expected one of {', '.join(SELF_ATTENTION)})")
        extra = {"add_pooling_layer": False} if backbone_config.model_type in ("bert", "roberta") else {}
        with quiet_transformers():
            backbone, info = AutoModel.from_pretrained(path, output_loading_info=True, **extra)
        announce_new_weights(backbone, info, name)
        if saved.is_file():
            config = SetEncoderConfig(**json.loads(saved.read_text()))
        else:
            tokenizer = load_set_tokenizer(path)
            config = SetEncoderConfig(interaction_token_id=tokenizer.convert_tokens_to_ids(INTERACTION_TOKEN))
            if len(tokenizer) > backbone.config.vocab_size:
                with quiet_transformers():
                    backbone.resize_token_embeddings(len(tokenizer))
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"note: new Set-Encoder heads (score, duplicate) and [INT] token initialised for {name}",
                      file=sys.stderr)
        config = dataclasses.replace(config, **overrides)
        model = cls(backbone, config)
        if saved.is_file():
            heads = load_file(str(Path(path) / HEADS_FILE))
            model.load_state_dict({**model.backbone_state(), **heads}, strict=True)
        return model

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}

    def save_pretrained(self, folder: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Backbone as a plain HF encoder folder (safetensors) + heads + `set_encoder.json` (+ tokenizer)."""
        folder = Path(folder)
        self.backbone.save_pretrained(folder, safe_serialization=True)
        heads = {f"{name}.{k}": v.detach().contiguous().cpu()
                 for name in ("score", "duplicate") for k, v in getattr(self, name).state_dict().items()}
        save_file(heads, str(folder / HEADS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward pass (100 passages x 292 tokens must fit). Non-reentrant
        checkpointing restores the RNG state, so the recomputed pseudo-states and dropout masks are the same."""
        self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def layout(self, attention_mask: torch.Tensor, mask: torch.Tensor) -> ListLayout:
        """The packing of a [Q, D] batch (attention_mask [Q, D, L], mask [Q, D]) into its real passages."""
        Q, D, L = attention_mask.shape
        sample = self.config.sample_missing_docs if self.training else self.config.sample_at_inference
        M = max(D, self.config.depth) if sample else D
        rows = mask.reshape(-1).nonzero().squeeze(1)  # [N]
        query_of, slot_of = rows // D, rows % D  # [N], [N]
        real_slots = F.pad(mask, (0, M - D))  # [Q, M]
        usable = torch.ones_like(real_slots) if sample else real_slots  # [Q, M]
        other = usable[query_of] & (torch.arange(M, device=mask.device)[None, :] != slot_of[:, None])  # [N, M]
        tokens = attention_mask.reshape(Q * D, L)[rows].bool()  # [N, L]
        allowed = torch.cat([tokens, other], dim=1)  # [N, L + M]
        additive = torch.zeros(allowed.shape, dtype=torch.float32, device=mask.device)
        additive = additive.masked_fill(~allowed, torch.finfo(torch.bfloat16).min)[:, None, None, :]
        ends = mask.sum(1).cumsum(0).tolist()  # [Q]
        spans = [(end - int(n), end) for end, n in zip(ends, mask.sum(1).tolist())]
        generator = torch.Generator(mask.device).manual_seed(0) if sample and not self.training else None
        return ListLayout(rows=rows, spans=spans, real_slots=real_slots, additive_mask=additive,
                          num_queries=Q, list_width=D, num_slots=M, sample=sample, generator=generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/attention_mask/token_type_ids [Q, D, L], mask [Q, D] (False = padding in the list; None: no
        padding) -> scores [Q, D] (0 at padding). One call must hold every passage of a query: splitting a list
        changes its scores."""
        cls, layout = self.encode(input_ids, attention_mask, mask, token_type_ids)
        return self.scatter(self.score(cls).squeeze(-1), layout)

    def scores_and_duplicates(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              mask: torch.Tensor | None = None,
                              token_type_ids: torch.Tensor | None = None) -> ListScores:
        """`forward`'s scores and the duplicate head's logits [Q, D] from the same pass (0 at padding)."""
        cls, layout = self.encode(input_ids, attention_mask, mask, token_type_ids)
        return ListScores(self.scatter(self.score(cls).squeeze(-1), layout),
                          self.scatter(self.duplicate(cls).squeeze(-1), layout))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor | None,
               token_type_ids: torch.Tensor | None) -> tuple[torch.Tensor, ListLayout]:
        """The final [CLS] states [N, H] of the real passages of a [Q, D] batch, and their layout."""
        Q, D, L = input_ids.shape
        mask = torch.ones(Q, D, dtype=torch.bool, device=input_ids.device) if mask is None else mask.bool()
        length = int(attention_mask.sum(-1).max())  # trim the padding every row shares
        input_ids, attention_mask = input_ids[..., :length], attention_mask[..., :length]
        layout = self.layout(attention_mask, mask)
        extra = {}
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids[..., :length].reshape(Q * D, length)[layout.rows]  # [N, L]
        hidden = self.backbone(input_ids=input_ids.reshape(Q * D, length)[layout.rows],  # [N, L]
                               attention_mask=None, list_layout=layout, **extra).last_hidden_state  # [N, L, H]
        return hidden[:, 0], layout  # [N, H]

    @staticmethod
    def scatter(values: torch.Tensor, layout: ListLayout) -> torch.Tensor:
        """[N] values of the real passages -> [Q, D], 0 at padding."""
        Q, D = layout.num_queries, layout.list_width
        return values.new_zeros(Q * D).index_copy(0, layout.rows, values).view(Q, D)
