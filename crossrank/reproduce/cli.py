"""Reproduce one result row of the papers: python -m crossrank reproduce ROW [--dry-run] [--slurm] [--tiny]

The row's chain from configs/reproduce/rows.yaml (first-stage runs, preprocessing, stage 1, stage 2, re-ranking
of every evaluation set x first stage, the table), each step the CLI command a user would type, run as a
subprocess; a rerun skips every step whose recorded inputs and outputs still match (docs/reproducing.md).
"""
from __future__ import annotations

import sys

from crossrank import cli
from crossrank.reproduce import rows as rows_mod
from crossrank.reproduce import slurm, table
from crossrank.reproduce.steps import Runner, present


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("row", help="a row of configs/reproduce/rows.yaml (e.g. ms-electra-KD-CL)")
    parser.add_argument("overrides", nargs="*", help="key=value added to every training step (e.g. "
                        "train.precision=fp32)")
    parser.add_argument("-g", "--gpus", help="GPU ids (0 or 0,1,2,3) or cpu (default 0; --tiny: cpu)")
    parser.add_argument("-t", "--threads", type=cli.int_in(1), default=16, help="CPU threads of BM25 steps")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; touch nothing")
    parser.add_argument("--slurm", action="store_true", help="one sbatch job per step, chained (afterok)")
    parser.add_argument("--tiny", action="store_true", help="the same chain on CPU in minutes (demo collection)")
    parser.add_argument("--demo", action="store_true", help="--tiny on the demo collection even where "
                        "../shared/data's TREC DL 2019/2020 are present")
    parser.add_argument("--only", metavar="STEP", help="run this one step (its earlier steps must be done)")
    parser.add_argument("--holm", action="store_true", help="Holm-correct the table's p-values over the row")
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        shared = args.tiny and not args.demo and rows_mod.shared_data() is not None
        plan = rows_mod.build_plan(args.row, tiny=args.tiny, gpus=args.gpus, threads=args.threads,
                                   overrides=args.overrides, shared=shared)
    except rows_mod.UnknownRow as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runner = Runner(plan)
    if args.slurm:
        steps = [plan.step(args.only)] if args.only else plan.steps
        extra = (["--tiny"] if args.tiny else []) + (["--demo"] if args.demo else []) + \
                (["--holm"] if args.holm else []) + list(args.overrides)
        return slurm.submit(plan, steps, plan.gpus, args.dry_run, extra=extra)
    if args.dry_run:
        print(dry_run(plan, runner))
        return 0
    code = runner.run(args.only, table=lambda r, outputs: table.write(plan, r, outputs, args.holm))
    table_id = plan.steps[-1].id
    if code == 0 and args.only in (None, table_id) and table_id not in runner.ran:
        print((runner.root / plan.steps[-1].outputs[0]).read_text(encoding="utf-8"))
    return code


def _data_lines(plan, key: str) -> list[str]:
    entry = plan.data.get(key, {}) or {}
    if "files" in entry:
        files = entry["files"]
        names = list(files) if isinstance(files, dict) else list(files)
        folder = entry.get("put_at", "")
        paths = [f"{folder}{n}" for n in names]
        missing = [p for p in paths if not present(p)]
        where = entry.get("url", "")
        if entry.get("local_copy"):
            where += f" (or copy {entry['local_copy']})"
        if entry.get("md5") and isinstance(entry["md5"], str):
            where += f", md5 {entry['md5']}"
        state = "present" if not missing else f"MISSING {', '.join(missing)}"
        return [f"      data {key}: {state}" + ("" if not missing else f"; get it from {where}, put at {folder}")]
    via = entry.get("via") or ("transformers (downloaded on first use)" if "hub_ids" in entry else "")
    return [f"      data {key}: fetched by {via} on first use ({', '.join(entry.get('ids', entry.get('hub_ids', [])))})"]


def dry_run(plan, runner) -> str:
    lines = [f"reproduce {plan.row}{' --tiny (smoke run)' if plan.tiny else ''}: {plan.spec.get('title', '')}",
             f"{len(plan.steps)} steps; records in {runner.records.relative_to(runner.root)}/; nothing is run "
             f"(--dry-run)", ""]
    total = 0.0
    made = {o: s.id for s in plan.steps for o in s.outputs}
    made.update({f"{{model:{s.id}}}": s.id for s in plan.steps if s.kind == "training"})
    for s in plan.steps:
        if s.kind == "training" and runner.outputs(s):
            made[runner.outputs(s)[0]] = s.id
    for i, step in enumerate(plan.steps, 1):
        status, why = runner.state(step)
        command = runner.resolve(step.command) or step.command
        lines.append(f"[{i:02d}] {step.id} ({step.kind}): {'done, skipped' if status == 'done' else 'to run'}"
                     f"{'' if status == 'done' else ' (' + why + ')'}")
        lines.append(f"      $ {command}")
        if step.note:
            lines.append(f"      note: {step.note}")
        for key in step.data:
            lines += _data_lines(plan, key)
        inputs = runner.inputs(step)
        for item in (inputs or step.inputs):
            if item.startswith("irds:"):
                state = "ir_datasets fetches it on first use"
            elif runner.resolve(item) and present(item):
                state = "present"
            else:
                state = f"made by {made[item]}" if item in made else "MISSING"
            lines.append(f"      in  {item} [{state}]")
        outputs = runner.outputs(step)
        for item in outputs if outputs is not None else (
                [step.output_template or "models/<run folder>/model"] if step.kind == "training" else step.outputs):
            lines.append(f"      out {item}")
        if step.needs:
            lines.append(f"      after {', '.join(step.needs)}")
        lines.append(f"      GPU-hours (estimate, H100): {step.gpu_hours:g}")
        total += step.gpu_hours
    lines += ["", f"total GPU-hours (estimates from rows.yaml; a step already done costs nothing): {total:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
