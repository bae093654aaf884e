"""Faults: a full disk while a run or a checkpoint is written leaves the old file as it was (and no temporary
copy); checkpoint files get the umask's mode like every other output; a failed re-ranking start leaves no
parts folder. Killed preprocessing and BM25 builds are tested in test_preprocessing.py and test_bm25.py."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossrank.inference import rerank as inference
from crossrank.models.loading import load_model
from crossrank.inference.candidates import Candidates
from crossrank.data.atomic import FILE_MODE, remove_stale_temporaries
from crossrank.data.runs import write_run
from crossrank.training import checkpoint as training
from crossrank.config import EvalConfig, ModelConfig, RunConfig
from crossrank.errors import CrossrankError

ROOT = Path(__file__).resolve().parents[1]

# A file-size limit makes the kernel refuse writes past it (EFBIG once SIGXFSZ is ignored), as a full disk
# refuses them with ENOSPC: the same failure at the same place, without a tiny file system to mount.
FULL_DISK = """
import resource, signal
def fill_the_disk(limit=4096):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
"""

RUN_WRITE = FULL_DISK + """
import sys
from crossrank.data.atomic import FILE_MODE, remove_stale_temporaries
from crossrank.data.runs import write_run
fill_the_disk()
try:
    write_run(sys.argv[1], {str(q): [(f"d{d}", float(d)) for d in range(100)] for q in range(100)})
except OSError as e:
    print(e.errno)
"""

CHECKPOINT_SAVE = FULL_DISK + """
import sys, torch
from pathlib import Path
from crossrank.training import checkpoint as training
from crossrank.config import RunConfig
from crossrank.models.mono import MonoEncoder, load_tokenizer
model, tokenizer = MonoEncoder.from_pretrained(sys.argv[1]), load_tokenizer(sys.argv[1])
optimizer, scaler = torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cuda", enabled=False)
folder = Path(sys.argv[2])
training.save_checkpoint(model, tokenizer, optimizer, scaler, RunConfig(), training.TrainState(step=1), folder)
with torch.no_grad():
    next(model.parameters()).add_(1.0)
fill_the_disk()
try:
    training.save_checkpoint(model, tokenizer, optimizer, scaler, RunConfig(), training.TrainState(step=2), folder)
except Exception as e:  # safetensors' SafetensorError is not an OSError
    print(e)
"""


def test_full_disk_during_a_run_write_keeps_the_old_run(tmp_path):
    out = tmp_path / "out.run"
    write_run(out, {"1": [("old", 1.0)]})
    before = out.read_bytes()
    result = subprocess.run([sys.executable, "-c", RUN_WRITE, str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == str(errno.EFBIG), result.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.run"]  # no temporary file left


def test_enospc_at_fsync_keeps_the_old_run(tmp_path, monkeypatch):
    out = write_run(tmp_path / "out.run", {"1": [("old", 1.0)]})
    before = out.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_run(out, {"1": [("new", 2.0)]})
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.run"]


def test_full_disk_during_a_checkpoint_save_keeps_the_old_checkpoint(tiny_bert, tmp_path):
    folder = tmp_path / "run" / "checkpoint"
    result = subprocess.run([sys.executable, "-c", CHECKPOINT_SAVE, str(tiny_bert), str(folder)], cwd=ROOT,
                            capture_output=True, text=True)
    assert "File too large" in result.stdout, result.stderr
    assert {"model.safetensors", "state.pt", "crossrank.yaml"} <= {p.name for p in folder.iterdir()}
    assert torch.load(folder / "state.pt", weights_only=False)["state"]["step"] == 1  # the old one, whole
    from safetensors.torch import load_file

    assert load_file(folder / "model.safetensors")  # complete: it loads
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint"]  # no .checkpoint.tmp left


def test_checkpoint_files_get_the_umask_mode(tiny_bert, tmp_path):
    from crossrank.models.mono import MonoEncoder, load_tokenizer

    model, tokenizer = MonoEncoder.from_pretrained(tiny_bert), load_tokenizer(tiny_bert)
    optimizer, scaler = torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cuda", enabled=False)
    folder = tmp_path / "checkpoint"
    training.save_checkpoint(model, tokenizer, optimizer, scaler, RunConfig(), training.TrainState(), folder)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert modes["model.safetensors"] == oct(FILE_MODE)  # safetensors itself writes 0o600
    assert set(modes.values()) == {oct(FILE_MODE)}


def test_a_failed_rerank_start_leaves_no_parts_folder(tiny_bert, tmp_path):
    model, tokenizer = load_model(tiny_bert, ModelConfig(kind="set-encoder"), torch.device("cpu"))
    candidates = Candidates({"1": [("d1", 1.0)]}, {"1": "a query"}, {"d1": "a passage"})
    cfg = EvalConfig(score_cache=str(tmp_path / "cache"))
    with pytest.raises(CrossrankError, match="eval.score_cache cannot be used with model.kind set-encoder"):
        inference.rerank(model, tokenizer, candidates, tmp_path / "out.run", cfg, "fp")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".x.run.{host}-{dead.pid}.abc123.tmp"
    live = tmp_path / f".x.run.{host}-{os.getpid()}.def456.tmp"
    other = tmp_path / f".y.run.{host}-{dead.pid}.abc123.tmp"
    for path in (stale, live, other):
        path.write_text("half")
    assert remove_stale_temporaries(tmp_path / "x.run") == 1
    assert not stale.exists() and live.exists() and other.exists()


def _cache_with_rows(path: Path, rows: int = 2000) -> None:
    from crossrank.inference.cache import ScoreCache

    cache = ScoreCache(path, "fp")
    cache.put({(f"query {i}", f"passage {i}"): float(i) for i in range(rows)})
    cache.db.close()


def test_a_damaged_score_cache_is_set_aside_and_redone_with_one_line(tmp_path, capsys):
    """A SQLite cache that a crash or a full disk damaged (here: a page in the middle overwritten) is never
    read: it moves to `<cache>.damaged`, a new empty cache starts, and one warning line names both."""
    from crossrank.inference.cache import ScoreCache, check_score_cache

    path = tmp_path / "cache.sqlite"
    _cache_with_rows(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))
    check_score_cache(path)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {path}: damaged score cache")
    assert f"{path}.damaged" in lines[0] and (tmp_path / "cache.sqlite.damaged").read_bytes() == bytes(data)
    assert not path.exists()
    assert ScoreCache(path, "fp").get([("query 1", "passage 1")]) == {}  # the new cache starts empty


def test_an_intact_score_cache_is_kept_and_a_foreign_file_refused(tmp_path, capsys):
    from crossrank.inference.cache import ScoreCache, check_score_cache

    path = tmp_path / "cache.sqlite"
    _cache_with_rows(path, 10)
    check_score_cache(path)
    assert capsys.readouterr().err == "" and ScoreCache(path, "fp").get([("query 3", "passage 3")]) == {
        ("query 3", "passage 3"): 3.0}
    (tmp_path / "run.txt").write_text("1 Q0 d1 1 1.0 r\n")  # a run named by mistake: refused, never moved
    with pytest.raises(CrossrankError, match="run.txt: not a SQLite score cache"):
        check_score_cache(tmp_path / "run.txt")
    assert (tmp_path / "run.txt").read_text() == "1 Q0 d1 1 1.0 r\n"


def test_saved_model_folders_carry_a_manifest_that_finds_later_damage(tiny_bert, tmp_path):
    from crossrank.models.mono import MANIFEST, MonoEncoder, check_model_folder, load_tokenizer

    model, tokenizer = MonoEncoder.from_pretrained(tiny_bert), load_tokenizer(tiny_bert)
    folder = tmp_path / "model"
    training.save_model(model, tokenizer, RunConfig(), folder, training.TrainState())
    assert (folder / MANIFEST).is_file()
    check_model_folder(folder)  # as saved: fine
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-10] ^= 1  # one bit of one weight: the header still matches the size, safetensors cannot tell
    (folder / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CrossrankError, match="model.safetensors: damaged since it was saved"):
        check_model_folder(folder)
