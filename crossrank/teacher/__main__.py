"""`python -m crossrank teacher ...` (and rank_gpt.py): an LLM teacher's rankings, then a one-line summary."""
import sys

from crossrank import cli
from crossrank.teacher.cli import format_summary, main as rank_main


def main(argv: list[str] | None = None) -> int:
    summary = rank_main(sys.argv[1:] if argv is None else argv)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
