#!/usr/bin/env python
"""Turn raw training data into the train/valid files train.py reads: data/<dataset>/<objective>/."""
import sys

from crossrank import cli
from crossrank.training.preprocessing import PRESETS, prepare
from crossrank.training.examples import load_meta


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True,
                        help=f"{' | '.join(PRESETS)} (the seeds' MS MARCO sets), a configs/datasets key, or a YAML path")
    parser.add_argument("--objective", choices=["CL", "KD"], help="CL: hard negatives from a run; KD: teacher ranking")
    parser.add_argument("--run", default="", help="CL: which of the dataset's runs (default: its first)")
    parser.add_argument("--evalperc", type=cli.float_in(0, 100, hi_open=True), default=1.0,
                        help="percentage of queries held out for validation, in [0, 100)")
    parser.add_argument("--seed", type=cli.int_in(0), default=42, help="seed of the validation split")
    parser.add_argument("--depth", type=cli.int_in(1), help="keep the top DEPTH candidates per query (default: all)")
    parser.add_argument("--out", default="", help="output folder (default: data/<dataset>/<objective>)")
    parser.add_argument("--lenient", action="store_true", help="skip malformed lines and report how many")
    parser.add_argument("--repair", action="store_true", help="RankGPT: keep answers that are not a permutation of "
                        "the top-20, repaired as RankGPT does (default: drop them, as the multi-stage seed does)")
    parser.add_argument("--split", choices=["sklearn", "hash"], default="sklearn", help="validation queries: "
                        "sklearn (default: exactly ceil(evalperc%% of the queries), drawn as the multi-stage seed's "
                        "train_test_split(random_state=seed) over the qids in source order) or hash (a seeded hash "
                        "per qid: order-independent, about evalperc%%); recorded in meta.yaml")
    parser.add_argument("--texts", choices=["dataset", "teacher"], default="dataset", help="RankGPT KD: the "
                        "dataset's query and passage texts (as the references; default) or RankGPT's copies")
    args = parser.parse_args()
    folder = prepare(args.dataset, args.objective or "", args.run, args.evalperc, args.seed, args.depth,
                     args.out, args.lenient, args.repair, args.split, args.texts)
    print(f"wrote {folder}/{{train,valid}}.parquet and meta.yaml")
    print("counts: " + ", ".join(f"{key} {value}" for key, value in load_meta(folder)["counts"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
