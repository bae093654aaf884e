"""`irds:<ir_datasets id>` sources: opening a data set with its errors as one line."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from crossrank.errors import CrossrankError


IRDS_PREFIX = "irds:"


def open_irds(source: str):
    """Load an ir_datasets dataset for an `irds:<id>` source (imported lazily: it is slow to import)."""
    import ir_datasets

    dataset_id = source[len(IRDS_PREFIX):]
    try:
        return ir_datasets.load(dataset_id)
    except KeyError as e:
        raise CrossrankError(f"{source}: unknown ir_datasets id ({e})") from None


@contextlib.contextmanager
def irds_errors(source: str) -> Iterator[None]:
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


def is_irds(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.startswith(IRDS_PREFIX)
