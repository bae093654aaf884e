"""ColBERT first-stage runs: PyLate's ColBERT model and PLAID index (the fast-plaid engine).

Runs in the ColBERT environment (its own torch; see requirements-colbert.txt and the README, "ColBERTv2 first
stage"), normally through the wrapper, which creates that environment on first use:

    ./create_colbert_baseline_runs.sh -d dl19 -k 500 -m colbert-ir/colbertv2.0 -g 0,1 -b 64
    <env>/bin/python -m crossrank colbert --dataset dl19 --k 500 --devices 0,1 --batch-size 64

The index of a (corpus, checkpoint) pair is cached in `data/indexes/<corpus>-<hash>/colbert-<model>-<hash>/`, next
to the corpus's BM25 index. It is built in shards of `--shard-docs` passages: each shard is encoded and added to
the PLAID index (PyLate's `add_documents`; fast-plaid updates the index and adds centroids for new regions), then
`progress.json` records how many passages (in corpus order) the index holds. An interrupted build resumes after
the last completed shard; `--max-shards` stops on purpose after N new shards (to split indexing across
time-limited jobs). The model used for the first shard is saved in the index folder and reused, so a resumed build
and the queries are encoded with exactly the same weights (PyLate adds a randomly initialised projection to a
checkpoint that has none, e.g. a plain BERT). Several devices (`--devices 0,1`) encode through PyLate's
multi-process pool, one process per GPU.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from crossrank.first_stage import bm25
from crossrank import cli
from crossrank import config
from crossrank.data.datasets import load_dataset
from crossrank.errors import CrossrankError
from crossrank.data.atomic import atomic_write
from crossrank.data.outputs import output_lock, refuse_overwriting_inputs
from crossrank.data.runs import format_run_lines, sort_ranking
from crossrank.data.texts import read_corpus, read_topics

DEFAULT_CHECKPOINT = "colbert-ir/colbertv2.0"
ENCODE_CHUNK = 10_000  # passages per encode call: the granularity of the progress bar
QUERY_CHUNK = 1_000  # queries per PLAID search call


def parse_devices(spec: str) -> list[str]:
    """'' = the first GPU if there is one, else the CPU; 'cpu'; '0,1' = cuda:0 and cuda:1."""
    import torch

    spec = spec.strip()
    if not spec:
        return ["cuda:0"] if torch.cuda.is_available() else ["cpu"]
    if spec == "cpu":
        return ["cpu"]
    ids = [part.strip() for part in spec.split(",")]
    if not all(part.isdigit() for part in ids):
        raise CrossrankError(f"-g {spec}: expected GPU numbers like 0 or 0,1, or cpu")
    if not torch.cuda.is_available() or max(map(int, ids)) >= torch.cuda.device_count():
        raise CrossrankError(f"-g {spec}: {torch.cuda.device_count()} CUDA device(s) visible "
                             f"(expected GPUs {spec}; use -g cpu on a machine without them)")
    return [f"cuda:{i}" for i in ids]


def index_folder(corpus: str, checkpoint: str, root: Path) -> Path:
    """`<root>/<corpus>-<hash>/colbert-<model>-<hash>`: the corpus part is the BM25 cache's, so a corpus's
    indexes sit together; the model part hashes the checkpoint (a local folder by its absolute path)."""
    local = Path(checkpoint).expanduser()
    model = str(local.resolve()) if local.exists() else checkpoint
    name = Path(model.rstrip("/")).name or "model"
    digest = hashlib.blake2b(model.encode(), digest_size=6).hexdigest()
    return root / bm25.index_folder(corpus).parent.name / f"colbert-{name}-{digest}"


def load_model(checkpoint: str, folder: Path, device: str) -> "pylate.models.ColBERT":
    """The model saved in the index folder, or `checkpoint` (a hub id or local folder), saved there first."""
    import torch
    from pylate import models

    saved = folder / "model"
    if not (saved / "modules.json").is_file():
        local = Path(checkpoint).expanduser()
        torch.manual_seed(0)  # a checkpoint without a ColBERT projection gets a random one: make it reproducible
        model = models.ColBERT(str(local) if local.exists() else checkpoint, device=device)
        tmp = folder / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(str(tmp))
        os.replace(tmp, saved)
    # always the saved copy, so a fresh build and a resumed one encode with identical weights and tokenizer
    return models.ColBERT(str(saved), device=device, local_files_only=True)


def _read_progress(folder: Path) -> dict:
    path = folder / "progress.json"
    if not path.is_file():
        return {"documents": 0, "last_docno": None, "complete": False}
    return json.loads(path.read_text(encoding="utf-8"))


def _write_progress(folder: Path, progress: dict) -> None:
    with atomic_write(folder / "progress.json") as f:
        json.dump(progress, f, indent=1)


def _indexed_documents(folder: Path) -> int:
    """How many passages fast-plaid's own metadata says the index holds (0 when there is no index yet)."""
    meta = folder / "plaid" / "fast_plaid_index" / "metadata.json"
    return json.loads(meta.read_text(encoding="utf-8"))["num_documents"] if meta.is_file() else 0


def _encode(model, texts: list[str], pool, batch_size: int, is_query: bool) -> list:
    if pool is not None:
        return model.encode_multi_process(texts, pool, batch_size=batch_size, is_query=is_query)
    return model.encode(texts, batch_size=batch_size, is_query=is_query, show_progress_bar=False)


def _shards(docs: Iterator[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    while shard := list(itertools.islice(docs, size)):
        yield shard


def build_index(corpus: str, model, folder: Path, devices: list[str], batch_size: int, shard_docs: int,
                max_shards: int | None = None, lenient: bool = False) -> bool:
    """Build or resume the PLAID index of `corpus` in `folder`; True when it holds the whole corpus."""
    import torch
    from pylate import indexes
    from tqdm import tqdm

    progress = _read_progress(folder)
    if progress["complete"]:
        return True
    done, held = progress["documents"], _indexed_documents(folder)
    if held != done:  # killed inside add_documents: fast-plaid's files and our count disagree
        raise CrossrankError(f"{folder}: the index holds {held} passages but progress.json records {done} "
                             f"(a build was interrupted while adding a shard); rebuild it with -R (--rebuild)")
    index = indexes.PLAID(index_folder=str(folder), index_name="plaid", override=done == 0,
                          device=devices if len(devices) > 1 else devices[0], show_progress=False)
    docs = read_corpus(corpus, lenient)
    if done:
        count, last = 0, None  # the corpus is read in the same order every time: skip what the index holds
        for count, (last, _) in enumerate(itertools.islice(docs, done), 1):
            pass
        if count < done or last != progress["last_docno"]:
            raise CrossrankError(f"{corpus}: passage {done} is no longer {progress['last_docno']!r} (the corpus "
                                 f"changed since the index was started); rebuild it with -R (--rebuild)")
        print(f"resuming the index in {folder} after {done:,} passages", file=sys.stderr)
    pool = model.start_multi_process_pool(devices) if len(devices) > 1 else None
    try:
        with tqdm(desc="indexing", initial=done, unit=" passages", file=sys.stderr) as bar:
            for number, shard in enumerate(_shards(docs, shard_docs), 1):
                docnos, texts = [d for d, _ in shard], [t for _, t in shard]
                embeddings = []
                for start in range(0, len(texts), ENCODE_CHUNK):
                    embeddings += _encode(model, texts[start:start + ENCODE_CHUNK], pool, batch_size, False)
                    bar.update(len(texts[start:start + ENCODE_CHUNK]))
                # fast-plaid draws its k-means sample with torch's global RNG: seeding it by position makes a
                # resumed build identical to an uninterrupted one
                torch.manual_seed(done)
                index.add_documents(documents_ids=docnos, documents_embeddings=embeddings)
                done += len(docnos)
                _write_progress(folder, {"documents": done, "last_docno": docnos[-1], "complete": False})
                if max_shards is not None and number >= max_shards:
                    break
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    if not done:
        raise CrossrankError(f"{corpus}: the corpus is empty (expected passages to index)")
    complete = next(docs, None) is None
    if complete:
        _write_progress(folder, {**_read_progress(folder), "complete": True})
    return complete


def retrieve(folder: Path, model, topics: dict[str, str], k: int, devices: list[str], batch_size: int,
             out: Path) -> int:
    """Write the top-`k` passages per topic from the complete index in `folder` to the TREC run `out`, streaming
    (MS MARCO train's 503k queries x 500 never sit in memory), queries in topic order; returns how many queries
    got fewer than `k` results."""
    from pylate import indexes
    from tqdm import tqdm

    index = indexes.PLAID(index_folder=str(folder), index_name="plaid", device=devices if len(devices) > 1 else
                          devices[0], n_full_scores=max(8192, k), show_progress=False)
    qids, short = list(topics), 0
    with atomic_write(out) as f, tqdm(total=len(qids), desc="retrieving", unit=" queries", file=sys.stderr) as bar:
        for start in range(0, len(qids), QUERY_CHUNK):
            chunk = qids[start:start + QUERY_CHUNK]
            embeddings = model.encode([topics[q] for q in chunk], batch_size=batch_size, is_query=True,
                                      show_progress_bar=False)
            for qid, hits in zip(chunk, index(embeddings, k=k)):
                ranking = sort_ranking((str(hit["id"]), float(hit["score"])) for hit in hits)
                short += len(ranking) < k
                f.writelines(format_run_lines(qid, ranking, "colbert"))
            bar.update(len(chunk))
    return short


def main() -> int:
    parser = cli.ArgumentParser(description="ColBERT run for a dataset's topics over its corpus (PyLate PLAID).")
    parser.add_argument("--dataset", required=True, help="a configs/datasets key or a YAML path")
    parser.add_argument("--k", type=cli.int_in(1), default=500, help="results per query (default 500)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"hub id or local folder: a ColBERT checkpoint, or any BERT-like encoder (PyLate adds "
                             f"a projection) (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--devices", default="", help="GPU numbers (0 or 0,1) or cpu (default: GPU 0 if any)")
    parser.add_argument("--batch-size", type=cli.int_in(1), default=32, help="encoding batch size (default 32)")
    parser.add_argument("--shard-docs", type=cli.int_in(1), default=100_000,
                        help="passages per resumable indexing step (default 100000)")
    parser.add_argument("--max-shards", type=cli.int_in(1), help="stop after this many new shards (resume later)")
    parser.add_argument("--indexes", default=str(bm25.INDEXES), help="index cache root (default data/indexes)")
    parser.add_argument("--rebuild", action="store_true", help="delete the cached index and build it again")
    parser.add_argument("--out", default="", help="run file (default: runs/<dataset>.colbert.run)")
    parser.add_argument("--lenient", action="store_true", help="skip malformed corpus/topic lines")
    args = parser.parse_args()
    logging.getLogger("pylate.indexes.fast_plaid").setLevel(logging.ERROR)  # "adding to an existing index": by design
    devices = parse_devices(args.devices)  # a bad -g is reported before the missing engine
    dataset = load_dataset(args.dataset)
    out = Path(args.out) if args.out else config.ROOT / "runs" / f"{dataset.name}.colbert.run"
    # the dataset's own `colbert` run is what this command makes; every other file it lists is an input
    corpus = dataset.source("corpus")
    folder = index_folder(corpus, args.checkpoint, Path(args.indexes))
    checkpoint = [("the --checkpoint folder", args.checkpoint)] if Path(args.checkpoint).expanduser().exists() else []
    # the index folder is deleted by --rebuild: it must not hold an input either
    refuse_overwriting_inputs([("--out" if args.out else "the default output", out)],
                              dataset.inputs("colbert") + checkpoint, [("the index folder (under --indexes)", folder)])
    with output_lock(out), output_lock(folder):  # one writer per run and per index
        try:
            import pylate  # noqa: F401
        except ImportError:
            raise CrossrankError(f"{sys.executable}: PyLate is not installed; run ./create_colbert_baseline_runs.sh, "
                                 f"which creates the ColBERT environment (README, 'ColBERTv2 first stage')") from None
        return _index_and_retrieve(args, dataset, corpus, folder, devices, out)


def _index_and_retrieve(args, dataset, corpus: str, folder: Path, devices: list[str], out: Path) -> int:
    if args.rebuild:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    model = load_model(args.checkpoint, folder, devices[0])
    if not build_index(corpus, model, folder, devices, args.batch_size, args.shard_docs, args.max_shards,
                       args.lenient):
        print(f"stopped after {args.max_shards} shard(s): {_read_progress(folder)['documents']:,} passages "
              f"indexed in {folder}; run the same command again to continue")
        return 0
    topics = read_topics(dataset.source("topics"), args.lenient)
    short = retrieve(folder, model, topics, args.k, devices, args.batch_size, out)
    print(f"wrote {out}: {len(topics)} queries, top {args.k}" + (f" ({short} with fewer results)" if short else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
