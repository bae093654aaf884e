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
import os
import re
import socket
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
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


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without the line break); blank lines are skipped."""
    for number, line, _ in text_lines(path):
        if line.strip():
            yield number, line


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


# ---------------------------------------------------------------------------------------------------------
# Outputs: never one of the inputs, and one writer at a time


# (label, path) pairs, or a dict label -> path; empty paths and `irds:` ids are skipped
Sources = Iterable[tuple[str, "str | os.PathLike | None"]] | dict[str, "str | os.PathLike | None"]


def _pairs(items) -> list[tuple[str, str]]:
    """(label, path) pairs of local paths: `irds:` ids and empty values are not files."""
    items = items.items() if isinstance(items, dict) else items
    return [(label, str(path)) for label, path in items if path and not str(path).startswith("irds:")]


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: by device and inode when both exist (so hard links and symlinks
    count), else by their resolved paths (links in the existing part of the path followed)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _inside(inner: str, outer: str) -> bool:
    """Whether `inner` lies below the folder `outer` (links resolved)."""
    inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def refuse_overwriting_inputs(outputs: Sources, inputs: Sources, folders: Sources = ()) -> None:
    """Raise CrossrankError before anything is written when an output file is (or resolves to, through a symlink
    or hard link) one of the inputs, when two outputs are one file, or when an output folder is an input or
    holds one. `outputs` and `folders` (folder outputs) are (flag or description, path) pairs; `inputs` are
    (what it is, path) pairs, e.g. ("the corpus of dataset demo", "data/demo/corpus.tsv")."""
    files, folders, inputs = _pairs(outputs), _pairs(folders), _pairs(inputs)
    every = files + folders
    for i, (label, out) in enumerate(every):
        for what, source in inputs:
            if same_file(out, source):
                how = "" if os.path.abspath(out) == os.path.abspath(source) else f" ({source})"
                raise CrossrankError(f"{out}: {label} is {what}{how}; refusing to overwrite an input (expected "
                                     f"an output path that is none of the inputs; nothing was written)")
            if i >= len(files) and _inside(source, out):
                raise CrossrankError(f"{out}: {label} is a folder that holds {what} ({source}); refusing to write "
                                     f"over an input (expected a folder without inputs; nothing was written)")
        for other_label, other in every[:i]:
            if same_file(out, other):
                raise CrossrankError(f"{out}: {label} is the same file as {other_label} ({other}) (expected a "
                                     f"separate path for each output; nothing was written)")


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: `.<name>.lock` next to it (in its resolved folder, so that two spellings
    of one output share one lock)."""
    path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path.parent)) / f".{path.name}.lock"


_HELD: dict[str, list] = {}  # lock file -> [fd, how many holders in this process]


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of the output `path` (a file or a folder) for the block: a second crossrank process
    that wants to write it gets one clear CrossrankError naming the holder. An `fcntl.flock` on `.<name>.lock`:
    the kernel releases it when the holder dies, so a killed process never leaves a lock that blocks; the file is
    removed on release. Re-entrant within one process."""
    acquire_output_lock(path)
    try:
        yield
    finally:
        release_output_lock(path)


def acquire_output_lock(path: str | os.PathLike) -> None:
    import fcntl

    lock = lock_path(path)
    key = str(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    created = []  # the folders made for the lock: removed again on release if nothing else was put there
    folder = lock.parent
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except PermissionError:  # another user's lock file (left by a crash): flock works on a read-only fd too
            if not lock.exists():
                _remove_empty(created)
                raise
            fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").split()
            os.close(fd)
            who = f" (pid {holder[0]} on host {holder[1]})" if len(holder) == 2 else ""
            _remove_empty(created)
            raise CrossrankError(f"{path}: another crossrank process{who} is writing it (expected one writer "
                                 f"per output; wait for it to end, or stop it)") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder we waited for may have removed the file: then lock the one now at that path
            current = os.stat(lock)
            held = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    with contextlib.suppress(OSError):  # who holds it, for the message of a second writer (a full disk: no one)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _HELD[key] = [fd, 1, created]


def release_output_lock(path: str | os.PathLike) -> None:
    key = str(lock_path(path))
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(key)  # while still holding it: a waiter then sees another inode and retries
        os.close(held[0])
        _remove_empty(held[2])


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a lock created, deepest first, as long as they are empty (a refused or failed command
    leaves no folder behind; one that wrote its output keeps it)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
