"""Re-rank first-stage runs with a cross-encoder checkpoint and evaluate them (see crossrank/inference/pipeline.py).

    python infer.py --config configs/backbones/electra.yaml train.stage=1 train.objective=CL eval.dataset=dl19
    python infer.py --model models/bert.CL.f1.lr1e-05.s42/model eval.dataset=indomain eval.first_stage=colbert
    torchrun --nproc_per_node 2 infer.py ...      # queries sharded over ranks, merged into one run
"""
import sys
from pathlib import Path

from crossrank import cli
from crossrank.config import load_run_config
from crossrank.errors import CrossrankError


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="YAML merged over configs/defaults.yaml")
    parser.add_argument("--model", help="checkpoint folder (default: found under models/ by naming.py)")
    parser.add_argument("--lr", type=cli.float_in(0, lo_open=True),
                        help="narrow the checkpoint search to this learning rate")
    parser.add_argument("--seed", type=cli.int_in(0), help="narrow the checkpoint search to this seed")
    parser.add_argument("--lenient", action="store_true", help="skip unknown qids/docnos and duplicates")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.depth=1000")
    args = parser.parse_intermixed_args()  # --config may follow a key=value
    cfg = load_run_config(args.config, args.overrides + (["eval.lenient=true"] if args.lenient else []))
    if args.model and args.model.startswith(("/", ".", "~")) and not Path(args.model).expanduser().exists():
        raise CrossrankError(f"{args.model}: no such model folder (expected a checkpoint folder or a hub id)")
    from crossrank.inference.pipeline import run_inference  # torch and transformers: only once the config is valid

    run_inference(cfg, args.model, args.lr, args.seed, config_files=args.config)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
