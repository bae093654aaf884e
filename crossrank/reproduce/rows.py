"""configs/reproduce/rows.yaml as typed steps: the chain of one paper row (first stages, preprocessing, training,
re-ranking of every evaluation set x first stage, table), or its `--tiny` smoke variant on the demo collection.

Commands keep the placeholders `{model:STEP}`, `{hash:STEP}`, `{run_name:STEP}` until the step runs (they name
folders that exist only once STEP finished); `{gpus}` and `{threads}` are filled in when the plan is built.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import yaml

from crossrank.config import CONFIGS
from crossrank.errors import CrossrankError

ROWS_FILE = CONFIGS / "reproduce" / "rows.yaml"
PLACEHOLDER = re.compile(r"\{(model|hash|run_name):([A-Za-z0-9_.-]+)\}")


@dataclasses.dataclass
class Step:
    id: str
    kind: str                     # first_stage | preprocessing | training | rerank | table
    command: str                  # what a user would type (placeholders until resolved)
    inputs: list[str]             # files, folders or irds:<id>, read by the step
    outputs: list[str]            # files or folders written by the step (training: resolved when it runs)
    needs: list[str] = dataclasses.field(default_factory=list)
    data: list[str] = dataclasses.field(default_factory=list)   # rows.yaml `data:` keys
    gpu_hours: float = 0.0
    note: str = ""
    # training: the configs and overrides of train.py (the folder name is computed from them)
    configs: list[str] = dataclasses.field(default_factory=list)
    overrides: list[str] = dataclasses.field(default_factory=list)
    output_template: str = ""     # training: rows.yaml's model path with placeholders (for --dry-run)
    # rerank: what the table needs
    dataset: str = ""
    first_stage: str = ""
    model_step: str = ""
    # what the record compares: the command with the GPU ids, thread count and launcher left out, so that running
    # the same step on other GPUs (or under SLURM) does not redo it
    key: str = ""


@dataclasses.dataclass
class Plan:
    row: str
    spec: dict                    # the row's rows.yaml entry
    steps: list[Step]
    tiny: bool
    data: dict                    # rows.yaml `data:`
    first_stage_expected: dict
    gpus: str
    known_rows: list[str]

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise CrossrankError(f"row {self.row}: no step {step_id!r} (expected one of: "
                             f"{', '.join(s.id for s in self.steps)})")


def load_rows(path: Path = ROWS_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def row_names(tree: dict) -> list[str]:
    return list(tree["rows"])


def eval_pairs(spec: dict) -> list[tuple[str, str]]:
    """(dataset, first stage) pairs of a row's `eval` (flat, or in_domain + out_of_domain)."""
    blocks = [spec] if "datasets" in spec else [spec[k] for k in ("in_domain", "out_of_domain") if k in spec]
    return [(d, f) for block in blocks for d in block["datasets"] for f in block["first_stages"]]


def _training_parts(command: str) -> tuple[list[str], list[str]]:
    """`python train.py --config a.yaml k=v ...` -> (["a.yaml"], ["k=v", ...])."""
    words = shlex.split(command)
    words = words[words.index("train.py") + 1:]
    configs, overrides, i = [], [], 0
    while i < len(words):
        if words[i] == "--config":
            configs.append(words[i + 1])
            i += 2
        else:
            overrides.append(words[i])
            i += 1
    return configs, overrides


def train_command(configs: list[str], overrides: list[str], gpus: str) -> str:
    n = len([g for g in gpus.split(",") if g]) if gpus not in ("", "cpu") else 1
    launch = f"torchrun --standalone --nproc_per_node {n}" if n > 1 else "python"
    return " ".join([launch, "train.py", *(f"--config {c}" for c in configs), *map(shlex.quote, overrides)])


def _fill(text: str, gpus: str, threads: int) -> str:
    return text.replace("{gpus}", gpus).replace("{threads}", str(threads))


def _outputs(value) -> list[str]:
    return list(value.values()) if isinstance(value, dict) else list(value or [])


TINY_DATA_STEPS = {  # the demo collection's first stages (python -m crossrank demo; PISA BM25)
    "demo": ("python -m crossrank demo", [], ["data/demo/corpus.tsv", "data/demo/topics.train.tsv",
             "data/demo/topics.test.tsv", "data/demo/qrels.train.txt", "data/demo/qrels.test.txt",
             "data/demo/teacher.train.run"], []),
    "bm25-demo": ("./create_bm25_baseline_run.sh -d demo -k 100", ["configs/datasets/demo.yaml", "data/demo/corpus.tsv",
                  "data/demo/topics.train.tsv"], ["runs/demo.bm25.run"], ["demo"]),
    "bm25-demo-test": ("./create_bm25_baseline_run.sh -d demo-test -k 100", ["configs/datasets/demo-test.yaml",
                       "data/demo/corpus.tsv", "data/demo/topics.test.tsv"], ["runs/demo-test.bm25.run"], ["demo"]),
}


def _tiny_objective(prep_id: str, command: str) -> str:
    match = re.search(r"--objective (CL|KD)", command)
    if match:
        return match.group(1)
    return "CL" if "--dataset colbert" in command or prep_id.endswith("-CL") else "KD"


SHARED_RUNS = "trec-dl/original/set-encoder/data/runs/first-stage-trec-dl"


def shared_data() -> Path | None:
    """../shared/data beside the project when it holds TREC DL 2019/2020 and the papers' first-stage runs."""
    from crossrank.config import ROOT

    shared = ROOT.parent / "shared" / "data"
    needed = [shared / f"trec-dl/dl{y}/corpus.jsonl" for y in (19, 20)] + \
             [shared / SHARED_RUNS / f"__{f}__msmarco-passage-trec-dl-20{y}-judged.run" for f in ("bm25", "colbert")
              for y in (19, 20)]
    return shared if all(p.is_file() for p in needed) else None


def build_plan(row: str, tiny: bool = False, gpus: str | None = None, threads: int = 1,
               overrides: list[str] = (), tree: dict | None = None, shared: bool = False) -> Plan:
    """The row's steps; `tiny`: the smoke variant on the demo collection, which with `shared` (../shared/data
    present) re-ranks TREC DL 2019/2020 (the papers' imported runs, texts from ../shared/data) instead."""
    tree = tree or load_rows()
    names = row_names(tree)
    if row not in tree["rows"]:  # a recipe name: the row it completes (e.g. se-electra-stage2 -> se-electra)
        by_recipe = [r for r, spec in tree["rows"].items()
                     if spec.get("recipes") and Path(spec["recipes"][-1]).stem == row]
        if len(by_recipe) != 1:
            raise UnknownRow(row, names)
        row = by_recipe[0]
    spec = tree["rows"][row]
    steps_def = tree["steps"]
    gpus = gpus if gpus is not None else ("cpu" if tiny else "0")
    steps: list[Step] = []
    produced: dict[str, str] = {}   # first-stage run path -> step id

    # -- first stages
    if tiny:
        for sid, (command, inputs, outputs, needs) in TINY_DATA_STEPS.items():
            if shared and sid == "bm25-demo-test":
                continue
            steps.append(Step(sid, "first_stage", command, inputs, outputs, needs))
            for out in outputs:
                produced[out] = sid
        if shared:  # the papers' TREC DL runs, imported from ../shared/data's copy of webis-de/set-encoder
            local = f"../shared/data/{SHARED_RUNS}/"
            for sid in ("import-dl19-bm25", "import-dl20-bm25", "import-dl19-colbert", "import-dl20-colbert"):
                d = steps_def[sid]
                command = d["command"].replace("data/raw/set-encoder/", local)
                inputs = [i.replace("data/raw/set-encoder/", local) for i in d.get("inputs", [])]
                steps.append(Step(sid, "first_stage", command, inputs, _outputs(d.get("outputs")), key=command))
                for out in _outputs(d.get("outputs")):
                    produced[out] = sid
    else:
        for sid in spec.get("first_stages", []):
            d = steps_def[sid]
            steps.append(Step(sid, "first_stage", _fill(d["command"], gpus, threads), list(d.get("inputs", [])),
                              _outputs(d.get("outputs")), list(d.get("needs", [])), list(d.get("data", [])),
                              float(d.get("gpu_hours", 0) or 0), d.get("note", ""), key=d["command"]))
            for out in _outputs(d.get("outputs")):
                produced[out] = sid

    # -- preprocessing
    prep_out: dict[str, list[str]] = {}
    for sid in spec.get("preprocessing", []):
        d = steps_def[sid]
        if tiny:
            objective = _tiny_objective(sid, d["command"])
            evalperc = "0" if "--evalperc 0" in d["command"] else "10"
            folder = f"data/demo/{objective}"
            outputs = [f"{folder}/train.parquet", f"{folder}/meta.yaml"] + \
                      ([f"{folder}/valid.parquet"] if evalperc != "0" else [])
            inputs = ["configs/datasets/demo.yaml", "preprocessing.py"] + \
                     (["runs/demo.bm25.run"] if objective == "CL" else ["data/demo/teacher.train.run"])
            steps.append(Step(sid, "preprocessing",
                              f"python preprocessing.py --dataset demo --objective {objective} --evalperc {evalperc}",
                              inputs, outputs, ["demo", "bm25-demo"]))
            prep_out[sid] = outputs
        else:
            steps.append(Step(sid, "preprocessing", d["command"], list(d.get("inputs", [])) + ["preprocessing.py"],
                              _outputs(d.get("outputs")), list(d.get("needs", [])), list(d.get("data", [])),
                              float(d.get("gpu_hours", 0) or 0), d.get("note", "")))
            prep_out[sid] = _outputs(d.get("outputs"))

    # -- training
    tiny_block = tree.get("tiny", {}) or {}
    for sid in spec.get("training", []):
        d = steps_def[sid]
        configs, extra = _training_parts(d["command"])
        needs = list(d.get("needs", []))
        if tiny:
            name = _recipe_value(configs, "model", "name") or "model"
            extra = extra + list(tiny_block.get("overrides", [])) + ["data.dataset=demo", f"model.name=tiny-{name}",
                                                                    "eval.dataset=demo-test"]
        extra = extra + list(overrides)
        prep_needs = [n for n in needs if n in prep_out]
        inputs = list(configs) + ["configs/defaults.yaml"]
        for n in prep_needs:
            inputs += prep_out[n]
        if not prep_needs:  # a stage 2 whose data step is only named in the row (e.g. prep-ms-CL for KD-CL)
            for n in spec.get("preprocessing", []):
                if _prep_matches(steps_def[n]["command"], configs, tiny, n):
                    needs.append(n)
                    inputs += prep_out[n]
        inputs += [f"{{model:{ref}}}" for kind, ref in PLACEHOLDER.findall(" ".join(extra)) if kind == "model"]
        template = _outputs(d.get("outputs"))[0] if d.get("outputs") else ""
        steps.append(Step(sid, "training", train_command(configs, extra, gpus), inputs, [], needs, [],
                          0.0 if tiny else float(d.get("gpu_hours", 0) or 0), configs=configs, overrides=extra,
                          output_template=template, key=train_command(configs, extra, "")))

    # -- re-ranking
    model_step = spec["model"]["step"]
    rerank = tree["rerank"]
    flags = rerank["model_flags"].get(spec["model"].get("kind", "mono"), "")
    if tiny:
        block = tiny_block.get("eval", {"datasets": ["demo-test"], "first_stages": ["bm25"]})
        if shared:
            block = tiny_block.get("with_shared_data", block)
            block = {"datasets": [f"{d}-shared" for d in block["datasets"]], "first_stages": block["first_stages"]}
        pairs = [(d, f) for d in block["datasets"] for f in block["first_stages"]]
        depth = _override_value(list(tiny_block.get("overrides", [])) + list(overrides), "eval.depth",
                                last=True) or "30"
    else:
        pairs = eval_pairs(spec["eval"])
        depth = "100"
    per_set = rerank.get("gpu_hours", {})
    for dataset, first in pairs:
        run_path = _dataset_run(dataset, first)
        first_step = produced.get(run_path, "")
        lenient = " -L" if dataset.endswith("-shared") else ""  # ../shared/data lacks a few run passages
        command = (f"./inference-monoencoder.sh -M {{model:{model_step}}} -d {dataset} -r {first} -k {depth} "
                   f"-g {gpus}{flags}{lenient}")
        hours = 0.0 if tiny else float(per_set.get(dataset, per_set.get("beir-all-seven", 0.09) / 7
                                               if dataset.startswith("beir-") else 0.001))
        outputs = [f"runs/{dataset}.{first}.{{run_name:{model_step}}}.{ext}" for ext in ("run", "perquery.csv", "yaml")]
        steps.append(Step(f"rerank-{row}-{dataset}-{first}", "rerank", command,
                          [f"{{model:{model_step}}}", run_path, f"configs/datasets/{dataset}.yaml"],
                          outputs, [model_step] + ([first_step] if first_step else []), [], hours,
                          dataset=dataset, first_stage=first, model_step=model_step,
                          key=command.replace(f" -g {gpus}", " -g {gpus}")))

    # -- table
    reranks = [s for s in steps if s.kind == "rerank"]
    suffix = ".tiny" if tiny else ""
    steps.append(Step(f"table-{row}", "table", f"(in the driver) table of {row}{' (smoke run)' if tiny else ''}",
                      [o for s in reranks for o in s.outputs[:1]] + [s.inputs[1] for s in reranks],
                      [f"runs/reproduce/{row}{suffix}.md", f"runs/reproduce/{row}{suffix}.json"],
                      [s.id for s in reranks]))
    return Plan(row, spec, steps, tiny, tree.get("data", {}), tree.get("first_stage_expected", {}), gpus, names)


class UnknownRow(CrossrankError):
    def __init__(self, row: str, names: list[str]):
        super().__init__(f"unknown row {row!r}; rows: {', '.join(names)}")


def _recipe_value(configs: list[str], section: str, key: str):
    from crossrank.config import ROOT

    value = None
    for c in configs:
        path = Path(c) if Path(c).is_absolute() else ROOT / c
        if path.is_file():
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            value = (tree.get(section) or {}).get(key, value)
    return value


def _override_value(overrides: list[str], key: str, last: bool = False) -> str | None:
    found = None
    for o in overrides:
        if o.startswith(key + "="):
            found = o.split("=", 1)[1]
            if not last:
                return found
    return found


def _prep_matches(prep_command: str, configs: list[str], tiny: bool, prep_id: str) -> bool:
    """Whether a preprocessing step makes the training data of a recipe (its objective's folder)."""
    objective = _recipe_value(configs, "train", "objective") or ""
    return _tiny_objective(prep_id, prep_command) == objective


def _dataset_run(dataset: str, first_stage: str) -> str:
    """The project-relative path of a dataset's first-stage run (configs/datasets/<dataset>.yaml `runs:`)."""
    from crossrank.config import ROOT

    path = ROOT / "configs" / "datasets" / f"{dataset}.yaml"
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    run = ((tree or {}).get("runs") or {}).get(first_stage, f"runs/{dataset}.{first_stage}.run")
    return run
