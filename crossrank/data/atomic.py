"""Atomic writes: a temporary file in the target folder, fsynced, then renamed over the target, so a reader never
sees half a file; and the removal of the temporaries that killed writers left behind."""
from __future__ import annotations

import contextlib
import glob
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


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
