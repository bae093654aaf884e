"""Training files: first-stage or teacher rankings per query, split into train and validation queries.

`preprocessing.py` writes, for one dataset and one objective, a folder `data/<dataset>/<objective>/` in the
format of `crossrank.training.examples` (train/valid parquet, meta.yaml).
Validation queries are chosen by a seeded hash of the qid (`is_validation`), so the split does not depend on
file order, is the same in a streaming pass as in memory, and is disjoint by construction.
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING


from crossrank.data.files import GZIP_ERRORS, decode_line, read_text, text_lines
from crossrank.data.atomic import atomic_write
from crossrank.data.outputs import output_lock, refuse_overwriting_inputs
from crossrank.errors import CrossrankError
from crossrank.data.runs import read_run
from crossrank.teacher.rankgpt import parse_permutation  # one parser for the teacher's answers, ours or RankGPT's
from crossrank.data.runs import group_starts, read_run_blocks
from crossrank.training.examples import TrainingQuery, is_validation, split_writers, write_meta, write_split, parquet_schema

if TYPE_CHECKING:
    pass

# ---------------------------------------------------------------------------------------------------------
# Building the training folders

SPLITS = ("hash", "sklearn")  # --split: how validation queries are chosen
TEXTS = ("dataset", "teacher")  # --texts: where RankGPT KD's query and passage texts come from


def sklearn_validation(qids: list[str], evalperc: float, seed: int) -> set[str]:
    """The multi-stage seed's split, `train_test_split(qids, test_size=evalperc / 100, random_state=seed)`
    (scikit-learn 1.x, numpy only): n_valid = ceil(evalperc / 100 * n) in float64, validation =
    qids[RandomState(seed).permutation(n)[:n_valid]]. `qids` in first-appearance order of the source."""
    import numpy as np

    n = len(qids)
    n_valid = math.ceil((evalperc / 100) * n)
    if not n or not n_valid:
        return set()
    return {qids[i] for i in np.random.RandomState(seed).permutation(n)[:n_valid]}


def _held_out(split: str, qids_in_order, evalperc: float, seed: int):
    """qid -> bool: is it a validation query (`hash`: `is_validation`; `sklearn`: `sklearn_validation`)."""
    if split not in SPLITS:
        raise CrossrankError(f"--split {split!r} is unknown (expected hash or sklearn)")
    if split == "hash":
        return lambda qid: is_validation(qid, evalperc, seed)
    valid = sklearn_validation(list(dict.fromkeys(qids_in_order() if callable(qids_in_order) else qids_in_order)),
                               evalperc, seed)
    return valid.__contains__


def _run_qids(run: str | Path, lenient: bool) -> list[str]:
    """The qids of a run in first-appearance order (a pass over its qid column, no text)."""
    qids: list[str] = []
    for table in read_run_blocks(run, lenient):
        qids.extend(table["qid"].take(group_starts(table)).to_pylist())
    return list(dict.fromkeys(qids))


def preprocess_run(run: str | Path, qrels: dict[str, dict[str, int]], out: str | Path, evalperc: float,
                   seed: int, depth: int | None = None, lenient: bool = False,
                   progress: bool = True, split: str = "hash", rel_level: int = 1) -> dict[str, int]:
    """Stream a run (first-stage for CL, or a teacher's ranking for KD) into `out/{train,valid}.parquet`.

    Each query keeps its top `depth` candidates (all when None), best first, and its judgements from `qrels`.
    Memory holds one 16 MiB block of the run at a time (plus the qrels). Returns counts for meta.yaml.
    """
    import numpy as np
    import pyarrow as pa
    from tqdm import tqdm

    counts = {"run_lines": 0, "kept_lines": 0, "train_queries": 0, "valid_queries": 0,
              "queries_without_relevant": 0}
    held = _held_out(split, lambda: _run_qids(run, lenient), evalperc, seed)
    bar = tqdm(unit=" lines", unit_scale=True, desc=f"reading {Path(run).name}", disable=not progress)
    with bar, split_writers(out) as writers:
        for table in read_run_blocks(run, lenient):
            counts["run_lines"] += table.num_rows
            starts = group_starts(table)
            sizes = np.diff(np.append(starts, table.num_rows))
            if depth is not None:
                position = np.arange(table.num_rows) - np.repeat(starts, sizes)  # rank - 1 within the query
                table = table.filter(pa.array(position < depth))
                sizes = np.minimum(sizes, depth)
                starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            counts["kept_lines"] += table.num_rows
            offsets = pa.array(np.append(starts, table.num_rows).astype(np.int32))
            qids = table["qid"].take(pa.array(starts)).to_pylist()
            judged = [qrels.get(qid, {}) for qid in qids]
            # at the dataset's rel_level, as training counts a positive (a grade-1 passage is not one on TREC DL)
            counts["queries_without_relevant"] += sum(1 for j in judged if not any(r >= rel_level for r in j.values()))
            rows = pa.Table.from_arrays([
                pa.array(qids, pa.string()),
                pa.ListArray.from_arrays(offsets, table["docno"].combine_chunks()),
                pa.ListArray.from_arrays(offsets, table["score"].combine_chunks().cast(pa.float32())),
                pa.array([list(j) for j in judged], pa.list_(pa.string())),
                pa.array([list(j.values()) for j in judged], pa.list_(pa.int32())),
            ], schema=parquet_schema())
            held_out = pa.array([held(qid) for qid in qids])
            writers["valid"].write_table(rows.filter(held_out))
            writers["train"].write_table(rows.filter(pa.compute.invert(held_out)))
            n_valid = int(np.count_nonzero(held_out.to_numpy(zero_copy_only=False)))
            counts["valid_queries"] += n_valid
            counts["train_queries"] += len(qids) - n_valid
            bar.update(table.num_rows)
        if counts["run_lines"] == 0:  # inside the block: no empty split replaces a good one
            raise CrossrankError(f"{run}: the run is empty (expected at least one line)")
    return counts


def preprocess_teacher_run(run: str | Path, qrels: dict[str, dict[str, int]], out: str | Path, evalperc: float,
                           seed: int, depth: int | None = None, lenient: bool = False,
                           split: str = "hash", rel_level: int = 1) -> dict[str, int]:
    """A teacher's TREC run -> KD folder `out/{train,valid}.parquet`, each query in the teacher's order.

    The order comes from the rank column (ties in rank keep file order), not from the scores: teacher files'
    scores can be constant or stale. The scores are kept as they are (`data.targets=teacher_score` reads
    them); a query whose scores are not non-increasing in rank order counts in `rank_score_disagreements`.
    Teacher runs are small (a top-20 or top-100 per query), so this reads them whole with the validating
    line reader (`crossrank.data.runs.read_run`, which names a bad `path:line`)."""
    rankings: dict[str, list[tuple[int, float, str]]] = {}
    for qid, docno, rank, score in read_run(run, lenient):
        rankings.setdefault(qid, []).append((rank, score, docno))
    if not rankings:
        raise CrossrankError(f"{run}: the run is empty (expected at least one line)")
    counts = {"run_lines": sum(len(rows) for rows in rankings.values()), "kept_lines": 0, "train_queries": 0,
              "valid_queries": 0, "queries_without_relevant": 0, "rank_score_disagreements": 0}
    queries: dict[str, list[TrainingQuery]] = {"train": [], "valid": []}
    held = _held_out(split, list(rankings), evalperc, seed)
    for qid, rows in rankings.items():
        rows.sort(key=lambda row: row[0])  # stable: equal ranks keep their file order
        scores = [score for _, score, _ in rows]
        counts["rank_score_disagreements"] += any(a < b for a, b in zip(scores, scores[1:]))
        rows = rows[:depth] if depth is not None else rows
        counts["kept_lines"] += len(rows)
        judged = qrels.get(qid, {})
        counts["queries_without_relevant"] += not any(r >= rel_level for r in judged.values())
        part = "valid" if held(qid) else "train"
        queries[part].append(TrainingQuery(qid, [d for _, _, d in rows], [s for _, s, _ in rows], dict(judged)))
    for part, rows in queries.items():
        counts[f"{part}_queries"] = write_split(out, part, rows)
    if counts["rank_score_disagreements"]:
        print(f"note: {run}: in {counts['rank_score_disagreements']} of {len(rankings)} queries the scores do not "
              f"follow the rank column; the teacher order is taken from the ranks", file=sys.stderr)
    return counts


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a JSONL file, or of the single .jsonl member of a .zip (RankGPT ships
    `marco-train-100k.jsonl.zip`); invalid UTF-8 and a damaged file are CrossrankErrors."""
    import zipfile

    if path.suffix != ".zip":
        yield from ((number, line) for number, line, _ in text_lines(path))
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.endswith(".jsonl")]
            if len(members) != 1:
                raise CrossrankError(f"{path}: expected one .jsonl file in the zip, found {len(members)}")
            with archive.open(members[0]) as raw:
                for number, line in enumerate(raw, 1):
                    yield number, decode_line(f"{path}/{members[0]}", number, line)
    except (zipfile.BadZipFile, *GZIP_ERRORS) as e:
        raise CrossrankError(f"{path}: the zip file is truncated or corrupt ({e}; expected a complete .zip)") \
            from None


def _read_answers(path: Path) -> list:
    try:
        answers = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise CrossrankError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}; expected a JSON "
                             f"list of answers)") from None
    if not isinstance(answers, list):
        raise CrossrankError(f"{path}: expected a JSON list of answers (got {type(answers).__name__})")
    return answers


def _rankgpt_line(data: str | Path, number: int, line: str) -> tuple[dict, str, set[str], list[tuple[str, str]]]:
    """One line of RankGPT's JSONL -> (item, query text, positive docids, [(docid, text)] in first-stage order)."""
    try:
        item = json.loads(line)
        text, retrieved = item["query"], item["retrieved_passages"]
        positives = {str(p["docid"]) for p in item.get("positive_passages", [])}
        # the answer's [i] is the passage of first-stage rank i (RankGPT numbers them so)
        retrieved = sorted(retrieved, key=lambda p: p.get("rank", 0))
        docs = [(str(p["docid"]), p.get("text", "")) for p in retrieved]
        if not isinstance(text, str) or not all(isinstance(t, str) for _, t in docs):
            raise TypeError("query and passage texts must be strings")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CrossrankError(f"{data}:{number}: not a RankGPT training line ({type(e).__name__}: {e}; "
                             f"expected query, retrieved_passages[docid, text])") from None
    return item, text, positives, docs


def preprocess_rankgpt(data: str | Path, answers: str | Path, out: str | Path, evalperc: float, seed: int,
                       topics: dict[str, str] | None = None, repair: bool = False, split: str = "hash",
                       texts: str = "teacher") -> dict[str, int]:
    """RankGPT's distillation files -> KD training folder.

    `data` is RankGPT's JSONL, or the zip holding it (one query per line: `query_id`, `query`,
    `positive_passages`, `retrieved_passages`, each passage `{docid, rank, text}`); `answers` is the JSON list
    of the teacher's answers (`[3] > [1] > ...`), one per line of `data`, parsed as rank_gpt.py parses answers
    (`crossrank.teacher.rankgpt.parse_permutation`). The teacher order becomes scores `depth - rank + 1`; positives
    become judgements (rel 1).
    An answer that is not a permutation of exactly the query's passages (all 20 ids, each once, nothing else) is
    dropped with its query, as the multi-stage seed does (~90.7k of RankGPT-3.5's 100k survive); `repair`
    keeps it with RankGPT's repair instead (missing ids appended in first-stage order). The counts hold both
    figures: `well_formed_answers` and `malformed_answers` (dropped, or repaired).
    Query and passage texts are written once each (`topics.tsv`, `passages.tsv`, deduplicated) next to the
    splits, and qids are MS MARCO's when `topics` (qid -> text) knows the query text, else `rankgpt-<line>`.
    `texts="dataset"` (the references: training reads the dataset's texts) takes each qid from the line's
    `query_id` (an answer without one is an error naming the line) and writes no text files.
    """
    answer_list = _read_answers(Path(answers))
    qid_of_text = {text: qid for qid, text in (topics or {}).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept: list[TrainingQuery] = []
    counts = {"queries": 0, "well_formed_answers": 0, "malformed_answers": 0, "malformed_repaired": int(repair),
              "train_queries": 0, "valid_queries": 0}
    passages: dict[str, str] = {}
    query_texts: dict[str, str] = {}
    for number, line in _jsonl_lines(Path(data)):
        if not line.strip():
            continue
        item, text, positives, docs = _rankgpt_line(data, number, line)
        if counts["queries"] >= len(answer_list):
            raise CrossrankError(f"{answers}: has {len(answer_list)} answers but {data} has more lines "
                                 f"(expected one answer per line)")
        order, problems = parse_permutation(str(answer_list[counts["queries"]]), len(docs))
        counts["queries"] += 1
        counts["malformed_answers" if problems else "well_formed_answers"] += 1
        if problems and not repair:
            continue
        if texts == "dataset":
            if not (item.get("qid") or item.get("query_id")):
                raise CrossrankError(f"{data}:{number}: no query_id (expected one with --texts dataset, which "
                                     f"reads the dataset's texts by qid; --texts teacher uses the line's text)")
            qid = str(item.get("qid") or item.get("query_id"))
        else:
            qid = str(item.get("qid") or item.get("query_id") or qid_of_text.get(text) or f"rankgpt-{number}")
            query_texts[qid] = text
            passages.update((d, t) for d, t in docs if t)
        ranked = [docs[i][0] for i in order]
        kept.append(TrainingQuery(qid, ranked, [float(len(ranked) - r) for r in range(len(ranked))],
                                  {d: 1 for d in positives}))
    held = _held_out(split, [q.qid for q in kept], evalperc, seed)
    queries: dict[str, list[TrainingQuery]] = {"train": [], "valid": []}
    for query in kept:
        queries["valid" if held(query.qid) else "train"].append(query)
    for part, rows in queries.items():
        counts[f"{part}_queries"] = write_split(out, part, rows)
    if texts == "dataset":
        return counts
    with atomic_write(out / "topics.tsv") as f:
        f.writelines(f"{qid}\t{' '.join(text.split())}\n" for qid, text in query_texts.items())
    with atomic_write(out / "passages.tsv") as f:
        f.writelines(f"{docno}\t{' '.join(text.split())}\n" for docno, text in passages.items())
    return counts


# Short names of the seeds' training sets: (dataset config, objective).
PRESETS = {"colbert": ("msmarco-train", "CL"), "rankgpt": ("msmarco-train", "KD")}


def prepare(dataset: str, objective: str = "", run: str = "", evalperc: float = 1.0, seed: int = 42,
            depth: int | None = None, out: str = "", lenient: bool = False, repair: bool = False,
            split: str = "sklearn", texts: str = "dataset") -> Path:
    """Build `data/<dataset>/<objective>/` from a dataset config: CL from one of its runs (hard negatives,
    judged by its qrels), KD from its teacher ranking (RankGPT files: malformed answers dropped unless
    `repair`; a TREC run: ordered by its rank column). `dataset` is a preset (colbert, rankgpt), a key of
    configs/datasets or a YAML path. Returns the folder."""
    from crossrank import config
    from crossrank.data.datasets import load_dataset

    if not 0 <= evalperc < 100:
        raise CrossrankError(f"--evalperc {evalperc} is out of range (expected a percentage in [0, 100))")
    key, preset_objective = PRESETS.get(dataset, (dataset, ""))
    objective = objective or preset_objective or "CL"
    if objective not in ("CL", "KD"):
        raise CrossrankError(f"--objective {objective!r} is unknown (expected CL or KD)")
    if split not in SPLITS:
        raise CrossrankError(f"--split {split!r} is unknown (expected hash or sklearn)")
    if texts not in TEXTS:
        raise CrossrankError(f"--texts {texts!r} is unknown (expected dataset or teacher)")
    ds = load_dataset(key)
    folder = Path(out) if out else config.ROOT / "data" / ds.name / objective
    flag = "--out" if out else "the default output folder"
    rankgpt = objective == "KD" and ds.teacher.endswith((".jsonl", ".jsonl.zip", ".zip"))  # texts copied too
    written = ("train.parquet", "valid.parquet", "meta.yaml") + (("topics.tsv", "passages.tsv") if rankgpt else ())
    refuse_overwriting_inputs([(flag, folder)] + [(f"{flag}'s {name}", folder / name) for name in written],
                              ds.inputs() + ([("the --run file", run)] if run and Path(run).is_file() else []))
    with output_lock(folder):  # one writer per training folder
        return _prepare(ds, folder, objective, run, evalperc, seed, depth, lenient, repair, split, texts)


def _prepare(ds, folder: Path, objective: str, run: str, evalperc: float, seed: int, depth: int | None,
             lenient: bool, repair: bool, split: str, texts: str) -> Path:
    from crossrank.data.qrels import read_qrels
    from crossrank.data.texts import read_topics

    meta = {"dataset": ds.name, "objective": objective, "evalperc": evalperc, "seed": seed, "rel_level": ds.rel_level,
            "topics": ds.source("topics"), "corpus": ds.source("corpus"),
            "qrels": ds.source("qrels") if ds.qrels else "", "split": split}
    if objective == "KD" and ds.teacher.endswith((".jsonl", ".jsonl.zip", ".zip")):
        topics = read_topics(meta["topics"], lenient) if Path(meta["topics"]).is_file() else None
        meta["source"] = ds.source("teacher")
        counts = preprocess_rankgpt(meta["source"], ds.source("teacher_answers"), folder, evalperc, seed, topics,
                                    repair, split, texts)
        meta["texts"] = texts
        if texts == "teacher":  # texts from RankGPT's file: point training at the copies written next to the splits
            meta["topics"], meta["corpus"] = str(folder / "topics.tsv"), str(folder / "passages.tsv")
    else:
        meta["source"] = ds.source("teacher") if objective == "KD" else ds.run(run or next(iter(ds.runs), ""))
        qrels = read_qrels(meta["qrels"], lenient) if meta["qrels"] else {}
        build = preprocess_teacher_run if objective == "KD" else preprocess_run  # KD: the rank column decides
        counts = build(meta["source"], qrels, folder, evalperc, seed, depth, lenient, split=split, rel_level=ds.rel_level)
    meta["counts"] = counts
    write_meta(folder, meta)
    return folder
