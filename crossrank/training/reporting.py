"""Training logs: metrics.jsonl (truncated to the checkpoint on resume), optional TensorBoard/W&B,
the learning-curve plot."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


from crossrank import config as config_io
from crossrank.config import RunConfig
from crossrank.data.atomic import atomic_write
from crossrank.errors import CrossrankError


def format_duration(seconds: float) -> str:
    """3725 -> '1:02:05' (the ETA in the bar)."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they will be logged again). A torn last line (killed
    while appending) is such a row; a broken line before it is a damaged file."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                if number == len(lines):
                    break
                raise CrossrankError(f"{path}:{number}: not a metrics row (expected JSON with a step, got "
                                     f"{line[:60]!r}); fix or delete the line to resume") from None
            if row_step <= step:
                rows.append(line)
        with atomic_write(path) as f:
            f.writelines(row + "\n" for row in rows)


def log_row(folder: Path, row: dict, reporters: list) -> None:
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    for reporter in reporters:
        reporter.log(row)


class _TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: RunConfig, folder: Path):
        import wandb
        self.run = wandb.init(project="crossrank", name=folder.name, id=folder.name, resume="allow",
                              dir=str(folder), config=config_io.to_dict(cfg))

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


def open_reporters(cfg: RunConfig, folder: Path) -> list:
    reporters = []
    for name in cfg.train.report_to:
        try:
            reporters.append(_TensorBoard(folder) if name == "tensorboard" else _WandB(cfg, folder))
        except ImportError:
            raise CrossrankError(f"config: train.report_to has {name}, which is not installed "
                                 f"(pip install {name}, or drop it from train.report_to)") from None
    return reporters


def plot_curve(folder: Path, metric: str) -> None:
    """curve.png: training loss and validation metric against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()] \
        if (folder / "metrics.jsonl").is_file() else []
    train_rows = [r for r in rows if "loss" in r]
    valid_rows = [r for r in rows if f"valid_{metric}" in r]
    figure, left = plt.subplots(figsize=(7, 4))
    left.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], color="tab:blue")
    left.set_xlabel("optimiser step")
    left.set_ylabel("training loss", color="tab:blue")
    if valid_rows:
        right = left.twinx()
        right.plot([r["step"] for r in valid_rows], [r[f"valid_{metric}"] for r in valid_rows], "o-",
                   color="tab:orange")
        right.set_ylabel(f"validation {metric}", color="tab:orange")
    figure.tight_layout()
    with contextlib.suppress(OSError):
        figure.savefig(folder / ".curve.tmp.png")
        os.replace(folder / ".curve.tmp.png", folder / "curve.png")
    plt.close(figure)
