"""What a saved model folder says about itself, and how a re-ranker uses it.

Every `model/` and `checkpoint/` folder training writes holds, beside the weights and the tokenizer:
- `crossrank.json`: the settings the model must be used with (kind, max length, truncation, field lengths,
  the Set-Encoder's depth), how it was trained (objective chain, loss, lr, seed, steps, data) and its
  validation figure. It is the one source of truth for *using* the model: small, flat, stable, readable
  without crossrank's config classes. (`crossrank.yaml` stays the full resolved training config: the record of
  the run and what a resume is checked against; both are written from the same config at the same moment.)
- `README.md`: a model card for people, generated from the same facts.

`apply_settings` gives a re-ranker (infer.py, the PyTerrier transformer) the checkpoint's settings by default.
An explicit setting that differs is used, and named in one line (`note: model.max_length=256 overrides the
checkpoint's 128`); the kind is the checkpoint's architecture, so a conflicting kind is an error. Folders
written before `crossrank.json` existed are read from their `crossrank.yaml` (crossrank checkpoints) or
`set_encoder.json` (a Set-Encoder); other folders (backbones, hub models) have no settings and take the
config's."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from crossrank.config import CONFIGS, ModelConfig, RunConfig
from crossrank.errors import CrossrankError
from crossrank.models.mono import SET_ENCODER_FILE, SETTINGS_FILE

CARD_FILE = "README.md"
FORMAT = 1
# the ModelConfig fields a checkpoint decides at inference (depth: the Set-Encoder reads its set_encoder.json)
USE_KEYS = ("kind", "truncation", "max_length", "query_length", "passage_length")


def describe(cfg: RunConfig, objectives: list[str], step: int, best: float | None, best_step: int) -> dict:
    """The `crossrank.json` of a folder saved from a run of `cfg` (its stages' `objectives`, e.g. [CL, KD])
    after `step` optimiser steps; `best`: the best validation `train.select_metric` so far, reached at
    `best_step` (None: not validated). For model/ that is its own figure (step == best_step)."""
    m, t = cfg.model, cfg.train
    return {
        "format": FORMAT,
        "kind": m.kind,
        "truncation": m.truncation,
        "max_length": m.max_length,
        "query_length": m.query_length,
        "passage_length": m.passage_length,
        "depth": m.depth if m.kind == "set-encoder" else None,
        "backbone": m.path,
        "recipe": {
            "stage": t.stage, "objectives": list(objectives), "loss": t.loss,
            "lr": cfg.optim.lr, "schedule": cfg.optim.schedule, "seed": t.seed, "steps": step,
            "queries_per_batch": t.queries_per_batch, "accumulation": t.accumulation,
            "dataset": cfg.data.dataset, "sampling": cfg.data.sampling, "num_negatives": cfg.data.num_negatives,
            "targets": cfg.data.targets, "init_from": t.init_from,
        },
        "validation": {"metric": t.select_metric, "value": best, "step": best_step if best is not None else None},
    }


def write(folder: Path, cfg: RunConfig, objectives: list[str], step: int, best: float | None,
          best_step: int = -1) -> None:
    """`crossrank.json` and `README.md` into a model folder being written."""
    settings = describe(cfg, objectives, step, best, best_step)
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    (folder / CARD_FILE).write_text(model_card(settings, folder.name), encoding="utf-8")


def read_settings(path: str | os.PathLike) -> dict | None:
    """A model folder's settings (`path` a local folder or a hub id; resolve `packaged:` names first):
    `crossrank.json`; for older crossrank folders the model section of their `crossrank.yaml`; for a Set-Encoder
    folder without either, its kind. None for anything else."""
    folder = Path(path)
    if not folder.is_dir():  # a hub id: nothing crossrank wrote
        return None
    if (folder / SETTINGS_FILE).is_file():
        try:
            settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CrossrankError(f"{folder / SETTINGS_FILE}: not readable JSON ({e})") from None
        if not isinstance(settings, dict):
            raise CrossrankError(f"{folder / SETTINGS_FILE}: expected a JSON object")
        return settings
    if (folder / "crossrank.yaml").is_file():
        saved = yaml.safe_load((folder / "crossrank.yaml").read_text(encoding="utf-8")) or {}
        model = saved.get("model", {}) if isinstance(saved, dict) else {}
        return {k: model[k] for k in USE_KEYS if k in model} or None
    if (folder / SET_ENCODER_FILE).is_file():
        return {"kind": "set-encoder", "truncation": "per_field"}
    return None


def explicit_keys(cfg: RunConfig) -> set[str]:
    """The model fields of `cfg` the user chose: set on the command line or in a YAML of theirs, not by
    configs/defaults.yaml or a configs/backbones/ YAML (those say how to *train* a backbone)."""
    origins = getattr(cfg, "_origins", {})
    chosen = set()
    for key in USE_KEYS:
        origin = origins.get(f"model.{key}")
        if origin is None:
            continue
        if not origin.startswith("command line"):
            file = Path(origin.rsplit(":", 1)[0]).resolve()
            if file == (CONFIGS / "defaults.yaml").resolve() or file.parent == (CONFIGS / "backbones").resolve():
                continue
        chosen.add(key)
    return chosen


def changed_keys(model_cfg: ModelConfig) -> set[str]:
    """For a ModelConfig built in code (no origins): the fields that differ from ModelConfig's defaults."""
    default = ModelConfig()
    return {k for k in USE_KEYS if getattr(model_cfg, k) != getattr(default, k)}


def apply_settings(model_cfg: ModelConfig, path: str | os.PathLike,
                   explicit: set[str] | None = None) -> tuple[ModelConfig, list[str]]:
    """`model_cfg` with the checkpoint's settings in place of the ones not chosen explicitly; returns it and
    one note per explicit setting that differs from the checkpoint's. `explicit` None: `changed_keys`."""
    settings = read_settings(path)
    if not settings:
        return model_cfg, []
    explicit = changed_keys(model_cfg) if explicit is None else explicit
    saved = {k: settings[k] for k in USE_KEYS if settings.get(k) is not None}
    kind = saved.get("kind", model_cfg.kind)
    if "kind" in explicit and model_cfg.kind != kind:
        raise CrossrankError(f"{path}: is a {kind} checkpoint, loaded as model.kind={model_cfg.kind} (the kind is "
                             f"the checkpoint's architecture; expected no -c set-encoder / model.kind, or "
                             f"model.kind={kind})")
    changes, notes = {}, []
    for key, value in saved.items():
        if key in explicit and getattr(model_cfg, key) != value:
            notes.append(f"note: model.{key}={getattr(model_cfg, key)} overrides the checkpoint's {value}")
        else:
            changes[key] = value
    return dataclasses.replace(model_cfg, **changes), notes


# ---------------------------------------------------------------------------------------------------------
# The model card


def model_card(settings: dict, name: str = "model") -> str:
    """A short README.md: what the model is, how it was trained, how to load it."""
    recipe, valid = settings.get("recipe", {}), settings.get("validation", {})
    mono = settings["kind"] == "mono"
    chain = " -> ".join(recipe.get("objectives", [])) or "?"
    what = ("a pointwise cross-encoder (one relevance score per query-passage pair, a 1-logit head on the first "
            "token)" if mono else
            f"a Set-Encoder (listwise, permutation-invariant cross-encoder: a query's passages attend to each "
            f"other through [INT] tokens; attention set of {settings.get('depth')} passages)")
    truncation = (f"the (query, passage) pair cut to {settings['max_length']} tokens"
                  if settings["truncation"] == "pair" else
                  f"query cut to {settings['query_length']}, passage to {settings['passage_length']} tokens")
    value = valid.get("value")
    if not isinstance(value, (int, float)):
        figure = "no validation figure (no validation queries, or not validated yet)"
    elif valid.get("step") == recipe.get("steps"):
        figure = f"validation {valid.get('metric')}: {value:.4f} (these weights)"
    else:
        figure = (f"validation {valid.get('metric')}: best so far {value:.4f} at step {valid.get('step')} "
                  f"(the run's model/ folder; these are later weights, kept to resume)")
    lines = [
        f"# crossrank {settings['kind']} re-ranker ({name})", "",
        f"A crossrank re-ranker: {what}, fine-tuned from `{settings.get('backbone') or '?'}`.", "",
        "## Training", "",
        f"- stage {recipe.get('stage')}, objectives {chain} (loss `{recipe.get('loss')}`)"
        + (f", started from `{recipe['init_from']}`" if recipe.get("stage") == 2 and recipe.get("init_from") else ""),
        f"- lr {recipe.get('lr')} ({recipe.get('schedule')}), seed {recipe.get('seed')}, {recipe.get('steps')} "
        f"optimiser steps of {recipe.get('queries_per_batch')} x {recipe.get('accumulation')} queries",
        f"- data: `{recipe.get('dataset')}` ({recipe.get('sampling')} sampling, {recipe.get('num_negatives')} "
        f"negatives, targets {recipe.get('targets')})",
        f"- {figure}",
        f"- input: {truncation}", "",
        "`crossrank.json` holds these settings (re-rankers use them by default); `crossrank.yaml` the full "
        "training config.", "",
        "## Use", "",
        "crossrank (re-rank a dataset's first-stage run and evaluate; the settings above apply by default):", "",
        "```bash", "python infer.py --model path/to/this/folder eval.dataset=dl19",
        "./inference-monoencoder.sh -M path/to/this/folder -d dl19", "```", "",
        "In Python (scores of a `Candidates`: a run's top-k with query and passage texts):", "",
        "```python",
        "from crossrank.config import EvalConfig",
        "from crossrank.inference.rerank import score_candidates",
        "from crossrank.models.loading import load_model",
        "model, tokenizer = load_model(\"path/to/this/folder\")  # settings from crossrank.json",
        "run = score_candidates(model, tokenizer, candidates, EvalConfig())",
        "```", "",
        "PyTerrier:", "",
        "```python",
        "from crossrank.inference.pyterrier import CrossEncoderReranker",
        "pipeline = bm25 % 100 >> pt.text.get_text(dataset, \"text\") >> CrossEncoderReranker(\"path/to/this/folder\")",
        "```", "",
    ]
    if mono:
        lines += [
            "sentence-transformers (a plain Hugging Face sequence-classification folder, 1 logit"
            + ("" if settings["truncation"] == "pair" else "; note: it cuts the pair as a whole, not per field")
            + "):", "",
            "```python",
            "from sentence_transformers import CrossEncoder",
            f"model = CrossEncoder(\"path/to/this/folder\", max_length={settings['max_length']})",
            "scores = model.predict([(query, passage), ...])",
            "```", "",
        ]
    else:
        lines += ["Not loadable as a sentence-transformers CrossEncoder: the Set-Encoder scores a query's whole "
                  "list at once (crossrank's `SetEncoder`).", ""]
    return "\n".join(lines)
