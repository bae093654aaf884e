"""Where checkpoints live: the naming convention shared by train.py (writes) and infer.py (finds).

    models/<backbone>.<objectives>.f<stage>[.<dataset>][.from-<hash>].lr<lr>.s<seed>/
        model/        the selected checkpoint (best validation nDCG@10): a Hugging Face folder with
                      safetensors, tokenizer and crossrank.yaml (the resolved config) — what infer.py loads
        checkpoint/   the latest resumable training state (model, optimiser, AMP scaler, RNG, data cursor; the
                      learning rate is a function of the step, so there is no scheduler to save)

`<objectives>` is the chain of stages: `CL` for a stage-1 CL run, `CL-KD` for stage 2 KD started from it.
`<dataset>` is the training dataset (`data.dataset`) when it is not the default (`demo`); a stage-2 folder adds
`from-<hash>`, 8 hex digits of the starting checkpoint's weights (`checkpoint_hash`), so a stage 2 started from
another stage-1 model never shares (or resumes) a folder with this one.
Examples: `models/bert.CL.f1.lr1e-05.s42`, `models/electra.CL.f1.msmarco-train.lr1e-05.s42`,
`models/electra.CL-KD.f2.msmarco-train.from-3fa2c91e.lr1e-05.s42`.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from crossrank.config import ROOT, DataConfig
from crossrank.errors import CrossrankError

MODELS = ROOT / "models"
OTHER_OBJECTIVE = {"CL": "KD", "KD": "CL"}


def backbone_name(backbone: str) -> str:
    """A short name for a backbone: itself for `bert`/`electra`/..., the last path part for a hub id or folder."""
    name = Path(backbone.rstrip("/")).name or backbone
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def objective_chain(objective: str, stage: int, previous: str = "") -> list[str]:
    """`-f 1 -m CL` -> [CL]; `-f 2 -m KD` -> [CL, KD] (the previous stage is the other objective unless given)."""
    if stage == 1:
        return [objective]
    return [previous or OTHER_OBJECTIVE.get(objective, "CL"), objective]


def model_label(name: str, novelty: bool = False) -> str:
    """The first part of a run folder's name: the model name, plus `-novelty` for the Set-Encoder's novelty
    variant (data.novelty), so that it never shares a folder with the plain run it is compared with."""
    return f"{name}-novelty" if novelty else name


def run_name(backbone: str, objectives: list[str], stage: int, lr: float, seed: int, dataset: str = "",
             start: str = "") -> str:
    """The folder name; `dataset` appears unless it is the default, `start` (a `checkpoint_hash`) for stage 2."""
    parts = [backbone_name(backbone), "-".join(objectives), f"f{stage}"]
    if dataset and dataset != DataConfig().dataset:
        parts.append(backbone_name(dataset[:-5] if dataset.endswith(".yaml") else dataset))
    if start:
        parts.append(f"from-{start}")
    return ".".join(parts + [f"lr{lr:g}", f"s{seed}"])


def checkpoint_hash(folder: str | Path) -> str:
    """8 hex digits of SHA-256 over the weight files (`*.safetensors`, by name) of a model folder: equal for
    the same weights wherever the folder lives, different when the stage-1 model was retrained."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CrossrankError(f"{folder}: no *.safetensors weights (expected a crossrank or Hugging Face model folder)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:8]


def find_model(backbone: str, objectives: list[str], stage: int, lr: float | None = None,
               seed: int | None = None, models: Path = MODELS) -> Path:
    """The one `models/<...>/model` folder matching; lr/seed narrow the search when given. No match or several
    matches is an error that lists what is there."""
    prefix = f"{backbone_name(backbone)}.{'-'.join(objectives)}.f{stage}."
    found = sorted(p for p in models.glob(prefix + "*") if (p / "model").is_dir())
    if lr is not None:
        found = [p for p in found if f".lr{lr:g}." in p.name]
    if seed is not None:
        found = [p for p in found if p.name.endswith(f".s{seed}")]
    if len(found) == 1:
        return found[0] / "model"
    there = sorted(p.name for p in models.glob("*") if p.is_dir()) if models.is_dir() else []
    what = "no checkpoint" if not found else f"{len(found)} checkpoints ({', '.join(p.name for p in found)})"
    raise CrossrankError(f"{models}: {what} matching {prefix}*{'' if lr is None else f' lr={lr:g}'}"
                         f"{'' if seed is None else f' seed={seed}'} (there: {', '.join(there) or 'nothing'}; "
                         f"narrow with -l/--seed or pass --model PATH)")
