"""`reproduce`: the --tiny chain end to end (table, resume, a changed input redoes only what follows), --dry-run
and --slurm --dry-run of every row touching nothing, and one test per recipe error the driver would reproduce."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crossrank.config import ROOT, load_run_config
from crossrank.reproduce import cli, rows

SEED_OOD = {"climate-fever", "dbpedia-entity", "nq", "quora", "scidocs", "trec-covid", "arguana"}


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if ".git" in path.parts or "__pycache__" in path.parts or ".pytest_cache" in path.parts:
            continue
        stat = path.lstat()
        digest.update(f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        if path.is_file() and stat.st_size < (1 << 20):
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _project_copy(dest: Path) -> Path:
    """The code, configs and wrappers without data/, models/, runs/: an isolated project folder."""
    dest.mkdir()
    for name in ("crossrank", "configs", "slurm", "scripts"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for file in ROOT.glob("*.sh"):
        shutil.copy2(file, dest / file.name)
    for name in ("train.py", "infer.py", "preprocessing.py"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("data", "models", "runs"):
        (dest / name).mkdir()
    return dest


def _reproduce(project: Path, *args: str) -> tuple[int, str, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(project), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "crossrank", "reproduce", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    ran = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("== run ")]
    return done.returncode, done.stdout + done.stderr, ran


def test_tiny_end_to_end_resumes_and_redoes_only_what_follows_a_change(tmp_path, tiny_bert):
    project = _project_copy(tmp_path / "project")
    args = ["ms-electra-CL", "--tiny", f"model.path={tiny_bert}", "train.max_steps=2", "train.eval_every=1",
            "eval.depth=10"]
    code, out, ran = _reproduce(project, *args)
    assert code == 0, out[-3000:]
    steps = ["demo", "bm25-demo", "bm25-demo-test", "prep-ms-CL", "train-ms-electra-CL",
             "rerank-ms-electra-CL-demo-test-bm25", "table-ms-electra-CL"]
    assert ran == steps
    assert "SMOKE RUN" in out and "| demo-test | bm25 | nDCG@10 | n/a |" in out
    assert (project / "runs/reproduce/ms-electra-CL.tiny.md").read_text().startswith("# ms-electra-CL")
    for step in steps:
        assert (project / f"runs/reproduce/tiny/steps/{step}.done.json").is_file()

    code, out, ran = _reproduce(project, *args)  # everything matches its record: nothing runs
    assert code == 0 and ran == [] and out.count("== skip") == len(steps)
    assert "| demo-test | bm25 | nDCG@10 |" in out  # the table is printed again

    meta = project / "data/demo/CL/meta.yaml"  # a touched preprocessing output: that step is redone
    meta.write_text(meta.read_text() + "# touched\n")
    code, out, ran = _reproduce(project, *args)
    assert code == 0 and ran[:1] == ["prep-ms-CL"] and "demo" not in ran and "bm25-demo" not in ran

    recipe = project / "configs/recipes/ms-electra-CL.yaml"  # a config value: training and what follows
    recipe.write_text(recipe.read_text().replace("weight_decay: 0.01", "weight_decay: 0.02"))
    code, out, ran = _reproduce(project, *args)
    assert code == 0, out[-3000:]
    # the table follows only if the re-ranked run's bytes changed (a 2-step change of weight decay may not)
    assert ran in (steps[4:], steps[4:6])
    assert list((project / "models").glob("tiny-electra.CL.f1.lr1e-05.s42.replaced-*"))  # the old run kept aside


@pytest.mark.parametrize("tiny", [False, True])
def test_dry_run_of_every_row_lists_steps_and_data_and_touches_nothing(capsys, tiny):
    before = _tree_digest(ROOT)
    for row in rows.row_names(rows.load_rows()):
        assert cli.main([row, "--dry-run"] + (["--tiny"] if tiny else [])) == 0
        out = capsys.readouterr().out
        plan = rows.build_plan(row, tiny=tiny, shared=tiny and rows.shared_data() is not None)  # as the CLI decides
        for i, step in enumerate(plan.steps, 1):
            assert f"[{i:02d}] {step.id} (" in out
        assert "GPU-hours" in out and "total GPU-hours" in out
        if not tiny and not (ROOT / "data/raw/set-encoder").is_dir():
            assert "data set-encoder-trec-dl-runs: MISSING" in out and "github.com/webis-de/set-encoder" in out
        if not tiny and row.startswith("ms-") and not (ROOT / "data/raw/colbertv2").is_dir():
            assert "zenodo.org/records/12528410" in out or "rankgpt" in out.lower()
    assert _tree_digest(ROOT) == before


def test_slurm_dry_run_prints_chained_sbatch_scripts_without_sbatch(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    before = _tree_digest(ROOT)
    assert cli.main(["ms-electra-KD-CL", "--slurm", "--dry-run", "-g", "0"]) == 0
    out = capsys.readouterr().out
    plan = rows.build_plan("ms-electra-KD-CL")
    assert out.count("#!/usr/bin/env bash") == len(plan.steps)
    assert out.count("--dependency=afterok:") == len(plan.steps) - 1
    assert './reproduce.sh ms-electra-KD-CL --only train-ms-electra-KD-CL -g "${CUDA_VISIBLE_DEVICES:-cpu}" &' in out
    assert "./reproduce.sh ms-electra-KD-CL --only prep-ms-CL -g cpu &" in out
    assert "#SBATCH --gres=gpu:1" in out and "trap 'kill -USR1" in out
    assert _tree_digest(ROOT) == before


def test_bad_row_is_one_line_listing_the_rows(capsys):
    assert cli.main(["no-such-row"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ms-electra-KD-CL" in err and "se-electra-novelty" in err


# -- the recipe errors (each fails on the configs before issue 21's fixes) ---------------------------------

def test_multi_stage_rows_evaluate_the_seeds_seven_out_of_domain_sets():
    ood = yaml.safe_load((ROOT / "configs/datasets/outofdomain.yaml").read_text())["datasets"]
    assert {d.removeprefix("beir-") for d in ood} == SEED_OOD
    tree = rows.load_rows()
    for row in (r for r in rows.row_names(tree) if r.startswith("ms-")):
        plan = rows.build_plan(row, tree=tree)
        beir = {s.dataset.removeprefix("beir-") for s in plan.steps if s.kind == "rerank" and s.dataset.startswith("beir-")}
        assert beir == SEED_OOD, row
        assert {"dlhard", "devsmall"} <= {s.dataset for s in plan.steps if s.kind == "rerank"}, row


def test_dl_rows_rerank_the_imported_pyserini_bm25_run():
    tree = rows.load_rows()
    for row in rows.row_names(tree):
        plan = rows.build_plan(row, tree=tree)
        for dataset, year in (("dl19", 2019), ("dl20", 2020)):
            step = plan.step(f"rerank-{row}-{dataset}-bm25")
            assert step.inputs[1] == f"runs/{dataset}.bm25-pyserini.run", row
            first = plan.step(step.needs[1])
            assert first.command.startswith("python -m crossrank first-stage import ")
            assert f"__bm25__msmarco-passage-trec-dl-{year}-judged.run" in first.command


@pytest.mark.parametrize("backbone", ["electra", "roberta"])
def test_kd_cl_stage_two_moves_the_weights(tiny_bert, backbone):
    """A few AdamW steps at the KD->CL recipe's stage-2 lr change the weights of magnitude >= 1e-3 of a tiny
    model; at the seed's optimizer_s2.yaml 6e-12 (the pre-fix recipe) none of them changes."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from crossrank.training.losses import lce

    cfg = load_run_config([ROOT / f"configs/recipes/ms-{backbone}-KD-CL.yaml"], [])

    def changed(lr: float) -> float:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay)
        ids = torch.randint(5, 100, (8, 12))
        for _ in range(3):
            scores = model(input_ids=ids).logits.view(2, 4)
            loss = lce(scores, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]), torch.ones(2, 4, dtype=torch.bool))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        moved = total = 0
        for n, p in model.named_parameters():
            big = before[n].abs() >= 1e-3
            moved += int((p.detach()[big] != before[n][big]).sum())
            total += int(big.sum())
        return moved / total

    assert cfg.train.stage == 2 and cfg.train.objective == "CL"
    assert changed(cfg.optim.lr) > 0.5
    assert changed(6e-12) == 0.0


def test_slurm_submits_one_job_per_step_chained_afterok(tmp_path, monkeypatch):
    from crossrank.reproduce import slurm

    (tmp_path / "bin").mkdir()
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "bin" / "sbatch"  # prints a new job id, logs its arguments
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\necho $(( 100 + $(wc -l < {log}) ))\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    shutil.copytree(ROOT / "slurm", tmp_path / "slurm")
    plan = rows.build_plan("se-electra")
    assert slurm.submit(plan, plan.steps, "0,1", False, out=lambda *_: None, root=tmp_path) == 0
    calls = log.read_text().splitlines()
    assert len(calls) == len(plan.steps) and "--dependency" not in calls[0]
    for i, call in enumerate(calls[1:], 1):
        assert call.startswith(f"--parsable --dependency=afterok:{100 + i} ")
    scripts = sorted((tmp_path / "runs/reproduce/slurm/se-electra").glob("*.sbatch"))
    assert len(scripts) == len(plan.steps)
    train = next(s for s in scripts if s.name.endswith("-train-se-stage1.sbatch")).read_text()
    assert "#SBATCH --gres=gpu:4" in train and "./reproduce.sh se-electra --only train-se-stage1 -g" in train
    prep = next(s for s in scripts if s.name.endswith("-prep-se-CL.sbatch")).read_text()
    assert "--gres" not in prep and "./reproduce.sh se-electra --only prep-se-CL -g cpu &" in prep


def test_tiny_with_shared_data_imports_the_papers_runs_and_reranks_dl19_dl20():
    plan = rows.build_plan("ms-electra-KD-CL", tiny=True, shared=True)
    imports = [s for s in plan.steps if s.id.startswith("import-")]
    assert len(imports) == 4 and all("../shared/data/trec-dl/original/set-encoder/" in s.command for s in imports)
    reranks = {(s.dataset, s.first_stage) for s in plan.steps if s.kind == "rerank"}
    assert reranks == {(f"dl{y}-shared", f) for y in (19, 20) for f in ("bm25", "colbert")}
    assert all(s.command.endswith(" -L") for s in plan.steps if s.kind == "rerank")
    assert [s.id for s in plan.steps if s.kind == "training"] == ["train-ms-electra-KD", "train-ms-electra-KD-CL"]


@pytest.mark.parametrize("recipe, stage, objective, dataset, extra", [
    ("se-electra-stage1", 1, "CL", "msmarco-train-colbert", []),
    ("se-electra-stage2", 2, "KD", "msmarco-train-rankzephyr", []),
    ("se-electra-novelty", 2, "KD", "msmarco-train-novelty", ["data.novelty=true"])])
def test_set_encoder_wrapper_path_is_the_recipe(recipe, stage, objective, dataset, extra):
    """`./ft-monoencoder.sh -f S -c set-encoder:electra -m O -d D` stacks these files and overrides: the same
    training config as the recipe (16 queries, 1 epoch, clipping 10 in configs/set-encoder/ before the fix)."""
    import dataclasses

    configs = ROOT / "configs"
    files = [configs / "backbones/set-encoder.yaml", configs / "backbones/electra.yaml",
             configs / f"objectives/{objective}.yaml", configs / f"set-encoder/{objective}.yaml"]
    wrapper = load_run_config(files, ["model.name=set-encoder-electra", f"train.stage={stage}",
                                      f"data.dataset={dataset}", *extra])
    ours = load_run_config([configs / f"recipes/{recipe}.yaml"], [])
    for section in ("model", "data", "optim", "train"):
        a, b = dataclasses.asdict(getattr(wrapper, section)), dataclasses.asdict(getattr(ours, section))
        differ = {k for k in a if a[k] != b[k]} - {"previous"}  # "" = the other objective, CL: the same chain
        assert not differ, (section, {k: (a[k], b[k]) for k in differ})


def test_training_reads_the_text_it_is_evaluated_on():
    for name in ("msmarco-train", "msmarco-train-colbert", "msmarco-train-rankzephyr", "msmarco-train-novelty"):
        tree = yaml.safe_load((ROOT / f"configs/datasets/{name}.yaml").read_text())
        assert tree["corpus"] == "irds:msmarco-passage", name
    assert yaml.safe_load((ROOT / "configs/datasets/dl19.yaml").read_text())["corpus"] == "irds:msmarco-passage"
