"""Streaming, validated readers and atomic writers for the TREC-style files crossrank reads and writes.

Formats (see the README, "File formats"):
  run     `qid Q0 docno rank score tag`, whitespace-separated
  qrels   `qid 0 docno rel` (TREC) or `query-id corpus-id score` TSV with header (BEIR)
  topics  `qid<TAB>text` TSV, JSONL (`_id`/`qid` + `text`), TREC topic files, BEIR folders, `irds:<id>`
  corpus  `docno<TAB>text` TSV, JSONL (`docno`/`_id` + `text`, optional `title`), BEIR folders, `irds:<id>`

Every malformed line raises `CrossrankError("path:line: what is wrong (expected X, got Y)")`. Readers take
`lenient=True` to skip bad lines instead; the number skipped is reported once on stderr when the file is done.
Writers write to a temporary name in the target folder and `os.replace` it, so a reader never sees half a file.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import json
import math
import os
import re
import socket
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

IRDS_PREFIX = "irds:"

# qid -> [(docno, score), ...]; the order of the list is not implied, use `sort_ranking`.
Run = dict[str, list[tuple[str, float]]]
# qid -> {docno: relevance}
Qrels = dict[str, dict[str, int]]


class CrossrankError(ValueError):
    """Bad input or configuration, reported as one line `path:line: what is wrong (expected X, got Y)`."""


def where(path: str | os.PathLike, line: int | None = None) -> str:
    """Format a location for an error message: `path:line` or `path`."""
    return f"{path}:{line}" if line is not None else str(path)


class _BadLines:
    """Raises on the first bad line, or (lenient) counts bad lines by problem and reports the count when closed."""

    def __init__(self, path: str | os.PathLike, kind: str, lenient: bool, quiet: bool = False):
        self.path, self.kind, self.lenient, self.quiet, self.count, self.first = path, kind, lenient, quiet, 0, ""
        self.problems: dict[str, int] = {}

    def __call__(self, line: int, message: str, problem: str = "malformed") -> None:
        text = f"{where(self.path, line)}: {message}"
        if not self.lenient:
            raise CrossrankError(text)
        self.count += 1
        self.problems[problem] = self.problems.get(problem, 0) + 1
        self.first = self.first or text

    def close(self) -> None:
        if self.count and not self.quiet:
            print(f"warning: skipped {self.count} malformed {self.kind} line(s) in {self.path} "
                  f"(--lenient); first: {self.first}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Opening files


# Decompression failures of a truncated or damaged .gz (BadGzipFile is an OSError, so it is listed first).
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _open_binary(path: str | os.PathLike) -> IO[bytes]:
    """Open a file for reading bytes, transparently gunzipping `.gz`; a missing file is a CrossrankError."""
    path = Path(path)
    if not path.is_file():
        raise CrossrankError(f"{path}: no such file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def decode_line(path: str | os.PathLike, number: int, raw: bytes) -> str:
    """One line's bytes as text; invalid UTF-8 is a CrossrankError naming `path:number`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CrossrankError(f"{where(path, number)}: invalid UTF-8 at byte {e.start + 1} of the line "
                             f"(expected UTF-8 text, got {raw[e.start:e.start + 4]!r})") from None


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, bool]]:
    """Yield (1-based line number, line without its line break, whether it ended with a line break).

    Only `\n` ends a line (a `\r\n` ending loses its `\r`), so a bare `\r` inside a text neither splits it
    nor shifts the line numbers of what follows. Invalid UTF-8 and a truncated or corrupt `.gz` are
    CrossrankErrors naming the line.
    """
    number = 0
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):  # binary files split on b"\n" only
                line = decode_line(path, number, raw)
                ended = line.endswith("\n")
                yield number, (line[:-1].removesuffix("\r") if ended else line), ended
    except GZIP_ERRORS as e:
        raise CrossrankError(f"{where(path, number + 1)}: the gzip file is truncated or corrupt ({e}; "
                             f"expected a complete .gz file)") from None


def read_text(path: str | os.PathLike) -> str:
    """A whole (small) text file, with the errors of `text_lines`."""
    return "\n".join(line for _, line, _ in text_lines(path))


def _numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without the line break); blank lines are skipped."""
    for number, line, _ in text_lines(path):
        if line.strip():
            yield number, line


def _irds(source: str):
    """Load an ir_datasets dataset for an `irds:<id>` source (imported lazily: it is slow to import)."""
    import ir_datasets

    dataset_id = source[len(IRDS_PREFIX):]
    try:
        return ir_datasets.load(dataset_id)
    except KeyError as e:
        raise CrossrankError(f"{source}: unknown ir_datasets id ({e})") from None


@contextlib.contextmanager
def _irds_errors(source: str) -> Iterator[None]:
    """ir_datasets downloads what its cache lacks; offline that fails deep inside it. Say what to do."""
    try:
        yield
    except CrossrankError:
        raise
    except (RuntimeError, OSError) as e:
        if "download" not in str(e).lower() and "connection" not in str(e).lower():
            raise
        raise CrossrankError(f"{source}: ir_datasets could not download what its cache lacks (offline?); "
                             f"point IR_DATASETS_HOME at a pre-populated cache or use local files") from None


def _is_irds(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.startswith(IRDS_PREFIX)


# ---------------------------------------------------------------------------------------------------------
# Runs


def read_run(path: str | os.PathLike, lenient: bool = False) -> Iterator[tuple[str, str, int, float]]:
    """Stream a TREC run as (qid, docno, rank, score) in file order.

    Checks: 6 columns, integer rank, finite float score, each docno at most once per query. Queries need not
    be contiguous. `irds:<id>` reads the dataset's scoreddocs (rank = position in the dataset's order).
    """
    if _is_irds(path):
        yield from _read_irds_run(str(path))
        return
    bad = _BadLines(path, "run", lenient)
    for _, qid, docno, rank, score in _run_rows(path, bad):
        yield qid, docno, rank, score
    bad.close()


def read_run_queries(path: str | os.PathLike, lenient: bool = False,
                     torn_ok: bool = False) -> Iterator[tuple[int, str, list[tuple[str, int, float]]]]:
    """Stream a TREC run as blocks of consecutive lines of one query: (first line, qid, [(docno, rank, score)])
    in file order, validated as `read_run` does (a query whose lines are not together gives several blocks).

    `torn_ok` ignores a last line without a line break (the torn write of a killed process) instead of
    checking it.
    """
    bad = _BadLines(path, "run", lenient)
    block: tuple[int, str, list[tuple[str, int, float]]] | None = None
    for number, qid, docno, rank, score in _run_rows(path, bad, torn_ok):
        if block is None or block[1] != qid:
            if block is not None:
                yield block
            block = (number, qid, [])
        block[2].append((docno, rank, score))
    if block is not None:
        yield block
    bad.close()


def run_problems(path: str | os.PathLike) -> dict[str, int]:
    """How many lines of a run have each problem ("malformed", "duplicate"), for messages that give counts."""
    bad = _BadLines(path, "run", lenient=True, quiet=True)
    for _ in _run_rows(path, bad):
        pass
    return bad.problems


def _run_rows(path: str | os.PathLike, bad: _BadLines,
              torn_ok: bool = False) -> Iterator[tuple[int, str, str, int, float]]:
    """The one run-line validator: (line number, qid, docno, rank, score) of every good line; `bad` decides
    whether a bad line raises or is counted."""
    seen: dict[str, set[str]] = {}
    for number, line, ended in text_lines(path):
        if not line.strip() or (torn_ok and not ended):
            continue
        parts = line.split()
        if len(parts) != 6:
            bad(number, f"run line has {len(parts)} columns (expected 6: qid Q0 docno rank score tag, "
                        f"got {line[:80]!r})")
            continue
        qid, _, docno, rank, score, _ = parts
        try:
            rank_value = int(rank)
        except ValueError:
            bad(number, f"rank is not an integer (expected e.g. 1, got {rank!r})")
            continue
        try:
            score_value = float(score)
        except ValueError:
            bad(number, f"score is not a number (expected e.g. 12.5, got {score!r})")
            continue
        if not math.isfinite(score_value):
            bad(number, f"score is not finite (expected a finite number, got {score!r})")
            continue
        docnos = seen.setdefault(qid, set())
        if docno in docnos:
            bad(number, f"docno {docno} appears twice for query {qid} (expected each docno once per query)",
                "duplicate")
            continue
        docnos.add(docno)
        yield number, qid, docno, rank_value, score_value


def _read_irds_run(source: str) -> Iterator[tuple[str, str, int, float]]:
    dataset = _irds(source)
    if not dataset.has_scoreddocs():
        raise CrossrankError(f"{source}: this ir_datasets id has no scoreddocs (a first-stage run)")
    ranks: dict[str, int] = {}
    with _irds_errors(source):
        for sd in dataset.scoreddocs_iter():
            ranks[sd.query_id] = ranks.get(sd.query_id, 0) + 1
            yield sd.query_id, sd.doc_id, ranks[sd.query_id], float(sd.score)


def load_run(path: str | os.PathLike, depth: int | None = None, lenient: bool = False) -> Run:
    """Read a whole run into {qid: [(docno, score), ...]} sorted by score (ties: see `sort_ranking`),
    cut to the top `depth` per query when given. An empty run is an error."""
    run: Run = {}
    for qid, docno, _, score in read_run(path, lenient):
        run.setdefault(qid, []).append((docno, score))
    if not run:
        raise CrossrankError(f"{path}: the run is empty (expected at least one line)")
    for qid, ranking in run.items():
        run[qid] = sort_ranking(ranking)[:depth]
    return run


def sort_ranking(ranking: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """Sort (docno, score) by score, highest first; ties by docno, *descending*.

    The tie order is trec_eval's (and so pytrec_eval's and ir_measures'), which re-sorts every run by
    (score desc, docno desc) and ignores the rank column: the ranks we write then agree with what the
    evaluation tools score, and re-ranking the same scores twice gives the same file.
    """
    return sorted(ranking, key=lambda pair: (pair[1], pair[0]), reverse=True)


def clean_tag(tag: str, default: str = "crossrank") -> str:
    """A run tag as one column: whitespace removed (a tag with spaces would add columns), `default` if empty."""
    return "".join(tag.split()) or default


def format_run_lines(qid: str, ranking: Iterable[tuple[str, float]], tag: str) -> Iterator[str]:
    """TREC run lines for one query; `ranking` must already be sorted (see `sort_ranking`).

    Scores are written exactly (Python's shortest round-trip form), never rounded to a fixed number of
    decimals: rounding could turn two different scores into a tie that the evaluation tools then order by
    docno, against the ranks written here (and tiny scores such as PISA's on small corpora would all become 0).
    """
    for rank, (docno, score) in enumerate(ranking, 1):
        yield f"{qid} Q0 {docno} {rank} {float(score)!r} {tag}\n"


def write_run(path: str | os.PathLike, run: Run, tag: str = "crossrank", depth: int | None = None) -> Path:
    """Write a run atomically, each query sorted by score with deterministic ties, queries in qid order."""
    tag = clean_tag(tag)
    if Path(path).parent.is_dir():
        remove_stale_temporaries(path)  # a killed earlier attempt's half-written run
    with atomic_write(path) as f:
        for qid in sorted(run, key=qid_order):
            f.writelines(format_run_lines(qid, sort_ranking(run[qid])[:depth], tag))
    return Path(path)


def qid_order(qid: str) -> tuple[int, int | str]:
    """Numeric qids in numeric order, then the rest in string order (a stable, familiar file layout)."""
    return (0, int(qid)) if qid.isdigit() else (1, qid)


# ---------------------------------------------------------------------------------------------------------
# Qrels


def read_qrels(path: str | os.PathLike, lenient: bool = False) -> Qrels:
    """Read qrels: TREC `qid 0 docno rel` or BEIR TSV `query-id corpus-id score` (header optional); BEIR
    folders (`qrels/test.tsv` or `qrels.tsv`) and `irds:<id>` too. Relevance must be an integer; the same
    (qid, docno) twice is an error."""
    if _is_irds(path):
        dataset = _irds(str(path))
        if not dataset.has_qrels():
            raise CrossrankError(f"{path}: this ir_datasets id has no qrels")
        qrels: Qrels = {}
        with _irds_errors(str(path)):
            for q in dataset.qrels_iter():
                qrels.setdefault(q.query_id, {})[q.doc_id] = int(q.relevance)
        return qrels
    path = _beir_member(path, ("qrels/test.tsv", "qrels.tsv"))
    bad = _BadLines(path, "qrels", lenient)
    qrels = {}
    for number, line in _numbered_lines(path):
        parts = line.split()
        if number == 1 and parts[:2] == ["query-id", "corpus-id"]:
            continue  # BEIR header
        if len(parts) == 4:
            qid, _, docno, rel = parts
        elif len(parts) == 3:
            qid, docno, rel = parts
        else:
            bad(number, f"qrels line has {len(parts)} columns (expected 4: qid 0 docno rel, "
                        f"or 3: query-id corpus-id score; got {line[:80]!r})")
            continue
        try:
            rel_value = int(rel)
        except ValueError:
            bad(number, f"relevance is not an integer (expected e.g. 0..3, got {rel!r})")
            continue
        judged = qrels.setdefault(qid, {})
        if docno in judged:
            bad(number, f"docno {docno} is judged twice for query {qid} (expected one judgement per pair)")
            continue
        judged[docno] = rel_value
    bad.close()
    if not qrels:
        raise CrossrankError(f"{path}: the qrels are empty (expected at least one judgement)")
    return qrels


# ---------------------------------------------------------------------------------------------------------
# Topics


def read_topics(path: str | os.PathLike, lenient: bool = False) -> dict[str, str]:
    """Read topics into {qid: text}: TSV `qid<TAB>text`, JSONL (`_id` or `qid`, `text`), a TREC topic file
    (`<top>`/`<num>`/`<title>`; the title is the query), a BEIR folder or `irds:<id>`."""
    if _is_irds(path):
        dataset = _irds(str(path))
        if not dataset.has_queries():
            raise CrossrankError(f"{path}: this ir_datasets id has no queries")
        with _irds_errors(str(path)):
            return {q.query_id: _query_text(q) for q in dataset.queries_iter()}
    path = _beir_member(path, ("queries.jsonl",))
    if _looks_like_jsonl(path):
        return dict(_read_jsonl_texts(path, "topics", ("_id", "qid", "query_id"), lenient))
    if _looks_like_trec_topics(path):
        return _read_trec_topics(path)
    return dict(_read_tsv_texts(path, "topics", "qid", lenient))


def _query_text(query) -> str:
    for field in ("text", "title", "query"):
        value = getattr(query, field, None)
        if value:
            return value
    return query[1]


_TOP = re.compile(r"<top>(.*?)</top>", re.DOTALL | re.IGNORECASE)
_FIELD = re.compile(r"<(num|title)>(.*?)(?=<[a-z/]|\Z)", re.DOTALL | re.IGNORECASE)


def _read_trec_topics(path: Path) -> dict[str, str]:
    """The `<title>` of every `<top>` of a classic TREC topic file (`<num> Number: 301`, `<title> ...`, then
    `<desc>`, `<narr>` or nothing; closing tags optional). ir_datasets' reader insists on every field."""
    text = read_text(path)
    topics: dict[str, str] = {}
    for block in _TOP.finditer(text):
        fields = {tag.lower(): " ".join(value.split()) for tag, value in _FIELD.findall(block.group(1))}
        line = text.count("\n", 0, block.start()) + 1
        qid = re.sub(r"^Number:\s*", "", fields.get("num", ""), flags=re.IGNORECASE)
        title = re.sub(r"^Topic:\s*", "", fields.get("title", ""), flags=re.IGNORECASE)
        if not qid or not title:
            raise CrossrankError(f"{path}:{line}: topic without <num> or <title> (expected both in every <top>)")
        if qid in topics:
            raise CrossrankError(f"{path}:{line}: topic {qid} appears twice (expected each topic once)")
        topics[qid] = title
    if not topics:
        raise CrossrankError(f"{path}: no <top> entries found in the TREC topic file")
    return topics


# ---------------------------------------------------------------------------------------------------------
# Corpora


def read_corpus(path: str | os.PathLike, lenient: bool = False) -> Iterator[tuple[str, str]]:
    """Stream a corpus as (docno, text): TSV `docno<TAB>text`, JSONL (`docno` or `_id`, `text`, optional
    `title`, joined as "title text"), a BEIR folder (`corpus.jsonl`) or `irds:<id>`. Empty text and a docno
    seen twice are errors."""
    if _is_irds(path):
        yield from _read_irds_corpus(str(path))
        return
    path = _beir_member(path, ("corpus.jsonl",))
    if _looks_like_jsonl(path):
        yield from _read_jsonl_texts(path, "corpus", ("docno", "_id", "doc_id"), lenient)
    else:
        yield from _read_tsv_texts(path, "corpus", "docno", lenient)


def _read_irds_corpus(source: str) -> Iterator[tuple[str, str]]:
    dataset = _irds(source)
    if not dataset.has_docs():
        raise CrossrankError(f"{source}: this ir_datasets id has no documents")
    with _irds_errors(source):
        for doc in dataset.docs_iter():
            yield doc.doc_id, _irds_doc_text(doc)


def _irds_doc_text(doc) -> str:
    title = getattr(doc, "title", "") or ""
    text = getattr(doc, "text", None) or getattr(doc, "body", None) or doc.default_text()
    return f"{title} {text}".strip() if title else text


def load_corpus(path: str | os.PathLike, docnos: Iterable[str] | None = None,
                lenient: bool = False, missing_ok: bool = False) -> dict[str, str]:
    """Read a corpus into {docno: text}, keeping only `docnos` when given (so MS MARCO's 8.8M passages need
    not all sit in memory); every requested docno must be found, unless `missing_ok` (the caller reports)."""
    wanted = set(docnos) if docnos is not None else None
    if wanted is not None and _is_irds(path):
        with _irds_errors(str(path)):
            store = _irds(str(path)).docs_store()
            texts = {doc.doc_id: _irds_doc_text(doc) for doc in store.get_many_iter(wanted)}
    else:
        texts = {d: t for d, t in read_corpus(path, lenient) if wanted is None or d in wanted}
    if wanted is not None and len(texts) < len(wanted) and not missing_ok:
        missing = sorted(wanted - texts.keys())
        raise CrossrankError(f"{path}: {len(missing)} of {len(wanted)} docnos are not in the corpus "
                             f"(e.g. {', '.join(missing[:5])})")
    return texts


# ---------------------------------------------------------------------------------------------------------
# Shared text-file parsing for topics and corpora


class _BadLine(Exception):
    """A line-level problem found by a line parser; the reader decides whether to raise or skip."""


def _read_texts(path: Path, kind: str, id_name: str, parse, lenient: bool) -> Iterator[tuple[str, str]]:
    """(identifier, text) per line of a topics or corpus file; `parse` turns one line into that pair.
    Every identifier must be non-empty and new, every text non-empty."""
    bad = _BadLines(path, kind, lenient)
    seen: set[str] = set()
    for number, line in _numbered_lines(path):
        try:
            identifier, text = parse(line)
        except _BadLine as e:
            bad(number, str(e))
            continue
        if not identifier:
            bad(number, f"empty {id_name} (expected a {id_name} and a text on every line)")
        elif not text:
            bad(number, f"empty text for {id_name} {identifier} (expected non-empty text)")
        elif identifier in seen:
            bad(number, f"{id_name} {identifier} appears twice (expected each {id_name} once)")
        else:
            seen.add(identifier)
            yield identifier, text
    bad.close()


def _read_tsv_texts(path: Path, kind: str, id_name: str, lenient: bool) -> Iterator[tuple[str, str]]:
    def parse(line: str) -> tuple[str, str]:
        identifier, tab, text = line.partition("\t")
        if not tab:
            raise _BadLine(f"{kind} line has no tab (expected {id_name}<TAB>text, got {line[:80]!r})")
        return identifier.strip(), text.strip()

    return _read_texts(path, kind, id_name, parse, lenient)


def _read_jsonl_texts(path: Path, kind: str, id_fields: tuple[str, ...],
                      lenient: bool) -> Iterator[tuple[str, str]]:
    def parse(line: str) -> tuple[str, str]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _BadLine(f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise _BadLine(f"JSON line is not an object (expected {{\"{id_fields[0]}\": ..., \"text\": ...}})")
        field = next((f for f in id_fields if f in record), None)
        if field is None:
            raise _BadLine(f"no id field (expected one of {', '.join(id_fields)})")
        identifier = record[field]
        # an int id is common (BEIR dumps); null, a float, a list or an object is not an id
        if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
            raise _BadLine(f"\"{field}\" is {_json_type(identifier)} (expected a string or an integer id)")
        title, text = _json_text(record, "title"), _json_text(record, "text")
        return str(identifier).strip(), (f"{title} {text}".strip() if title else text)

    return _read_texts(path, kind, id_fields[0], parse, lenient)


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _json_text(record: dict, field: str) -> str:
    """A text field of a JSONL record: a string, or missing/null (empty); anything else is a _BadLine."""
    value = record.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadLine(f"\"{field}\" is {_json_type(value)} (expected a string)")
    return value.strip()


def _beir_member(path: str | os.PathLike, names: tuple[str, ...]) -> Path:
    """A BEIR folder stands for its member file (the first of `names` that exists)."""
    path = Path(path)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise CrossrankError(f"{path}: folder has none of {', '.join(names)} (expected a BEIR folder)")
    return path


def _first_line(path: Path) -> str:
    return next((line for _, line in _numbered_lines(path)), "")


def _looks_like_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz")) or _first_line(path).lstrip().startswith("{")


def _looks_like_trec_topics(path: Path) -> bool:
    return _first_line(path).lstrip().lower().startswith("<top")


# ---------------------------------------------------------------------------------------------------------
# Atomic writes


def _file_mode() -> int:
    """The mode `open()` would give a new file under the process umask (read once, at import)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to `path`; on success fsync and rename it over `path`, on error delete it.

    The temporary file lives in the target folder so that `os.replace` is a rename on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # host and pid in the name tell a killed writer's leftovers from a live one's (remove_stale_temporaries)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{socket.gethostname()}-{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes owner-only files; runs are shared like any other file
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # write/fsync errors (disk full) carry no file name
            e.filename = str(path)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Delete the temporary files that writers of `path` killed on this host (kill -9, OOM) left behind;
    those of live processes stay. Returns how many were removed."""
    path = Path(path)
    own = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(socket.gethostname())}-(\d+)\.[^.]+\.tmp")
    removed = 0
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = own.fullmatch(leftover.name)
        if match and not pid_is_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed += 1
    return removed


def pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
