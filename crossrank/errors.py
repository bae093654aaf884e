"""The one error type a user can cause: reported by `cli.run_main` as one line, exit 2."""
from __future__ import annotations

import os


class CrossrankError(ValueError):
    """Bad input or configuration, reported as one line `path:line: what is wrong (expected X, got Y)`."""


def where(path: str | os.PathLike, line: int | None = None) -> str:
    """Format a location for an error message: `path:line` or `path`."""
    return f"{path}:{line}" if line is not None else str(path)
