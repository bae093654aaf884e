"""BM25 first-stage runs with PISA (pyterrier-pisa): a compiled engine from PyPI that indexes and retrieves
offline, with no Java. The index of a corpus is built once and cached under data/indexes/.

    python -m crossrank bm25 --dataset demo --k 1000        (or ./create_bm25_baseline_run.sh -d demo)

Only k1 0.9 and b 0.4 match Anserini's / pyserini's MS MARCO passage BM25. The text analysis differs: PISA
stems with Porter2 and removes Terrier's stopwords, while pyserini uses Lucene's EnglishAnalyzer (its Porter
stemmer and Lucene's English stopwords), so the runs are close to pyserini's, not equal. Reproducing the papers
therefore imports their pyserini runs (`python -m crossrank first-stage import`, docs/reproducing.md); this
module is the tool for new collections.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from crossrank import cli
from crossrank import config
from crossrank.data.datasets import load_dataset
from crossrank.errors import CrossrankError
from crossrank.data.runs import Run, write_run
from crossrank.data.atomic import pid_is_alive
from crossrank.data.outputs import output_lock, refuse_overwriting_inputs
from crossrank.data.texts import read_corpus, read_topics

if TYPE_CHECKING:
    from pyterrier_pisa import PisaIndex

INDEXES = config.ROOT / "data" / "indexes"


def index_folder(corpus: str, lenient: bool = False) -> Path:
    """A cache folder per corpus source: its name plus a hash of its path, size and mtime (so a changed
    file gets a new index, and datasets sharing a corpus share one). A lenient build, which may lack
    skipped lines, has a folder of its own that strict runs never use."""
    stat = os.stat(corpus) if os.path.exists(corpus) else None
    key = f"{corpus}|{stat.st_size if stat else ''}|{stat.st_mtime_ns if stat else ''}"
    key += "|lenient" if lenient else ""
    name = Path(corpus.replace(":", "_")).name.split(".")[0]
    return INDEXES / f"{name}-{hashlib.blake2b(key.encode(), digest_size=6).hexdigest()}" / "pisa"


def build_index(corpus: str, threads: int = 1, lenient: bool = False) -> "PisaIndex":
    """Open the cached PISA index of `corpus` (lenient runs may use a strict one), building it first if
    needed: in a temporary folder that is renamed into place only when the whole corpus was read and
    indexed, so a failed build never leaves an index that a later run would trust."""
    from pyterrier_pisa import PisaIndex

    folders = [index_folder(corpus)] + ([index_folder(corpus, lenient=True)] if lenient else [])
    for folder in folders:
        index = PisaIndex(str(folder), stemmer="porter2", stops="terrier", threads=threads)
        if index.built():
            return index
    folder = folders[-1]
    print(f"indexing {corpus} into {folder}", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        feed = _CorpusFeed(corpus, lenient)
        documents = iter(feed)
        first = next(documents, None)  # PISA peeks at the first document in this thread: check it here
        feed.raise_error()
        with engine_log_held():
            PisaIndex(str(tmp), text_field="text", stemmer="porter2", stops="terrier", threads=threads,
                      overwrite=True).index(itertools.chain([first], documents))
        feed.raise_error()
        shutil.rmtree(folder, ignore_errors=True)  # a half-built index of an older version
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # only when empty: nothing of this failed build stays
        raise
    return PisaIndex(str(folder), stemmer="porter2", stops="terrier", threads=threads)


@contextlib.contextmanager
def engine_log_held():
    """PISA (C++) logs every indexing step (`[info] Merging titles`, ... about 20 lines on stdout, progress bars on
    stderr), nothing a user acts on: hold what the engine writes to the process's stdout and stderr in a temporary
    file meanwhile, and show it on stderr only if the call fails. crossrank's own messages (`sys.stderr`, e.g.
    the corpus feed's count of skipped lines) still go out, and its line `indexing <corpus> into <folder>` says
    what happens."""
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    python_stderr = sys.stderr
    sys.stderr = open(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.close()
            sys.stderr = python_stderr
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode("utf-8", "replace"))


class _CorpusFeed:
    """The corpus as documents for PISA, which reads them in a thread of its own: an error there would only
    end the document stream (and PISA would index the part before it), so it is kept for the caller."""

    def __init__(self, corpus: str, lenient: bool):
        self.corpus, self.lenient, self.error, self.documents = corpus, lenient, None, 0

    def __iter__(self):
        try:
            for docno, text in read_corpus(self.corpus, self.lenient):
                if len(docno.split()) != 1:  # PISA's input is `docno text`: a space would move words into it
                    raise CrossrankError(f"{self.corpus}: docno {docno!r} contains whitespace "
                                         f"(expected one token per docno)")
                self.documents += 1
                yield {"docno": docno, "text": text}
        except Exception as e:  # noqa: BLE001 - re-raised by raise_error in the caller's thread
            self.error = e

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error
        if not self.documents:
            raise CrossrankError(f"{self.corpus}: no documents to index (expected at least one)")


def _remove_dead_builds(folder: Path) -> None:
    """Temporary index folders of builds killed on this host (their process is gone)."""
    prefix = f".{folder.name}.tmp-{socket.gethostname()}-"
    for leftover in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = leftover.name[len(prefix):]
        if leftover.name.startswith(prefix) and pid.isdigit() and not pid_is_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def bm25_run(corpus: str, topics: dict[str, str], k: int = 1000, threads: int = 1, lenient: bool = False) -> Run:
    """Top-`k` BM25 results per topic as {qid: [(docno, score)]}."""
    import pandas as pd

    index = build_index(corpus, threads, lenient)
    queries = pd.DataFrame({"qid": list(topics), "query": list(topics.values())})
    with engine_log_held():  # the first BM25 retriever compresses the index, which PISA logs too
        results = index.bm25(k1=0.9, b=0.4, num_results=k, threads=threads)(queries)
    run: Run = {qid: [] for qid in topics}
    for qid, docno, score in zip(results["qid"], results["docno"], results["score"]):
        run[qid].append((docno, float(score)))
    return run


def main() -> int:
    parser = cli.ArgumentParser(description="BM25 run for a dataset's topics over its corpus (PISA).")
    parser.add_argument("--dataset", required=True, help="a configs/datasets key or a YAML path")
    parser.add_argument("--k", type=cli.int_in(1), default=1000, help="results per query (default 1000)")
    parser.add_argument("--threads", type=cli.int_in(1), default=1)
    parser.add_argument("--out", default="", help="run file (default: runs/<dataset>.bm25.run)")
    parser.add_argument("--lenient", action="store_true", help="skip malformed corpus/topic lines")
    args = parser.parse_args()
    dataset = load_dataset(args.dataset)
    out = Path(args.out) if args.out else config.ROOT / "runs" / f"{dataset.name}.bm25.run"
    # the dataset's own `bm25` run is what this command makes; every other file it lists is an input
    refuse_overwriting_inputs([("--out" if args.out else "the default output", out)], dataset.inputs("bm25"))
    with output_lock(out):  # before the index is built: a second writer stops at once
        topics = read_topics(dataset.source("topics"), args.lenient)
        run = bm25_run(dataset.source("corpus"), topics, args.k, args.threads, args.lenient)
        write_run(out, run, tag="bm25")
    empty = sum(1 for ranking in run.values() if not ranking)
    print(f"wrote {out}: {len(run)} queries, top {args.k}" + (f" ({empty} with no result)" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
