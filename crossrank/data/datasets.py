"""Dataset configs: where a collection's corpus, topics, qrels and first-stage runs are.

One YAML per dataset under `configs/datasets/` (or any YAML path). Every source is a local path (relative
paths are resolved against the project folder; `$VARS` and `~` are expanded) or an `irds:<id>`:

    name: dl19
    corpus: irds:msmarco-passage
    topics: irds:msmarco-passage/trec-dl-2019/judged
    qrels: irds:msmarco-passage/trec-dl-2019/judged
    runs: {bm25: runs/dl19.bm25.run}
    rel_level: 2          # binary measures (RR, AP, R@k) count rel >= 2, as TREC DL does
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from crossrank import config
from crossrank.data.irds import IRDS_PREFIX
from crossrank.errors import CrossrankError


@dataclasses.dataclass
class DatasetConfig:
    name: str = ""
    corpus: str = ""
    topics: str = ""
    qrels: str = ""
    runs: dict[str, str] = dataclasses.field(default_factory=dict)
    rel_level: int = 1  # minimum relevance that binary measures count as relevant
    # training data only: a teacher's ranking (for KD) and the run negatives are mined from (for CL)
    teacher: str = ""  # a TREC run in the teacher's order, or RankGPT's JSONL (then teacher_answers too)
    teacher_answers: str = ""  # RankGPT's JSON list of answers ("[3] > [1] > ..."), one per JSONL line
    description: str = ""

    def source(self, field: str) -> str:
        """A source with variables expanded and relative paths made absolute; empty is an error."""
        value = getattr(self, field)
        if not value:
            raise CrossrankError(f"dataset {self.name}: no {field} configured (set {field}: in its YAML)")
        return resolve_source(value)

    def run(self, key: str) -> str:
        if key in self.runs:
            return resolve_source(self.runs[key])
        if Path(os.path.expandvars(key)).expanduser().is_file():
            return resolve_source(key)
        raise CrossrankError(f"dataset {self.name}: no run {key!r} (expected one of "
                             f"{', '.join(self.runs) or 'none configured'}, or a path to a run file)")


    def inputs(self, produced_run: str = "", produced_teacher: bool = False) -> list[tuple[str, str]]:
        """(what, path) of every local file the dataset lists (corpus, topics, qrels, runs, teacher files) and its
        YAML, for `refuse_overwriting_inputs`; `produced_run` is the run key the command writes itself (bm25's
        `bm25`), `produced_teacher` the teacher ranking rank_gpt.py writes: those are outputs, not inputs."""
        what = f"dataset {self.name}'s"
        found = [(f"{what} config", getattr(self, "file", ""))]
        found += [(f"{what} {field}", resolve_source(getattr(self, field))) for field in ("corpus", "topics", "qrels")
                  if getattr(self, field)]
        found += [(f"{what} run {key!r}", resolve_source(path)) for key, path in self.runs.items()
                  if path and key != produced_run]
        found += [(f"{what} {field}", resolve_source(getattr(self, field))) for field in ("teacher", "teacher_answers")
                  if getattr(self, field) and not produced_teacher]
        return found


def resolve_source(value: str) -> str:
    if value.startswith(IRDS_PREFIX):
        return value
    path = Path(os.path.expandvars(value)).expanduser()
    return str(path if path.is_absolute() else config.ROOT / path)


def load_dataset(key: str) -> DatasetConfig:
    """Load `configs/datasets/<key>.yaml` (or a YAML path); the name defaults to the key."""
    file = config.resolve_config_file(key, "datasets")
    dataset = config.load(DatasetConfig, [file])
    origin = dataset._origins.get("name") if dataset.name else f"{file} (its file name; set name: in it)"
    dataset.name = config.check_name(dataset.name or Path(key).stem, origin, "dataset name")
    dataset.file = str(file)
    return dataset
