"""Fine-tune a cross-encoder: python train.py --config a.yaml [--config b.yaml ...] [section.key=value ...]

configs/defaults.yaml is read first, then every --config in order, then the overrides. Under torchrun the
same command runs one process per GPU. Exit status: 0 done, 2 bad input or configuration, 3 interrupted by
SIGTERM/SIGUSR1 after saving a checkpoint (rerun the same command to resume).
"""
import argparse
import os
import sys

from crossrank.config import load_run_config
from crossrank.io import CrossrankError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML file (repeatable, later wins)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-5 train.max_steps=100")
    args = parser.parse_args()
    try:
        from crossrank.training import train

        state = train(load_run_config(args.config, args.overrides))
    except CrossrankError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, every process would say the same
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if state.finished else 3


if __name__ == "__main__":
    sys.exit(main())
