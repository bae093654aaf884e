"""Fine-tune a cross-encoder: python train.py --config a.yaml [--config b.yaml ...] [section.key=value ...]

configs/defaults.yaml is read first, then every --config in order, then the overrides. Under torchrun the
same command runs one process per GPU. Exit status: 0 done, 2 bad input or configuration, 3 interrupted by
SIGTERM/SIGUSR1 after saving a checkpoint (rerun the same command to resume).
"""
import sys

from crossrank import cli
from crossrank.config import load_run_config


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML file (repeatable, later wins)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-5 train.max_steps=100")
    args = parser.parse_intermixed_args()  # --config may follow a key=value
    cfg = load_run_config(args.config, args.overrides)
    from crossrank.training.loop import train  # torch and transformers: only once the config is valid

    return 0 if train(cfg).finished else 3


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
