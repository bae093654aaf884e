"""The experiment driver behind infer.py: find the checkpoint, re-rank every dataset of `eval.dataset` with
the inference engine (`crossrank.inference`), and write the run, its YAML, the per-query CSV, the nDCG@10
difference plot and the significance table against the first stage."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from pathlib import Path

from torch import nn

from crossrank import config
from crossrank.evaluation import metrics as evaluation
from crossrank.evaluation.report import report, write_per_run
from crossrank.config import read_yaml, resolve_config_file
from crossrank.models.encoding import PairTokenizer, empty_query_warning
from crossrank.data.datasets import load_dataset
from crossrank.distributed import Distributed, lock_outputs, setup_distributed
from crossrank.data.outputs import refuse_overwriting_inputs
from crossrank.inference.cache import check_score_cache, model_fingerprint
from crossrank.inference.candidates import load_candidates
from crossrank.inference.rerank import rerank, with_precision
from crossrank.models.card import explicit_keys
from crossrank.models.loading import load_model
from crossrank.errors import CrossrankError
from crossrank.data.texts import load_corpus
from crossrank.data.qrels import read_qrels
from crossrank.data.irds import is_irds
from crossrank.models.mono import check_model_source
from crossrank.training.naming import backbone_name, find_model, model_label, objective_chain
from crossrank.models.precision import cpu_flags, cpu_model, slow_precision_note


def dataset_keys(key: str) -> list[str]:
    """`dl19`, `dl19,dl20`, or a list YAML under configs/datasets/ (`datasets: [dl19, dl20]`, e.g. indomain)."""
    if not key:
        raise CrossrankError("config: eval.dataset is empty (expected a configs/datasets key, indomain or "
                             "outofdomain, e.g. eval.dataset=dl19 or -d dl19)")
    keys: list[str] = []
    for part in (p.strip() for p in key.split(",") if p.strip()):
        file = resolve_config_file(part, "datasets")
        tree = read_yaml(file)[0] or {}
        if not (isinstance(tree, dict) and "datasets" in tree):
            keys.append(part)
            continue
        listed = tree["datasets"]
        if not isinstance(listed, list) or not listed or not all(isinstance(k, str) and k.strip() for k in listed):
            raise CrossrankError(f"{file}: datasets must be a list of dataset keys (expected e.g. datasets: "
                                 f"[dl19, dl20], got {listed!r})")
        keys.extend(listed)
    return keys


def model_run_name(model_path: str | os.PathLike) -> str:
    """`models/bert.CL.f1.lr1e-05.s42/model` -> `bert.CL.f1.lr1e-05.s42`; other folders: their name."""
    path = Path(str(model_path).rstrip("/"))
    return path.parent.name if path.name == "model" and path.parent.name else backbone_name(str(path))


def output_run(dataset_name: str, first_stage: str, model_name: str) -> Path:
    """runs/<dataset>.<first stage>.<model>.run (every part a checked name: it stays in runs/)."""
    return config.ROOT / "runs" / f"{dataset_name}.{first_stage}.{model_name}.run"


def outputs_of(run: Path, key: str) -> list[tuple[str, Path]]:
    """What re-ranking one dataset writes: the run, its config, the per-query CSV and the nDCG@10 plot."""
    return [(f"the re-ranked run of {key}", run), (f"the run's config of {key}", run.with_suffix(".yaml")),
            (f"the per-query CSV of {key}", run.with_suffix(".perquery.csv")),
            (f"the nDCG@10 plot of {key}", run.with_suffix(".ndcg10-diff.png"))]


def rerank_dataset(cfg, model: nn.Module, tokenizer: PairTokenizer, fingerprint: str, model_name: str,
                   key: str, dist: Distributed) -> str | None:
    """Re-rank one dataset's first-stage run into runs/<dataset>.<first_stage>.<model>.run, evaluate it against
    the first stage (cut at the same depth) with significance tests; returns the report on rank 0."""
    dataset = load_dataset(key)
    e = cfg.eval
    run_path = dataset.run(e.first_stage)
    candidates = load_candidates(run_path, dataset.source("topics"), dataset.source("corpus"), e.depth, e.lenient)
    out = output_run(dataset.name, e.first_stage, model_name)
    warning = empty_query_warning(tokenizer, candidates.queries, dataset.source("topics"))
    if warning and dist.is_main:
        print(warning, file=sys.stderr)
    run = rerank(model, tokenizer, candidates, out, e, fingerprint, dist, tag=model_name)
    if not dist.is_main:
        return None
    config.save(cfg, out.with_suffix(".yaml"))
    lines = [f"{dataset.name}: re-ranked {len(candidates.run)} queries, {candidates.num_pairs} pairs "
             f"(top {e.depth} of {e.first_stage}) -> {out}", *(f"note: {n}" for n in candidates.notes)]
    if not dataset.qrels:
        return "\n".join(lines + [f"note: dataset {dataset.name} has no qrels; not evaluated"])
    qrels, topics = read_qrels(dataset.source("qrels")), candidates.topics
    metrics = evaluation.parse_metrics(e.metrics, dataset.rel_level)
    runs = {f"{e.first_stage} (top {e.depth})": candidates.first_stage, model_name: run}
    write_per_run(runs, qrels, metrics, topics, {model_name: out.with_suffix("")}, plot="nDCG@10" in e.metrics,
                  title=lambda name, base: f"{dataset.name}: {name} vs {e.first_stage}")
    novelty = None
    if e.novelty:
        protocol = e.novelty_subtopics
        texts = load_corpus(dataset.source("corpus"),
                            evaluation.relevant_docnos(qrels, topics, dataset.rel_level, protocol), missing_ok=True)
        subtopics = evaluation.cluster_subtopics(qrels, texts, dataset.rel_level, protocol)
        novelty = evaluation.format_alpha_ndcg(runs, subtopics, qrels, topics, protocol)
    result = report(runs, qrels, metrics, topics, 0, e.correction or None, baseline_label=e.first_stage,
                    rel_level=dataset.rel_level, novelty=novelty)
    lines += [f"note: {n}" for n in result.notes] + [result.text]
    return "\n".join(lines)


def check_datasets(cfg, keys: list[str]) -> tuple[list[str], list[str]]:
    """Before the model loads and before anything is written: every dataset's config, its first-stage run,
    topics, corpus and qrels exist, the topics and qrels parse, and eval.metrics are measures. Returns the
    dataset names and the warnings to print once every check has passed (qrels without a relevant passage)."""
    names, warnings = [], []
    for key in keys:
        dataset = load_dataset(key)
        sources = {"run": dataset.run(cfg.eval.first_stage), "topics": dataset.source("topics"),
                   "corpus": dataset.source("corpus")}
        if dataset.qrels:
            sources["qrels"] = dataset.source("qrels")
        for kind, source in sources.items():
            if not is_irds(source) and not Path(source).exists():
                raise CrossrankError(f"{source}: no such file (the {kind} of dataset {dataset.name}; expected "
                                     f"every dataset's files before re-ranking any)")
        try:
            metrics = evaluation.parse_metrics(cfg.eval.metrics, dataset.rel_level)
        except CrossrankError as e:
            origin = getattr(cfg, "_origins", {}).get("eval.metrics", "config")
            raise CrossrankError(f"{origin}: eval.metrics: {e}") from None
        if dataset.qrels and not is_irds(sources["qrels"]) and metrics:
            warning = evaluation.no_relevant_warning(read_qrels(sources["qrels"]), dataset.rel_level,
                                                     sources["qrels"])
            warnings += [warning] if warning else []
        names.append(dataset.name)
    return names, warnings


def run_inference(cfg, model_path: str | None, lr: float | None = None, seed: int | None = None,
                  config_files: list[str] = ()) -> None:
    """infer.py's work: check every input, find the checkpoint, then re-rank and evaluate every dataset of
    eval.dataset. No output may be an input (`config_files`, every file the datasets list), and each output run
    has one writer."""
    keys = dataset_keys(cfg.eval.dataset)
    _, warnings = check_datasets(cfg, keys)
    inputs = [("a --config file", file) for file in config_files]
    inputs += [source for key in keys for source in load_dataset(key).inputs()]
    if cfg.eval.score_cache:
        refuse_overwriting_inputs([("eval.score_cache", cfg.eval.score_cache)], inputs)
    dist = setup_distributed(timeout=datetime.timedelta(hours=12))  # shards may finish far apart
    if model_path is None:
        chain = objective_chain(cfg.train.objective, cfg.train.stage, cfg.train.previous)
        label = model_label(cfg.model.name, cfg.data.novelty)  # data.novelty: the novelty-trained variant
        model_path = str(find_model(label, chain, cfg.train.stage, lr, seed))
    check_model_source(model_path)
    if cfg.eval.score_cache:
        check_score_cache(cfg.eval.score_cache)  # last: a damaged cache is set aside (one warning line)
    runs = [output_run(load_dataset(key).name, cfg.eval.first_stage, model_run_name(model_path)) for key in keys]
    refuse_overwriting_inputs([output for run, key in zip(runs, keys) for output in outputs_of(run, key)] +
                              [("eval.score_cache", cfg.eval.score_cache)], inputs)
    if dist.is_main:
        for warning in warnings:
            print(warning, file=sys.stderr)
    with contextlib.ExitStack() as held:
        lock_outputs(held, runs, dist)  # before the model loads: a second writer stops at once
        _rerank_all(cfg, model_path, keys, dist)


def _rerank_all(cfg, model_path: str, keys: list[str], dist: Distributed) -> None:
    # the checkpoint's settings (crossrank.json), unless chosen explicitly: tokenizer.model is what applies
    model, tokenizer = load_model(model_path, cfg.model, dist.device, compile=cfg.eval.compile,
                                  explicit=explicit_keys(cfg), announce=dist.is_main)
    cfg = dataclasses.replace(cfg, model=tokenizer.model)  # recorded with each run
    fingerprint = model_fingerprint(model_path, tokenizer.model, model.listwise)
    precision = with_precision(cfg.eval, dist.device, model.listwise).precision  # rerank resolves it alike
    if dist.is_main:
        print(f"model: {model_path} (fingerprint {fingerprint[:12]}) on {dist.device} x {dist.world}, "
              f"eval.precision={cfg.eval.precision} -> {precision}", file=sys.stderr)
        note = slow_precision_note(precision, dist.device.type, cpu_flags(), cpu_model())
        if note:
            print(note, file=sys.stderr)
    for key in keys:
        report = rerank_dataset(cfg, model, tokenizer, fingerprint, model_run_name(model_path), key, dist)
        if report:
            print(report, flush=True)
