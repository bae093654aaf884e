"""Run a plan step by step, each a subprocess (the command a user would type), and record each finished step.

A record, `runs/reproduce/steps/<step>.done.json` (`runs/reproduce/tiny/steps/` for `--tiny`), is written
atomically and last: the command, and the SHA-256 of every input and output (a folder: of the manifest of its
files' relative paths and SHA-256s; a file over 1 GiB: of its size and first and last 64 MiB; an `irds:` id: the
ir_datasets version and the id). A step is skipped when its record's command, inputs and outputs all match the
files as they are now; otherwise it runs again, and every step reading its outputs then sees changed inputs.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from crossrank.config import ROOT
from crossrank.data.atomic import atomic_write
from crossrank.errors import CrossrankError
from crossrank.reproduce.rows import PLACEHOLDER, Plan, Step

BIG = 1 << 30
EDGE = 64 << 20
_child: subprocess.Popen | None = None


def records_folder(plan: Plan, root: Path = ROOT) -> Path:
    return root / "runs" / "reproduce" / ("tiny/steps" if plan.tiny else "steps")


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size > BIG:  # size + first and last 64 MiB
            digest.update(f"size {size}\n".encode())
            digest.update(f.read(EDGE))
            f.seek(size - EDGE)
            digest.update(f.read(EDGE))
        else:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(item: str, root: Path = ROOT) -> str | None:
    """SHA-256 of a file, of a folder's manifest, or the ir_datasets version of an `irds:` id; None if absent."""
    if item.startswith("irds:"):
        try:
            from importlib.metadata import version
            return f"ir_datasets {version('ir_datasets')} {item}"
        except Exception:  # noqa: BLE001 - not installed: the id alone
            return f"ir_datasets ? {item}"
    path = Path(item) if Path(item).is_absolute() else root / item
    if path.is_file():
        return _file_hash(path)
    if path.is_dir():
        manifest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
            manifest.update(f"{file.relative_to(path).as_posix()}\t{_file_hash(file)}\n".encode())
        return "manifest:" + manifest.hexdigest()
    return None


def present(item: str, root: Path = ROOT) -> bool:
    if item.startswith("irds:"):
        return True  # fetched by ir_datasets on first use
    return (Path(item) if Path(item).is_absolute() else root / item).exists()


class Runner:
    def __init__(self, plan: Plan, root: Path = ROOT, out=print):
        self.plan, self.root, self.out = plan, root, out
        self.records = records_folder(plan, root)
        self._models: dict[str, Path | None] = {}
        self.ran: list[str] = []      # the steps this invocation ran (the others were skipped)

    # -- placeholders ------------------------------------------------------------------------------------
    def model_folder(self, step_id: str) -> Path | None:
        """The run folder a training step writes (`models/<name>`), by crossrank.training.naming, as train.py
        names it; None while a stage-2 step's starting model does not exist yet."""
        if step_id in self._models:
            return self._models[step_id]
        step = self.plan.step(step_id)
        overrides = [self.resolve(o) for o in step.overrides]
        if any(o is None for o in overrides):
            self._models[step_id] = None  # until a step runs (which clears this cache)
            return None
        from crossrank.config import load_run_config
        from crossrank.training import naming

        cfg = load_run_config([self.root / c for c in step.configs], overrides)
        if cfg.train.output_dir:
            folder = Path(cfg.train.output_dir)
        else:
            chain = naming.objective_chain(cfg.train.objective, cfg.train.stage, cfg.train.previous)
            label = naming.model_label(cfg.model.name or cfg.model.path, cfg.data.novelty)
            start = ""
            if cfg.train.stage == 2:
                init = Path(cfg.train.init_from) if cfg.train.init_from else None
                if init is None:
                    raise CrossrankError(f"step {step_id}: stage 2 without train.init_from (rows.yaml names the "
                                         f"stage-1 model with {{model:STEP}})")
                init = init if init.is_absolute() else self.root / init
                if not list(init.glob("*.safetensors")):
                    self._models[step_id] = None
                    return None
                start = naming.checkpoint_hash(init)
            folder = Path(cfg.train.models_dir) / naming.run_name(label, chain, cfg.train.stage, cfg.optim.lr,
                                                                  cfg.train.seed, cfg.data.dataset, start)
        folder = folder if folder.is_absolute() else self.root / folder
        self._models[step_id] = folder
        return folder

    def resolve(self, text: str) -> str | None:
        """Fill in {model:S}, {hash:S}, {run_name:S}; None when S's folder is not known yet."""
        missing = False

        def sub(match) -> str:
            nonlocal missing
            kind, ref = match.groups()
            folder = self.model_folder(ref)
            if folder is None:
                missing = True
                return match.group(0)
            if kind == "model":
                return _rel(folder / "model", self.root)
            if kind == "run_name":
                return folder.name
            from crossrank.training import naming
            return naming.checkpoint_hash(folder / "model")

        text = PLACEHOLDER.sub(sub, text)
        return None if missing else text

    def outputs(self, step: Step) -> list[str] | None:
        if step.kind == "training":
            folder = self.model_folder(step.id)
            return None if folder is None else [_rel(folder / "model", self.root)]
        resolved = [self.resolve(o) for o in step.outputs]
        return None if any(o is None for o in resolved) else resolved

    def inputs(self, step: Step) -> list[str] | None:
        resolved = [self.resolve(i) for i in step.inputs]
        return None if any(i is None for i in resolved) else resolved

    # -- records --------------------------------------------------------------------------------------------
    def record_path(self, step: Step) -> Path:
        return self.records / f"{step.id}.done.json"

    def read_record(self, step: Step) -> dict | None:
        path = self.record_path(step)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def state(self, step: Step) -> tuple[str, str]:
        """("done", "") when the record matches the files as they are; else ("run", why)."""
        record = self.read_record(step)
        if record is None:
            return "run", "no record"
        command, inputs, outputs = self.resolve(step.key or step.command), self.inputs(step), self.outputs(step)
        if command is None or inputs is None or outputs is None:
            return "run", "an earlier step is not done"
        if record.get("key", record.get("command")) != command:
            return "run", "the command changed"
        for item in inputs:
            if record.get("inputs", {}).get(item) != fingerprint(item, self.root):
                return "run", f"input changed: {item}"
        if set(record.get("inputs", {})) != set(inputs):
            return "run", "the inputs changed"
        for item in outputs:
            if record.get("outputs", {}).get(item) != fingerprint(item, self.root):
                return "run", f"output changed or missing: {item}"
        return "done", ""

    def write_record(self, step: Step, command: str, inputs: list[str], outputs: list[str], seconds: float) -> None:
        record = {"step": step.id, "row": self.plan.row, "command": command,
                  "key": self.resolve(step.key or step.command),
                  "inputs": {i: fingerprint(i, self.root) for i in inputs},
                  "outputs": {o: fingerprint(o, self.root) for o in outputs},
                  "seconds": round(seconds, 1),
                  "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.records.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.record_path(step)) as f:
            json.dump(record, f, indent=1)

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, only: str | None = None, table=None) -> int:
        done: set[str] = set()
        for step in self.plan.steps:
            if only and step.id != only:
                if self.state(step)[0] == "done":
                    done.add(step.id)
                continue
            blocked = [n for n in step.needs if n not in done and self.state(self.plan.step(n))[0] != "done"]
            if blocked:
                raise CrossrankError(f"step {step.id}: needs {', '.join(blocked)} first (run the row without "
                                     f"--only, or those steps)")
            status, why = self.state(step)
            if status == "done":
                self.out(f"== skip {step.id} (done: its inputs and outputs match runs/reproduce record)")
                done.add(step.id)
                continue
            self.out(f"== run  {step.id} ({why})")
            code = self._run_step(step, table)
            if code:
                return code
            self.ran.append(step.id)
            done.add(step.id)
        return 0

    def _run_step(self, step: Step, table) -> int:
        inputs = self.inputs(step)
        missing = [i for i in inputs if not present(i, self.root)]
        if missing:
            raise CrossrankError(f"step {step.id}: missing input {', '.join(missing)} (see --dry-run: where to get it)")
        if step.kind == "training" and self.read_record(step) is not None:
            folder = self.model_folder(step.id)
            if folder is not None and folder.exists():  # inputs changed: start afresh, keep the old run aside
                stale = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d%H%M%S')}")
                folder.rename(stale)
                self.out(f"   the inputs changed: moved the previous run to {_rel(stale, self.root)}")
        command = self.resolve(step.command)
        start = time.time()
        if step.kind == "table":
            outputs = self.outputs(step)
            table(self, outputs)
        else:
            self.out(f"   $ {command}")
            code = self._subprocess(command)
            if code:
                hint = " (interrupted after a checkpoint: run the same command to resume)" if code == 3 else ""
                self.out(f"error: step {step.id} failed with exit status {code}{hint}")
                return code
            outputs = self.outputs(step)
        self._models.clear()  # a retrained stage 1 changes the folder name of the stage 2 after it
        lost = [o for o in outputs if not present(o, self.root)]
        if lost:
            raise CrossrankError(f"step {step.id}: finished but did not write {', '.join(lost)}")
        self.write_record(step, command, inputs, outputs, time.time() - start)
        return 0

    def _subprocess(self, command: str) -> int:
        global _child
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root)] + [p for p in [env.get("PYTHONPATH", "")] if p])
        if self.plan.tiny:
            env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        elif self.plan.gpus not in ("", "cpu"):
            env.setdefault("CUDA_VISIBLE_DEVICES", self.plan.gpus)
        words = shlex.split(command)
        if words[0] == "python":
            words[0] = sys.executable
        sys.stdout.flush()
        _child = subprocess.Popen(words, cwd=self.root, env=env)
        previous = {s: signal.signal(s, _forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
        try:
            return _child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _child = None


def _forward(signum, frame) -> None:  # SLURM's pre-emption signal: the step checkpoints and exits 3
    if _child is not None and _child.poll() is None:
        _child.send_signal(signum)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
