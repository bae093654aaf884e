"""The command line of `rank_gpt.py`: flags to a `TeacherConfig` (with `--dataset` sources), the summary line."""
from __future__ import annotations

import argparse
import contextlib

from crossrank import cli
from crossrank.teacher.endpoint import OPENAI_HOST, OPENAI_KEY_ENV
from crossrank.errors import CrossrankError
from crossrank.data.outputs import output_lock, refuse_overwriting_inputs
from crossrank.teacher.run import paths, rank
from crossrank.teacher.config import TeacherConfig

def build_parser() -> argparse.ArgumentParser:
    d = TeacherConfig
    positive, count, amount = cli.int_in(1), cli.int_in(0), cli.float_in(0)  # argparse types with ranges
    p = cli.ArgumentParser(
        description="Re-rank a run's top-k with an LLM (RankGPT sliding windows over an OpenAI-compatible "
                    "chat endpoint) and write the teacher's ranking as a TREC run.")
    p.add_argument("--dataset", help="configs/datasets key (or YAML): its topics, corpus and runs (then --run may "
                                     "be one of its run keys)")
    p.add_argument("--run", required=True, help="first-stage TREC run (path, irds:<id>, or a --dataset run key)")
    p.add_argument("--topics", help="topics: TSV, JSONL, TREC topic file, BEIR folder or irds:<id>")
    p.add_argument("--corpus", help="corpus: TSV, JSONL, BEIR folder or irds:<id>")
    p.add_argument("-o", "--output", required=True, help="output TREC run (also OUT.partial, OUT.log.jsonl, "
                                                         "OUT.summary.json)")
    p.add_argument("--model", required=True, help="model name the endpoint serves (e.g. gpt-4o-mini, "
                                                  "castorini/rank_zephyr_7b_v1_full)")
    p.add_argument("--base-url", default=d.base_url, help="OpenAI-compatible API root, e.g. "
                   "http://localhost:8000/v1 for vLLM (default: %(default)s); user:password@ in it is sent as Basic "
                   "authentication and shown redacted; redirects are not followed; a loopback URL never goes "
                   "through $http_proxy/$https_proxy/$all_proxy, an https one tunnels through an http:// proxy")
    p.add_argument("--api-key-env", default=d.api_key_env, help="environment variable holding the API key, sent "
                   f"to --base-url (default: ${OPENAI_KEY_ENV}, sent only to {OPENAI_HOST} over https; never over "
                   "plain http to a host that is not loopback)")
    p.add_argument("--k", type=positive, default=d.k, help="re-rank the top K of each query (default: %(default)s)")
    p.add_argument("--window", type=cli.int_in(2), default=d.window,
                   help="passages per prompt (default: %(default)s; --window K: one prompt per query)")
    p.add_argument("--step", type=positive, default=d.step, help="window stride (default: %(default)s)")
    p.add_argument("--novelty-prompt", dest="novelty", action="store_true",
                   help="rank by relevance and novelty: near-duplicates of higher passages go to the bottom")
    p.add_argument("--passage-words", type=positive, default=d.passage_words,
                   help="starting word budget per passage, shrunk until the prompt fits (default: %(default)s)")
    p.add_argument("--context-size", type=positive, default=d.context_size,
                   help="model context in tokens (default: %(default)s)")
    p.add_argument("--max-completion-tokens", type=count, default=d.max_completion_tokens,
                   help="answer budget, reserved in the context (default: 6 per passage + 32)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="local tokenizer folder or cached hub id for token "
                                                            "counts (default: --model if local; 'none': estimate)")
    p.add_argument("--concurrency", type=positive, default=d.concurrency,
                   help="queries in flight (default: %(default)s)")
    p.add_argument("--timeout", type=cli.float_in(0, lo_open=True), default=d.timeout,
                   help="seconds per request: a deadline for all of it (connect, send, the whole answer), not the "
                        "gap between bytes (default: %(default)s)")
    p.add_argument("--max-response-bytes", type=cli.int_in(1024), default=d.max_response_bytes,
                   help="largest answer accepted, checked while it is read; a larger one is a failed request, "
                        "retried (default: %(default)s = 4 MiB)")
    p.add_argument("--retries", type=count, default=d.retries, help="retries per request (default: %(default)s)")
    p.add_argument("--backoff", type=amount, default=d.backoff,
                   help="first retry delay in seconds, doubling (default: %(default)s)")
    p.add_argument("--max-backoff", type=amount, default=d.max_backoff, help="cap of the delay (default: %(default)s)")
    p.add_argument("--limit", type=count, default=d.limit, help="only the first N queries in qid order (0: all)")
    p.add_argument("--tag", default=d.tag, help="run tag (default: %(default)s)")
    p.add_argument("--no-log-prompts", dest="log_prompts", action="store_false",
                   help="log answers and usage but not the prompts (the log is ~40 KB per request with them)")
    p.add_argument("--price-prompt", type=amount, default=0.0, help="price per million prompt tokens (summary)")
    p.add_argument("--price-completion", type=amount, default=0.0, help="price per million completion tokens")
    p.add_argument("--dry-run", action="store_true", help="count the requests and prompt tokens the remaining "
                                                          "queries need (cost estimate); send and write nothing")
    p.add_argument("--overwrite", action="store_true", help="start again, deleting OUT, its partial, log and summary")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, resolve `--dataset` sources, rank; returns the summary."""
    args = vars(build_parser().parse_args(argv))
    dataset = args.pop("dataset")
    inputs = []
    if dataset:
        from crossrank.data.datasets import load_dataset

        ds = load_dataset(dataset)
        args["run"] = ds.run(args["run"])
        args["topics"] = args["topics"] or ds.source("topics")
        args["corpus"] = args["corpus"] or ds.source("corpus")
        inputs = ds.inputs(produced_teacher=True)  # its teacher ranking is what this command makes
    for flag in ("topics", "corpus"):
        if not args[flag]:
            raise CrossrankError(f"--{flag} is missing (expected a path or irds:<id>, or --dataset KEY)")
    out = args["output"]
    refuse_overwriting_inputs([("-o", out)] + [(f"-o's {kind} file", path) for kind, path in paths(out).items()
                                               if kind != "run"],
                              [("the --run file", args["run"]), ("the --topics file", args["topics"]),
                               ("the --corpus file", args["corpus"])] + inputs)
    with output_lock(out) if not args["dry_run"] else contextlib.nullcontext():  # one session per output
        return rank(TeacherConfig(**args))


def format_summary(summary: dict) -> str:
    keys = ("queries", "requests", "prompt_tokens", "completion_tokens", "malformed_answers", "retries")
    if summary.get("state") == "dry run":
        keys = ("queries", "requests", "prompt_tokens", "completion_tokens")
    text = ", ".join(f"{summary.get(k, 0)} {k.replace('_', ' ')}" for k in keys)
    text = f"dry run ({summary['token_counting']}): {text} at most" if summary.get("state") == "dry run" else text
    return text + (f", cost estimate {summary['cost_estimate']}" if summary.get("cost_estimate") else "")
