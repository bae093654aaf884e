"""What a command that writes checks first: that no output is one of its inputs (`refuse_overwriting_inputs`),
and that no other process writes the same output (`output_lock`). Both end in one CrossrankError line, before
anything is written."""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from crossrank.data.atomic import FILE_MODE
from crossrank.errors import CrossrankError


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
