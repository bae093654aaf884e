"""The optional SQLite score cache, keyed by the model's fingerprint, the query text and the passage text."""
from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from pathlib import Path


from crossrank.config import ModelConfig
from crossrank.errors import CrossrankError
from crossrank.models.card import SETTINGS_FILE
from crossrank.models.mono import resolve_model_path


def model_fingerprint(path: str | os.PathLike, model_cfg: ModelConfig, listwise: bool = False) -> str:
    """sha256 of the weights, tokenizer files and the truncation settings: what determines a pair's score.
    `listwise` (the loaded model's): the Set-Encoder's `model.sample_at_inference` counts too."""
    folder = Path(resolve_model_path(str(path)))
    digest = hashlib.sha256()
    # crossrank.json (the model card's settings, its step and validation figure) is left out: the settings that
    # change scores are hashed below, as they apply
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".txt", ".model")
                   and p.name != SETTINGS_FILE)
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    settings = (model_cfg.kind, model_cfg.truncation, model_cfg.max_length, model_cfg.query_length,
                model_cfg.passage_length)
    if listwise:  # pseudo-states at inference change the scores of short lists (the depth
        settings += (model_cfg.sample_at_inference,)  # they fill up to is in set_encoder.json, hashed above)
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def check_score_cache(path: str | os.PathLike) -> None:
    """An existing cache that SQLite cannot read is reported before the model loads, not after it."""
    if not Path(path).exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.execute("SELECT name FROM sqlite_master").fetchall()
    except sqlite3.DatabaseError as e:
        raise CrossrankError(f"{path}: not a readable score cache (SQLite: {e}); delete it to start an empty "
                             f"one") from None


def text_digest(text: str) -> str:
    """sha256 of a passage's text: the cache keys scores by text, so an edited corpus never gets old scores."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ScoreCache:
    """Scores by (model key, query text, sha256 of the passage text) in SQLite; safe for several processes. The
    model key is the fingerprint plus the resolved precision (`<fingerprint>/int8`), never `auto`, so scores of
    another precision or device are never reused. (Caches of older versions, keyed by docno in a table `scores`,
    are left unread: their scores may belong to another text.)"""

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # used from the tokenising thread (get) and the main thread (put): one connection behind a lock
        self.db = sqlite3.connect(str(path), timeout=120, check_same_thread=False)
        self.lock = threading.Lock()
        self.db.execute("CREATE TABLE IF NOT EXISTS pair_scores (model TEXT, query TEXT, passage TEXT, "
                        "score REAL, PRIMARY KEY (model, query, passage))")
        self.fingerprint = fingerprint

    def get(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Cached scores of (query text, passage digest) pairs."""
        found = {}
        with self.lock:
            for query in {q for q, _ in pairs}:
                rows = self.db.execute("SELECT passage, score FROM pair_scores WHERE model = ? AND query = ?",
                                       (self.fingerprint, query)).fetchall()
                found.update({(query, passage): score for passage, score in rows})
        return {pair: found[pair] for pair in pairs if pair in found}

    def put(self, scores: dict[tuple[str, str], float]) -> None:
        with self.lock, self.db:
            self.db.executemany("INSERT OR REPLACE INTO pair_scores VALUES (?, ?, ?, ?)",
                                [(self.fingerprint, q, p, s) for (q, p), s in scores.items()])
