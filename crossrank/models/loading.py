"""`load_model`: the one model loader. Training and inference both load through it, and it is the one place
that turns `model.kind` into a model class; elsewhere a branch asks the model (`model.listwise`)."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from torch import nn

from crossrank.config import ModelConfig
from crossrank.errors import CrossrankError
from crossrank.models.card import apply_settings
from crossrank.models.encoding import PairTokenizer, load_set_tokenizer
from crossrank.models.mono import (MonoEncoder, check_model_folder, freeze_lower_layers, freeze_position_embeddings,
                                   load_tokenizer, resolve_model_path, score_first_token_only)
from crossrank.models.set_encoder import CONFIG_FILE, SetEncoder


def load_model(path: str | os.PathLike, cfg: ModelConfig | None = None, device: torch.device | str = "cpu", *,
               training: bool = False, duplicate: bool = False, compile: bool = False,
               explicit: set[str] | None = None, announce: bool = True) -> tuple[nn.Module, PairTokenizer]:
    """The model in `path` (backbone, checkpoint or training state) on `device`, and its pair tokenizer
    (`.tokenizer` is the Hugging Face one, for saving).

    Inference (`training` False): the checkpoint's own settings (`crossrank.models.card.apply_settings`: kind,
    max length, truncation, field lengths from its crossrank.json) replace those of `cfg` not chosen explicitly
    (`explicit`: the model field names the user set; None: those differing from ModelConfig's defaults); a
    conflicting explicit one is used and named in one line on stderr (`announce`). Eval mode; SDPA attention on
    CUDA; a bare backbone's new head is seeded (every rank of a sharded run and every resumed run gets the same
    one); `compile` wraps the model in `torch.compile` (dynamic shapes).

    Training: `cfg` as it is (the Set-Encoder takes `depth` and `sample_missing_docs` from it, and
    `gradient_checkpointing` / `freeze_position_embeddings` apply); the caller seeds the new head. The
    Set-Encoder's duplicate head trains only with `duplicate` (stage 1); frozen otherwise, so DDP needs no
    find_unused_parameters.

    Both: a mono model's last layer runs for the first token only (`FirstTokenLayer`: its head reads nothing
    else, so the same scores and gradients for ~1/7 less work); a Set-Encoder is scored with per-field
    truncation; a Set-Encoder folder is never read as a mono model."""
    cfg = cfg or ModelConfig()
    device = torch.device(device)
    if not training:
        cfg, notes = apply_settings(cfg, resolve_model_path(str(path)), explicit)
        if announce:
            for note in notes:
                print(note, file=sys.stderr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, tokenizer = _load(path, cfg, training, sdpa=device.type == "cuda")
        model = model.to(device).eval()
    else:
        model, tokenizer = _load(path, cfg, training)
        model = model.to(device)
    if model.listwise:  # scored one whole query list per forward pass, fields truncated on their own
        cfg = dataclasses.replace(cfg, truncation="per_field")  # the Set-Encoder's convention
        if training:
            model.duplicate.requires_grad_(duplicate)
    else:
        score_first_token_only(model)
    if compile and not training:  # fuses the element-wise ops around the GEMMs: a one-off compile, then faster
        model = torch.compile(model, dynamic=True)
    return model, PairTokenizer(tokenizer, cfg)


def _load(path: str | os.PathLike, cfg: ModelConfig, training: bool, sdpa: bool = False):
    """The model of `cfg.kind` and its Hugging Face tokenizer; a folder that lacks what it needs (weights,
    tokenizer) or holds another architecture is one error before anything is loaded."""
    check_model_folder(resolve_model_path(str(path)))
    try:
        return _from_pretrained(path, cfg, training, sdpa)
    except OSError as e:  # transformers' "couldn't connect / not a valid model identifier": several lines
        if e.filename is not None:
            raise
        reason = " ".join(str(e).split()).split(". ")[0]
        raise CrossrankError(f"{path}: could not be loaded ({reason}; expected a checkpoint folder or a hub "
                             f"id)") from None


def _from_pretrained(path: str | os.PathLike, cfg: ModelConfig, training: bool, sdpa: bool):
    if cfg.kind == "set-encoder":
        overrides = {"sample_at_inference": cfg.sample_at_inference}
        if training:  # the [INT] set's size, whatever the list's (at inference: the value saved with it)
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
    if training and cfg.freeze_layers:
        freeze_lower_layers(model, cfg.freeze_layers)
    return model, tokenizer
