"""Configuration as nested dataclasses, merged from YAML files and dotted `key=value` overrides.

Merge order (later wins): `configs/defaults.yaml`, then the small per-concern YAMLs a run names (backbone,
objective, dataset, ...), then command-line `section.key=value` overrides. Every value is cast to the type of
the dataclass field it lands in (`optim.lr=1e-5` is a float even though PyYAML reads `1e-5` as a string;
`model.dropout=0` is a float). An unknown key is an error that names the closest valid one; a value of the
wrong type is an error that names the YAML `path:line` it came from.

The machinery (`load`) works for any dataclass, so other components load their own configs the same way
(`crossrank.data.datasets.DatasetConfig`); `RunConfig` below is what train.py and infer.py read.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from crossrank.errors import CrossrankError
from crossrank.data.atomic import atomic_write

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent  # the project folder: configs/, models/, runs/, data/
CONFIGS = ROOT / "configs"


def load(cls: type[T], files: list[str | os.PathLike] = (), overrides: list[str] = ()) -> T:
    """Build a `cls` dataclass from its defaults, the YAML `files` in order, then `overrides` (`a.b=value`)."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}  # dotted key -> "path:line" of the value that won
    for file in files:
        tree, lines = _read_yaml(Path(file))
        _merge(values, tree, (), lines, origins)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise CrossrankError(f"command line: override {item!r} is not key=value (expected e.g. optim.lr=1e-5)")
        node: dict[str, Any] = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CrossrankError(f"command line: {key} goes below a value that is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        for depth in range(1, len(parts) + 1):  # an unknown section is reported at the override too
            origins[".".join(parts[:depth])] = f"command line ({item})"
    config = _build(cls, values, "", origins)
    config._origins = origins  # so that validate() can name the YAML line (or override) a bad value came from
    return config


# A name that becomes part of a file name (dataset names, model.name, run keys, objectives, config names): a
# letter or digit, then letters, digits, `.`, `_`, `+` or `-`, and never `..`, so it cannot leave its folder.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
NAME_RULE = "letters, digits, '.', '_', '+' and '-', starting with a letter or digit, without '..'"


def is_name(value: str) -> bool:
    return bool(NAME.fullmatch(value)) and ".." not in value


def check_name(value: str, where: str, what: str) -> str:
    """`value` if it is a valid name, else a CrossrankError `where: what '...' is not a valid name`."""
    if not is_name(value):
        raise CrossrankError(f"{where}: {what} {value!r} is not a valid name (expected {NAME_RULE}: it becomes "
                             f"part of file names)")
    return value


def resolve_config_file(name: str, folder: str) -> Path:
    """`configs/<folder>/<name>.yaml` for a short name, or `name` itself if it is a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml") and not is_name(name):  # `../x` must not reach outside configs/
        raise CrossrankError(f"{name}: not a name of configs/{folder}/ (expected {NAME_RULE}, or a path to a "
                             f".yaml file)")
    candidate = CONFIGS / folder / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in (CONFIGS / folder).glob("*.yaml"))
    raise CrossrankError(f"{CONFIGS / folder}: no config {name!r} (expected one of {', '.join(known)} "
                         f"or a path to a .yaml file)")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), so every output records exactly what produced it."""
    with atomic_write(path) as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)


# ---------------------------------------------------------------------------------------------------------


def read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """A YAML file's value and node tree, every failure one line naming `path:line`: invalid UTF-8, invalid
    YAML, and a key given twice in one mapping (PyYAML would silently keep the last). A UTF-8 byte-order mark
    at the start is dropped."""
    if not path.is_file():
        raise CrossrankError(f"{path}: no such config file" if not path.exists() else
                             f"{path}: is a folder (expected a YAML file)")
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not part of the YAML
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # config sits below the data readers: its own one-line error
        line = raw.count(b"\n", 0, e.start) + 1
        raise CrossrankError(f"{path}:{line}: invalid UTF-8 (expected UTF-8 text, got "
                             f"{raw[e.start:e.start + 4]!r})") from None
    try:
        node = yaml.compose(text)
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise CrossrankError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    _check_duplicate_keys(path, node)
    return tree, node


def _check_duplicate_keys(path: Path, node: yaml.Node | None) -> None:
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in n.value:
                key, line = str(key_node.value), key_node.start_mark.line + 1
                if key in seen and key != "<<":
                    raise CrossrankError(f"{path}:{line}: duplicate key {key!r} (first at line {seen[key]}; "
                                         f"expected each key once in a mapping)")
                seen.setdefault(key, line)
                stack.append(value_node)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Parse a YAML mapping, and remember the line of every key (for error messages)."""
    tree, node = read_yaml(path)
    if tree is None:
        return {}, {}
    if not isinstance(tree, dict):
        raise CrossrankError(f"{path}:1: expected a mapping of keys to values at the top level")
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = prefix + (str(key_node.value),)
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    walk(node, ())
    return tree, {k: (str(path), v) for k, v in lines.items()}


def _merge(into: dict, tree: dict, prefix: tuple[str, ...], lines: dict, origins: dict[str, str]) -> None:
    """Deep-merge `tree` into `into`, recording where every key's value came from."""
    for key, value in tree.items():
        path = prefix + (str(key),)
        file, line = lines.get(path, ("?", 0))
        origins[".".join(path)] = f"{file}:{line}"
        if isinstance(value, dict):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value, path, lines, origins)
        else:
            into[key] = value


def _build(cls: type[T], values: dict[str, Any], prefix: str, origins: dict[str, str]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid: {', '.join(fields)}"
            raise CrossrankError(f"{origins.get(dotted, 'config')}: unknown key {dotted} ({hint})")
        kwargs[key] = _cast(value, hints[key], dotted, origins)
    return cls(**kwargs)


def _cast(value: Any, hint: Any, dotted: str, origins: dict[str, str]) -> Any:
    """Cast a YAML value to a field type: dataclass sections, int/float/bool/str, Optional, list and dict."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _type_error(dotted, origins, f"a section of keys ({hint.__name__})", value)
        return _build(hint, value, f"{dotted}.", origins)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _cast(value, inner[0], dotted, origins)
    if origin is list:
        if not isinstance(value, list):
            value = [value] if not isinstance(value, str) else [v for v in value.split(",") if v]
        return [_cast(v, args[0], dotted, origins) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(dotted, origins, "a mapping", value)
        return {str(k): (_cast(v, args[1], dotted, origins) if args else v) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _type_error(dotted, origins, "true or false", value)
    if hint is int:
        if isinstance(value, bool):
            raise _type_error(dotted, origins, "an integer", value)
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise _type_error(dotted, origins, "an integer", value) from None
        if not as_float.is_integer():
            raise _type_error(dotted, origins, "an integer", value)
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise _type_error(dotted, origins, "a number", value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _type_error(dotted, origins, "a number", value) from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise _type_error(dotted, origins, "a string", value)
        return "" if value is None else str(value)
    return value


def _type_error(dotted: str, origins: dict[str, str], expected: str, got: Any) -> CrossrankError:
    return CrossrankError(f"{origins.get(dotted, 'config')}: {dotted} has the wrong type "
                          f"(expected {expected}, got {got!r})")


# ---------------------------------------------------------------------------------------------------------
# The run configuration shared by train.py and infer.py. Defaults here are the multi-stage seed's recipe
# (see configs/defaults.yaml, which states them again for users to read and edit).


@dataclasses.dataclass
class ModelConfig:
    name: str = "bert"  # short name used in output folder names (configs/backbones/<name>.yaml)
    path: str = ""  # Hugging Face id or local folder of the backbone or checkpoint
    kind: str = "mono"  # mono | set-encoder
    truncation: str = "pair"  # pair: the (query, passage) pair cut to max_length; per_field: each field alone
    max_length: int = 256
    query_length: int = 32
    passage_length: int = 256
    gradient_checkpointing: bool = False
    # the multi-stage seed trains with the position embeddings frozen (its freeze_position_embeddings: true)
    freeze_position_embeddings: bool = True
    freeze_layers: int = 0  # the embeddings and the first N transformer layers keep their weights (0 = all train)
    # Set-Encoder: each query's [INT] attention set (the reference's `depth`), whatever a training list holds
    depth: int = 100
    # Set-Encoder, training: fill the set's missing slots (depth - list length) with Gaussian pseudo-states
    # (crossrank.models.set_encoder.pseudo_states), so that a stage-1 list of 9 attends to 99 others, as at inference
    sample_missing_docs: bool = False
    # Set-Encoder, inference: fill them too, as the reference does (noise from a fixed-seed generator per forward
    # pass, so scores are reproducible); default off: a list shorter than depth attends to its own passages only
    sample_at_inference: bool = False


SAMPLINGS = ("single_relevant", "top", "random", "log_random")  # crossrank.training.data.sample_candidates
TARGETS = ("relevance", "relevant", "teacher_rank", "teacher_score")  # crossrank.training.data.targets_of


def either(values: tuple[str, ...]) -> str:
    """`a, b or c`: the allowed values as an error message spells them."""
    return f"{', '.join(values[:-1])} or {values[-1]}"


@dataclasses.dataclass
class DataConfig:
    dataset: str = "demo"  # configs/datasets/<dataset>.yaml: where topics, corpus, qrels and runs are
    train: str = ""  # folder written by preprocessing.py (default: data/<dataset>/<source>)
    sampling: str = "single_relevant"  # single_relevant | top | random | log_random
    num_negatives: int = 99
    depth: int = 200  # how deep into the first-stage run negatives are drawn from
    targets: str = "relevance"  # relevance | relevant (0/1 at relevant_level) | teacher_rank (depth + 1 - rank) | teacher_score
    # single_relevant's positives: qrels grade >= relevant_level; 0 = the dataset's rel_level as recorded by
    # preprocessing.py (MS MARCO 1; graded TREC-style qrels 2) (crossrank.training.data.is_relevant)
    relevant_level: int = 0
    # single_relevant: draw the positive from all judged-relevant passages, also those the first stage missed (not
    # in its top depth or not retrieved at all), as the reference's add_docs_not_in_ranking
    add_missing_relevant: bool = False
    # Set-Encoder stage 1: one passage of each list is copied into it; the duplicate head learns to spot the copy
    duplicate: bool = False
    novelty: bool = False  # Set-Encoder novelty variant: only a Jaccard cluster's best-scored member keeps its target
    # mono CL (single_relevant): keep a query with no relevant passage in its top data.depth, as the multi-stage
    # seed does (random candidates, all targets 0: LCE's class is the first one); false drops it (docs/reference-options.md 2)
    keep_no_positive: bool = False
    # drop a training query with fewer candidates (top data.depth, plus missing relevant ones when added), as
    # lightning-ir's sample_size does; 0 keeps all (docs/reference-options.md 5). (The example stream is a function
    # of train.seed and the cursor only, so a resumed run sees the same examples.)
    min_candidates: int = 0


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear (warm up, then decay to 0)
    grad_clip: float = 10.0  # max global gradient norm; 0 = no clipping


@dataclasses.dataclass
class TrainConfig:
    stage: int = 1
    objective: str = "CL"  # CL | KD | BCE
    previous: str = ""  # objective of the stage-1 model a stage-2 run starts from (default: the other one)
    loss: str = "lce"  # a key of crossrank.training.losses.LOSSES
    queries_per_batch: int = 4  # per process and micro-step (-b)
    accumulation: int = 4  # micro-steps per optimiser step over all processes (divided by the number of GPUs)
    epochs: int = 1
    max_steps: int = 0  # optimiser steps; 0 = epochs decide
    seed: int = 42
    precision: str = "bf16"  # bf16 | fp16 (with a gradient scaler) | fp32: autocast on CUDA; CPU runs fp32
    # on a CPU: fp32 | bf16 (autocast) | auto (bf16 where the CPU has it natively, amx_bf16 or avx512_bf16, as
    # eval.precision=auto decides). bf16 with AMX: ~2x fp32's training pairs/s; without native bf16: slower
    cpu_precision: str = "fp32"
    eval_every: int = 500  # optimiser steps between validations (and at the end)
    save_every: int = 500  # optimiser steps between resumable checkpoints (and on SIGTERM/SIGUSR1, at the end)
    log_every: int = 10  # optimiser steps between metrics.jsonl rows
    select_metric: str = "nDCG@10"  # ir_measures measure that picks the best checkpoint on validation
    models_dir: str = "models"  # where run folders are written and stage-1 models are looked up
    output_dir: str = ""  # default: <models_dir>/<name>.<objectives>.f<stage>[.<dataset>][.from-<hash>].lr<lr>.s<seed>
    init_from: str = ""  # stage 2: start from this model folder instead of looking the stage-1 one up
    previous_lr: float = 0.0  # stage 2: the stage-1 run's lr, when several stage-1 runs match (0 = any)
    previous_seed: int = -1  # stage 2: the stage-1 run's seed, when several match (-1 = any: not train.seed)
    report_to: list[str] = dataclasses.field(default_factory=list)  # tensorboard and/or wandb (if installed)
    duplicate_weight: float = 1.0  # Set-Encoder stage 1: loss = ranking loss + duplicate_weight x duplicate BCE
    # crossrank (both copies positive, BCE over every passage) | reference (webis-de/set-encoder's
    # RepeatCrossEntropyLoss: the originals only, the copied one positive, pos_weight -0.5; docs/reference-options.md 1)
    duplicate_loss: str = "crossrank"
    eval_unit: str = "step"  # what train.eval_every counts: step (optimiser steps) | micro_batch (the seed's Lightning)
    novelty_ties: str = "first"  # NA-RankNet: first (one winner per cluster) | all (every member tied at the top)
    batch_tokens: int = 4096  # mono: a micro-batch is scored in length-sorted chunks of at most this many padded tokens
    score_grad: str = "auto"  # mono: straight (one graph) | cached (GradCache: one chunk's memory) | auto (per query group)


@dataclasses.dataclass
class EvalConfig:
    dataset: str = ""  # configs/datasets key to re-rank; indomain / outofdomain are lists of keys
    first_stage: str = "bm25"  # a key of the dataset's runs
    depth: int = 100
    batch_tokens: int = 16384  # inference batches hold about this many (padded) tokens
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["nDCG@10", "RR@10", "AP", "R@100", "R@1000"])
    block_queries: int = 16  # queries per unit of work (sharding, resume); batches never span blocks
    score_cache: str = ""  # SQLite file caching scores by (model, query, docno); empty = no cache
    correction: str = ""  # p-value correction over compared runs: "" or holm
    lenient: bool = False  # skip (and report) run lines whose qid/docno is unknown instead of failing
    compile: bool = False  # torch.compile the model: ~1 min to compile, then faster (worth it for big runs)
    precision: str = "auto"  # auto (CUDA: bf16; CPU: by its flags, crossrank/models/precision.py) | bf16 | fp16 | fp32 | int8
    novelty: bool = False  # also report α-nDCG@10 (α = 0.99) with Jaccard clusters of judged passages as subtopics
    # how those subtopics are made: reference (the Set-Encoder's code: all judged passages, NLTK tokens, grade >= 1
    # relevant) | relevant_words (crossrank's earlier one: grade >= rel_level passages, lower-cased words)
    novelty_subtopics: str = "reference"


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> "RunConfig":
        """Cross-field rules that a single field's type cannot express."""
        checks = [
            (self.model.kind in ("mono", "set-encoder"), "model.kind", "mono or set-encoder", self.model.kind),
            (self.model.truncation in ("pair", "per_field"), "model.truncation", "pair or per_field",
             self.model.truncation),
            (self.train.stage in (1, 2), "train.stage", "1 or 2", self.train.stage),
            (self.train.objective in ("CL", "KD", "BCE"), "train.objective", "CL, KD or BCE",
             self.train.objective),
            (self.train.score_grad in ("auto", "straight", "cached"), "train.score_grad", "auto, straight or cached",
             self.train.score_grad),
            (self.train.precision in ("bf16", "fp16", "fp32"), "train.precision", "bf16, fp16 or fp32",
             self.train.precision),
            (self.train.cpu_precision in ("auto", "bf16", "fp32"), "train.cpu_precision", "auto, bf16 or fp32",
             self.train.cpu_precision),
            (self.eval.precision in ("auto", "bf16", "fp16", "fp32", "int8"), "eval.precision",
             "auto, bf16, fp16, fp32 or int8", self.eval.precision),
            (self.data.sampling in SAMPLINGS, "data.sampling", either(SAMPLINGS), self.data.sampling),
            (self.data.targets in TARGETS, "data.targets", either(TARGETS), self.data.targets),
            (self.optim.schedule in ("constant", "linear"), "optim.schedule", "constant or linear",
             self.optim.schedule),
            (self.eval.novelty_subtopics in ("reference", "relevant_words"), "eval.novelty_subtopics",
             "reference or relevant_words", self.eval.novelty_subtopics),
            (self.train.duplicate_loss in ("crossrank", "reference"), "train.duplicate_loss",
             "crossrank or reference", self.train.duplicate_loss),
            (self.train.eval_unit in ("step", "micro_batch"), "train.eval_unit", "step or micro_batch",
             self.train.eval_unit),
            (self.train.novelty_ties in ("first", "all"), "train.novelty_ties", "first or all",
             self.train.novelty_ties),
            (set(self.train.report_to) <= {"tensorboard", "wandb"}, "train.report_to",
             "a list of tensorboard, wandb", self.train.report_to),
            # names that become parts of file names (run folders, runs/<dataset>.<first_stage>.<model>.run)
            (not self.model.name or is_name(self.model.name), "model.name", f"a name ({NAME_RULE})",
             self.model.name),
            (self.train.previous in ("", "CL", "KD", "BCE"), "train.previous", "empty, CL, KD or BCE",
             self.train.previous),
            (is_name(self.eval.first_stage), "eval.first_stage", f"a run key of the dataset ({NAME_RULE})",
             self.eval.first_stage),
            (is_name(self.data.dataset) or self.data.dataset.endswith((".yaml", ".yml")), "data.dataset",
             f"a configs/datasets name ({NAME_RULE}) or a path to a .yaml file", self.data.dataset),
        ]
        listwise = self.model.kind == "set-encoder"
        checks += [  # the Set-Encoder's conventions and the parts only it has
            (not listwise or self.model.truncation == "per_field", "model.truncation",
             "per_field with model.kind=set-encoder (query and passage cut on their own)", self.model.truncation),
            (listwise or not self.data.duplicate, "data.duplicate", "false unless model.kind=set-encoder "
             "(only the Set-Encoder has a duplicate head)", self.data.duplicate),
            (listwise or not self.model.sample_missing_docs, "model.sample_missing_docs",
             "false unless model.kind=set-encoder", self.model.sample_missing_docs),
            (listwise or not self.model.sample_at_inference, "model.sample_at_inference",
             "false unless model.kind=set-encoder", self.model.sample_at_inference),
            (self.model.depth > 0, "model.depth", "a positive integer", self.model.depth),
            (self.data.num_negatives <= self.data.depth, "data.num_negatives",
             f"at most data.depth={self.data.depth}: negatives are drawn from the top data.depth passages",
             self.data.num_negatives),
        ]
        for key, (low, excluded) in NUMBER_RANGES.items():
            section, field = key.split(".")
            value = getattr(getattr(self, section), field)
            ok = math.isfinite(value) and (value > low if excluded else value >= low)
            checks.append((ok, key, f"a number > {low}" if excluded else f"{low} or more", value))
        origins = getattr(self, "_origins", {})
        for ok, key, expected, got in checks:
            if not ok:
                raise CrossrankError(f"{origins.get(key, 'config')}: {key} is invalid (expected {expected}, "
                                     f"got {got!r})")
        return self


# Every number of a RunConfig and its lower bound: (bound, bound excluded). Every value must be
# finite. Checked where the config enters (RunConfig.validate), so a bad value never reaches the loop
# (e.g. train.eval_every=0 would divide by zero after the first step).
NUMBER_RANGES: dict[str, tuple[float, bool]] = {
    "model.max_length": (8, False),  # room for the special tokens and some text
    "model.query_length": (1, False),
    "model.passage_length": (1, False),
    "model.depth": (1, False),  # the Set-Encoder's [INT] attention set
    "model.freeze_layers": (0, False),
    "data.num_negatives": (1, False),
    "data.depth": (1, False),
    "data.relevant_level": (0, False),  # 0 = the dataset's rel_level
    "data.min_candidates": (0, False),  # 0 = keep every query
    "optim.lr": (0, True),
    "optim.weight_decay": (0, False),
    "optim.warmup_steps": (0, False),
    "optim.grad_clip": (0, False),  # 0 = no clipping
    "train.queries_per_batch": (1, False),
    "train.accumulation": (1, False),
    "train.epochs": (1, False),
    "train.max_steps": (0, False),  # 0 = train.epochs decide
    "train.seed": (0, False),
    "train.eval_every": (1, False),
    "train.save_every": (1, False),
    "train.log_every": (1, False),
    "train.previous_lr": (0, False),  # 0 = any
    "train.previous_seed": (-1, False),  # -1 = any
    "train.duplicate_weight": (0, False),
    "train.batch_tokens": (1, False),
    "eval.depth": (1, False),
    "eval.batch_tokens": (1, False),
    "eval.block_queries": (1, False),
}


def load_run_config(files: list[str | os.PathLike] = (), overrides: list[str] = ()) -> RunConfig:
    """`configs/defaults.yaml`, then `files`, then `overrides`, validated."""
    return load(RunConfig, [CONFIGS / "defaults.yaml", *files], overrides).validate()
