#!/usr/bin/env python
"""Turn raw training data into the train/valid files train.py reads: data/<dataset>/<objective>/."""
import argparse
import sys

from crossrank.io import CrossrankError
from crossrank.preprocessing import PRESETS, load_meta, prepare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True,
                        help=f"{' | '.join(PRESETS)} (the seeds' MS MARCO sets), a configs/datasets key, or a YAML path")
    parser.add_argument("--objective", choices=["CL", "KD"], help="CL: hard negatives from a run; KD: teacher ranking")
    parser.add_argument("--run", default="", help="CL: which of the dataset's runs (default: its first)")
    parser.add_argument("--evalperc", type=float, default=1.0, help="percentage of queries held out for validation")
    parser.add_argument("--seed", type=int, default=42, help="seed of the validation split")
    parser.add_argument("--depth", type=int, help="keep the top DEPTH candidates per query (default: all)")
    parser.add_argument("--out", default="", help="output folder (default: data/<dataset>/<objective>)")
    parser.add_argument("--lenient", action="store_true", help="skip malformed lines and report how many")
    parser.add_argument("--repair", action="store_true", help="RankGPT: keep answers that are not a permutation of "
                        "the top-20, repaired as RankGPT does (default: drop them, as the multi-stage seed does)")
    args = parser.parse_args()
    try:
        folder = prepare(args.dataset, args.objective or "", args.run, args.evalperc, args.seed, args.depth,
                         args.out, args.lenient, args.repair)
    except CrossrankError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}/{{train,valid}}.parquet and meta.yaml")
    print("counts: " + ", ".join(f"{key} {value}" for key, value in load_meta(folder)["counts"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
