"""`load_scorer`: the one place that turns `model.kind` into a model class. Training and inference both load
through it; elsewhere a branch asks the model (`model.listwise`)."""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from crossrank.config import ModelConfig
from crossrank.errors import CrossrankError
from crossrank.models.mono import (MonoEncoder, check_model_folder, freeze_position_embeddings, load_tokenizer,
                                   resolve_model_path)
from crossrank.models.encoding import load_set_tokenizer
from crossrank.models.set_encoder import CONFIG_FILE, SetEncoder


def load_scorer(path: str | os.PathLike, cfg: ModelConfig, training: bool = False,
                sdpa: bool = False) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model of `cfg.kind` from `path` (backbone, checkpoint or training state) and its tokenizer.

    `training`: the Set-Encoder takes `depth` and `sample_missing_docs` from `cfg` (at inference the values
    saved with it), and `cfg.gradient_checkpointing` / `cfg.freeze_position_embeddings` apply. `sdpa`: a mono
    model uses SDPA attention (inference on CUDA). A Set-Encoder folder is never read as a mono model."""
    check_model_folder(resolve_model_path(str(path)))  # weights and tokenizer: before anything is loaded
    try:
        model, tokenizer = _load(path, cfg, training, sdpa)
    except OSError as e:  # transformers' "couldn't connect / not a valid model identifier": several lines
        if e.filename is not None:
            raise
        reason = " ".join(str(e).split()).split(". ")[0]
        raise CrossrankError(f"{path}: could not be loaded ({reason}; expected a checkpoint folder or a hub "
                             f"id)") from None
    if training and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if training and cfg.freeze_position_embeddings:
        freeze_position_embeddings(model)
    return model, tokenizer


def _load(path: str | os.PathLike, cfg: ModelConfig, training: bool,
          sdpa: bool) -> tuple[nn.Module, PreTrainedTokenizerBase]:
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
    return model, tokenizer
