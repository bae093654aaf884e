"""`python -m crossrank <command> [args]` (or the `crossrank` console command): the library's command lines.

Each command is a module that also runs on its own (`python -m crossrank.evaluation.compare ...`); this entry
point only picks the module, so its flags, messages and exit codes are that module's.
"""
from __future__ import annotations

import runpy
import sys

COMMANDS = {  # command -> (module, one line for the listing)
    "demo": ("crossrank.demo", "generate the demo collection (data/demo/)"),
    "bm25": ("crossrank.first_stage.bm25", "BM25 run of a dataset's topics (PISA)"),
    "colbert": ("crossrank.first_stage.colbert", "ColBERTv2 run (PyLate; its own environment)"),
    "first-stage": ("crossrank.first_stage.importing", "import a first-stage run: first-stage import RUN OUT"),
    "compare": ("crossrank.evaluation.compare", "evaluate runs side by side with paired significance tests"),
    "reproduce": ("crossrank.reproduce.cli", "one paper row end to end: reproduce ROW [--dry-run|--slurm|--tiny]"),
    "teacher": ("crossrank.teacher", "LLM teacher rankings (RankGPT sliding windows), as rank_gpt.py"),
    "neural-teacher": ("crossrank.teacher.neural", "a teacher run from any cross- or bi-encoder's scores of a run"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "usage: python -m crossrank <command> [args] (each command has -h)\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: command line: unknown command {argv[0]!r} (expected one of: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    module = COMMANDS[argv[0]][0]
    sys.argv = [f"crossrank {argv[0]}", *argv[1:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
