"""Checkpoints: atomic save of model/ and checkpoint/ folders, verification and recovery before reuse,
the recipe check on resume, and every process's RNG states."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from crossrank import config as config_io
from crossrank.config import RunConfig
from crossrank.distributed import Distributed
from crossrank.data.atomic import FILE_MODE
from crossrank.errors import CrossrankError
from crossrank.models import card
from crossrank.models.mono import check_model_folder, quiet_transformers, write_manifest
from crossrank.training.naming import objective_chain


@dataclasses.dataclass
class TrainState:
    """Everything besides weights, optimiser and scaler that a resumed run needs (saved as state.pt)."""

    step: int = 0  # optimiser steps done
    cursor: int = 0  # examples consumed from the training stream, over all processes
    best_metric: float = -math.inf  # best validation value so far (train.select_metric)
    best_step: int = -1  # the step model/ was saved at
    finished: bool = False
    rng: list = dataclasses.field(default_factory=list)  # per process: python, torch CPU (and CUDA) RNG states


# ---------------------------------------------------------------------------------------------------------
# Saving: every folder is written under a temporary name, then swapped in with renames


def save_model(model: nn.Module, tokenizer, cfg: RunConfig, folder: Path, state: TrainState) -> None:
    """`_write_model`'s folder plus selected.json: which step it is and its validation value."""
    def write(tmp: Path) -> None:
        _write_model(tmp, model, tokenizer, cfg, state)
        selected = {"step": state.step, "metric": cfg.train.select_metric,
                    "value": state.best_metric if math.isfinite(state.best_metric) else None}
        (tmp / "selected.json").write_text(json.dumps(selected) + "\n")
    _replace_folder(folder, write)


def save_checkpoint(model: nn.Module, tokenizer, optimizer, scaler, cfg: RunConfig, state: TrainState,
                    folder: Path) -> None:
    """`_write_model`'s folder plus state.pt: optimiser, scaler and the TrainState (step, cursor, best, RNG)."""
    def write(tmp: Path) -> None:
        _write_model(tmp, model, tokenizer, cfg, state)
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "state": dataclasses.asdict(state)}, tmp / "state.pt")
    _replace_folder(folder, write)


def _write_model(tmp: Path, model: nn.Module, tokenizer, cfg: RunConfig, state: TrainState) -> None:
    """What every saved folder holds: a Hugging Face folder (safetensors + tokenizer), crossrank.yaml (the
    resolved config), crossrank.json and README.md (the settings to use it with and the model card,
    `crossrank.models.card`)."""
    with quiet_transformers():  # no "Writing model shards" bar for a one-shard model
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config_io.save(cfg, tmp / "crossrank.yaml")
    best = state.best_metric if math.isfinite(state.best_metric) else None
    chain = objective_chain(cfg.train.objective, cfg.train.stage, cfg.train.previous)
    card.write(tmp, cfg, chain, state.step, best, state.best_step)


def _replace_folder(folder: Path, write) -> None:
    """Write into `.name.tmp`, fsync, then rename: `folder` is always either the old or the new complete one
    (a crash between the two renames leaves `.name.old`, which `recover_folder` puts back)."""
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        write_manifest(tmp)  # last: a folder with a manifest is complete, and any later damage is found on reuse
        for file in tmp.iterdir():
            os.chmod(file, FILE_MODE)  # safetensors writes owner-only files; checkpoints are shared like all outputs
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    except BaseException as e:  # e.g. a full disk: the old folder stays as it was, and no half-written copy
        shutil.rmtree(tmp, ignore_errors=True)
        # a full disk surfaces as OSError, safetensors' SafetensorError or torch.save's RuntimeError
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError" or "write" in str(e).lower():
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
            raise CrossrankError(f"{folder}: could not be written ({reason}); the previous {folder.name} (if "
                                 f"any) is intact") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(folder: Path) -> bool:
    """Whether `folder` exists, after undoing an interrupted `_replace_folder`."""
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.exists():
        os.replace(old, folder)
    return (folder / "state.pt").is_file()


def check_checkpoint(folder: Path) -> None:
    """A checkpoint folder that a crash or a full disk left incomplete or corrupt: say which file, and what to do
    (the folder is only ever replaced whole, so this means it was damaged after it was written)."""
    restart = f"delete {folder} to start the run again from step 0"
    for name in ("crossrank.yaml", "config.json", "model.safetensors", "state.pt"):
        if not (folder / name).is_file() or not (folder / name).stat().st_size:
            raise CrossrankError(f"{folder / name}: missing or empty in the checkpoint (expected a complete "
                                 f"checkpoint folder; {restart})")
    try:
        check_model_folder(folder)
    except CrossrankError as e:
        raise CrossrankError(f"{e}; {restart}") from None


def load_state(path: Path, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated or not a torch file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrossrankError(f"{path}: corrupt or truncated training state ({reason}); delete {path.parent} to "
                             f"start the run again from step 0") from None


def check_same_recipe(cfg: RunConfig, saved_path: Path) -> None:
    """Resuming with another recipe would silently mix two runs: refuse, naming the keys that differ."""
    import yaml

    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    now = config_io.to_dict(cfg)
    # may change on resume: batch_tokens/score_grad say how a micro-batch is chunked, not what it computes; a run
    # folder may be moved (e.g. off scratch) and resumed there
    free = {"max_steps", "epochs", "eval_every", "eval_unit", "save_every", "log_every", "report_to", "batch_tokens", "score_grad",
            "output_dir", "models_dir"}
    defaults = config_io.to_dict(RunConfig())  # a key newer than the checkpoint counts as its default
    differ = [f"{section}.{key}" for section in ("model", "data", "optim", "train")
              for key, value in now[section].items()
              if key not in free and saved.get(section, {}).get(key, defaults[section][key]) != value]
    if differ:
        raise CrossrankError(f"{saved_path}: the checkpoint was trained with other settings ({', '.join(differ)}); "
                             f"resume with the same ones, or set train.output_dir to start a new run")


# ---------------------------------------------------------------------------------------------------------
# RNG states, signals, metrics


def gather_rng(ddp: Distributed) -> list:
    mine = {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(ddp.device) if ddp.device.type == "cuda" else None}
    if ddp.world == 1:
        return [mine]
    states = [None] * ddp.world
    dist.all_gather_object(states, mine)
    return states


def set_rng(states: list, ddp: Distributed) -> None:
    if len(states) != ddp.world:
        raise CrossrankError(f"checkpoint: saved by {len(states)} process(es), resumed with {ddp.world} "
                             f"(expected the same number of GPUs for an exact resume)")
    mine = states[ddp.rank]
    version, internal, gauss = mine["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(mine["torch"].cpu())
    if mine["cuda"] is not None and ddp.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"].cpu(), ddp.device)
