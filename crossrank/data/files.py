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

import gzip
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from crossrank.errors import CrossrankError, where


class BadLines:
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


BOM = "\ufeff".encode("utf-8")  # the UTF-8 byte-order mark: stripped at the start of every text file read


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, bool]]:
    """Yield (1-based line number, line without its line break, whether it ended with a line break).

    A UTF-8 byte-order mark at the start is dropped (it is not part of the first qid or key). Only `\n` ends a
    line (a `\r\n` ending loses its `\r`), so a bare `\r` inside a text neither splits it
    nor shifts the line numbers of what follows. Invalid UTF-8 and a truncated or corrupt `.gz` are
    CrossrankErrors naming the line.
    """
    number = 0
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):  # binary files split on b"\n" only
                if number == 1 and raw.startswith(BOM):  # editors on Windows start UTF-8 files with one
                    raw = raw[len(BOM):]
                line = decode_line(path, number, raw)
                ended = line.endswith("\n")
                yield number, (line[:-1].removesuffix("\r") if ended else line), ended
    except GZIP_ERRORS as e:
        raise CrossrankError(f"{where(path, number + 1)}: the gzip file is truncated or corrupt ({e}; "
                             f"expected a complete .gz file)") from None


def read_text(path: str | os.PathLike) -> str:
    """A whole (small) text file, with the errors of `text_lines`."""
    return "\n".join(line for _, line, _ in text_lines(path))


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without the line break); blank lines are skipped."""
    for number, line, _ in text_lines(path):
        if line.strip():
            yield number, line


def beir_member(path: str | os.PathLike, names: tuple[str, ...]) -> Path:
    """A BEIR folder stands for its member file (the first of `names` that exists)."""
    path = Path(path)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise CrossrankError(f"{path}: folder has none of {', '.join(names)} (expected a BEIR folder)")
    return path
