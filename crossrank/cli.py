"""What every entry point shares: argparse ranges, and `run_main`, which turns a failure the user caused into
one line on stderr and exit status 2.

    parser = cli.ArgumentParser(description=...)
    parser.add_argument("--k", type=cli.int_in(1), default=1000)
    ...
    if __name__ == "__main__":
        sys.exit(cli.run_main(main))

User-caused failures: `CrossrankError` (bad input, already `path:line: ...`), `OSError` (missing file,
permission denied, disk full, read-only file system: reported with the path), corrupt YAML, SQLite and
safetensors files. Anything else is a bug and keeps its traceback. Ctrl-C exits 130 without one.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sqlite3
import sys
from collections.abc import Callable

from crossrank.errors import CrossrankError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (`command line: ...`), exit 2, like every other error."""

    def error(self, message: str) -> None:  # argparse prints the whole usage first; --help still does
        print(f"error: command line: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse `type` for an integer in [lo, hi] (either bound may be None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"out of range (expected {_range(lo, hi)}, got {value})")
        return value
    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """argparse `type` for a finite number in [lo, hi]; `lo_open`/`hi_open` exclude the bound itself."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"out of range (expected {_range(lo, hi, lo_open, hi_open)}, "
                                             f"got {text})")
        return value
    parse.__name__ = "number"
    return parse


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def run_main(main: Callable[..., int | None], *args) -> int:
    """Call `main(*args)` and return its exit status; user-caused failures become `error: path: message`, 2."""
    try:
        return main(*args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- only the kinds `describe` knows are swallowed
        message = describe(e)
        if message is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun, every process would say the same
            _close_progress_bars()
            print(f"error: {message}", file=sys.stderr)
        return 2


def describe(e: BaseException) -> str | None:
    """The one-line message for a failure the user caused, or None for a bug."""
    if isinstance(e, CrossrankError):
        return " ".join(str(e).split("\n"))
    if isinstance(e, OSError):
        return describe_os_error(e)
    if isinstance(e, sqlite3.DatabaseError):
        return f"SQLite: {e} (a corrupt or foreign database file)"
    yaml_error = _yaml_error_type()
    if yaml_error and isinstance(e, yaml_error):
        return f"invalid YAML: {' '.join(str(e).split())}"
    if type(e).__name__ == "SafetensorError":  # safetensors' Rust error: not importable as a stable class
        return f"corrupt safetensors file ({e})"
    return None


def describe_os_error(e: OSError) -> str:
    """`path: what went wrong` for an OSError; disk full and read-only file systems say what to do."""
    path = e.filename if e.filename is not None else "(unknown file)"
    if e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    reason = " ".join((e.strerror or str(e)).split())  # one line, whatever the library put in its message
    hint = {errno.ENOSPC: "free some space and run the same command again",
            errno.EROFS: "write somewhere writable",
            errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
            errno.EISDIR: "expected a file"}.get(e.errno)
    return f"{path}: {reason}" + (f" ({hint})" if hint else "")


def _close_progress_bars() -> None:
    """A bar left open by the failure would have the error appended to its line: end it first."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


def _yaml_error_type():
    yaml = sys.modules.get("yaml")  # only if something imported it: then only it can raise its errors
    return yaml.YAMLError if yaml else None
