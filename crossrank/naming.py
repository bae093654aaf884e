"""Where checkpoints live: the naming convention shared by train.py (writes) and infer.py (finds).

    models/<backbone>.<objectives>.f<stage>.lr<lr>.s<seed>/
        model/        the selected checkpoint (best validation nDCG@10): a Hugging Face folder with
                      safetensors, tokenizer and crossrank.yaml (the resolved config) — what infer.py loads
        checkpoint/   the latest resumable training state (model, optimiser, scheduler, scaler, RNG, data cursor)

`<objectives>` is the chain of stages: `CL` for a stage-1 CL run, `CL-KD` for stage 2 KD started from it.
Examples: `models/bert.CL.f1.lr1e-05.s42`, `models/electra.CL-KD.f2.lr1e-05.s42`.
"""
from __future__ import annotations

import re
from pathlib import Path

from crossrank.config import ROOT
from crossrank.io import CrossrankError

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


def run_name(backbone: str, objectives: list[str], stage: int, lr: float, seed: int) -> str:
    return f"{backbone_name(backbone)}.{'-'.join(objectives)}.f{stage}.lr{lr:g}.s{seed}"


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
