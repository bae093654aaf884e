"""Topic and corpus readers: TSV, JSONL, TREC topic files, BEIR folders and `irds:` ids."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from crossrank.data.files import BadLines, beir_member, numbered_lines, read_text
from crossrank.data.irds import irds_errors, is_irds, open_irds
from crossrank.errors import CrossrankError


# ---------------------------------------------------------------------------------------------------------
# Topics


def read_topics(path: str | os.PathLike, lenient: bool = False) -> dict[str, str]:
    """Read topics into {qid: text}: TSV `qid<TAB>text`, JSONL (`_id` or `qid`, `text`), a TREC topic file
    (`<top>`/`<num>`/`<title>`; the title is the query), a BEIR folder or `irds:<id>`."""
    if is_irds(path):
        dataset = open_irds(str(path))
        if not dataset.has_queries():
            raise CrossrankError(f"{path}: this ir_datasets id has no queries")
        with irds_errors(str(path)):
            return {q.query_id: _query_text(q) for q in dataset.queries_iter()}
    path = beir_member(path, ("queries.jsonl",))
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
    if is_irds(path):
        yield from _read_irds_corpus(str(path))
        return
    path = beir_member(path, ("corpus.jsonl",))
    if _looks_like_jsonl(path):
        yield from _read_jsonl_texts(path, "corpus", ("docno", "_id", "doc_id"), lenient)
    else:
        yield from _read_tsv_texts(path, "corpus", "docno", lenient)


def _read_irds_corpus(source: str) -> Iterator[tuple[str, str]]:
    dataset = open_irds(source)
    if not dataset.has_docs():
        raise CrossrankError(f"{source}: this ir_datasets id has no documents")
    with irds_errors(source):
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
    if wanted is not None and is_irds(path):
        with irds_errors(str(path)):
            store = open_irds(str(path)).docs_store()
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
    bad = BadLines(path, kind, lenient)
    seen: set[str] = set()
    for number, line in numbered_lines(path):
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


def _first_line(path: Path) -> str:
    return next((line for _, line in numbered_lines(path)), "")


def _looks_like_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz")) or _first_line(path).lstrip().startswith("{")


def _looks_like_trec_topics(path: Path) -> bool:
    return _first_line(path).lstrip().lower().startswith("<top")
