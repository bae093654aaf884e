"""Loading a checkpoint or backbone: `load_scorer` is the one place that turns `model.kind` into a model class
(training and inference both load through it; elsewhere a branch asks the model, `model.listwise`), and
`load_model` readies it for scoring (eval mode, device, first-token-only last layer, its pair tokenizer)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from crossrank.config import ModelConfig
from crossrank.errors import CrossrankError
from crossrank.models.mono import (MonoEncoder, freeze_position_embeddings, load_tokenizer, resolve_model_path,
                                   score_first_token_only)
from crossrank.models.encoding import PairTokenizer, load_set_tokenizer
from crossrank.models.set_encoder import CONFIG_FILE, SetEncoder


def load_scorer(path: str | os.PathLike, cfg: ModelConfig, training: bool = False,
                sdpa: bool = False) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model of `cfg.kind` from `path` (backbone, checkpoint or training state) and its tokenizer.

    `training`: the Set-Encoder takes `depth` and `sample_missing_docs` from `cfg` (at inference the values
    saved with it), and `cfg.gradient_checkpointing` / `cfg.freeze_position_embeddings` apply. `sdpa`: a mono
    model uses SDPA attention (inference on CUDA). A Set-Encoder folder is never read as a mono model."""
    if cfg.kind == "set-encoder":
        overrides = {"sample_at_inference": cfg.sample_at_inference}
        if training:  # the [INT] set's size, whatever the list's
            overrides.update(sample_missing_docs=cfg.sample_missing_docs, depth=cfg.depth)
        model, tokenizer = SetEncoder.from_pretrained(path, **overrides), load_set_tokenizer(path)
    else:
        if (Path(resolve_model_path(str(path))) / CONFIG_FILE).is_file():
            raise CrossrankError(f"{path}: is a Set-Encoder checkpoint ({CONFIG_FILE}) loaded as model.kind="
                                 f"{cfg.kind} (expected -c set-encoder, or model.kind=set-encoder "
                                 f"model.truncation=per_field)")
        extra = {"attn_implementation": "sdpa"} if sdpa else {}
        model, tokenizer = MonoEncoder.from_pretrained(path, **extra), load_tokenizer(path)
    if training and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if training and cfg.freeze_position_embeddings:
        freeze_position_embeddings(model)
    return model, tokenizer


def load_model(path: str | os.PathLike, model_cfg: ModelConfig, device: torch.device,
               compile: bool = False) -> tuple[nn.Module, PairTokenizer]:
    """The checkpoint (`load_scorer`) in eval mode on `device` and its pair tokenizer. SDPA attention on CUDA;
    a mono model scores its last layer for the first token only; `compile` wraps it in `torch.compile`
    (dynamic shapes)."""
    # A bare backbone (no trained head) gets a random head: seed it, so that every rank of a sharded run and
    # every resumed run has the same one (transformers reports the missing weights).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, tokenizer = load_scorer(path, model_cfg, sdpa=device.type == "cuda")
        model = model.to(device).eval()
    if model.listwise:  # scored one whole query list per forward pass, fields truncated on their own
        model_cfg = dataclasses.replace(model_cfg, truncation="per_field")  # the Set-Encoder's convention
    else:
        score_first_token_only(model)
    if compile:  # fuses the element-wise ops around the GEMMs; a one-off compile, then faster steady state
        model = torch.compile(model, dynamic=True)
    return model, PairTokenizer(tokenizer, model_cfg)
