"""LLM teacher rankings: RankGPT's sliding windows (`crossrank.teacher.rankgpt`) over an OpenAI-compatible chat endpoint
(`crossrank.teacher.chat`), one query at a time, resumable; `crossrank.teacher.cli` is its command line (`rank_gpt.py`).

Outputs, for `--output OUT`:
    OUT                  TREC run, score = depth - rank + 1 (depth = the query's number of candidates), teacher
                         order, queries in qid order; written atomically at the end
    OUT.partial          completed queries, appended one query at a time (flushed and fsynced); a killed run
                         resumes from it (each query verified against the input: a query cut short is ranked
                         again, with a note); deleted when OUT is written
    OUT.log.jsonl        one record per request (prompt, answer, usage, parse problems) and per retry
    OUT.summary.json     settings and cost-relevant counts (requests, tokens, retries, malformed answers),
                         cumulative over resumed sessions; rewritten after every request and every completed
                         query (its query count is the verified completed queries, so a kill cannot skew it)
The --base-url is stored and shown without its credentials (`endpoint.redact_url`).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from crossrank.data.atomic import atomic_write, remove_stale_temporaries
from crossrank.data.runs import clean_tag, qid_order, read_run_queries, top_k_docnos, write_run
from crossrank.data.texts import load_corpus, read_topics
from crossrank.errors import CrossrankError
from crossrank.teacher.chat import ChatClient, JsonlLog, Stats
from crossrank.teacher.endpoint import credentials_for, parse_url, proxy_for, redact_url
from crossrank.teacher.config import RESUME_KEYS, TeacherConfig
from crossrank.teacher.rankgpt import fit_messages, parse_permutation, sliding_windows, token_counter


def rank_query(qid: str, query: str, docnos: list[str], texts: dict[str, str], cfg: TeacherConfig,
               client: ChatClient, count: Callable, stats: Stats) -> list[str]:
    """Sliding windows over the query's candidates (first-stage order) -> the teacher's order."""
    ranking = list(docnos)
    for start, end in sliding_windows(len(ranking), cfg.window, cfg.step):
        if client.stop.is_set():
            raise CrossrankError("stopped")
        window = ranking[start:end]
        if len(window) < 2:
            continue  # a query with one candidate: nothing to ask
        messages, words, estimate = fit_messages(query, [texts[d] for d in window], cfg, count)
        context = {"qid": qid, "window": [start + 1, end]}  # 1-based ranks, inclusive
        began = time.monotonic()
        completion = client.complete(messages, context)  # checked: content a str, usage a dict of counts
        answer, usage, finish_reason = completion["content"], completion["usage"], completion["finish_reason"]
        order, problems = parse_permutation(answer, len(window))
        stats.add(requests=1, prompt_tokens=usage.get("prompt_tokens") or 0,
                  completion_tokens=usage.get("completion_tokens") or 0,
                  requests_without_usage=0 if usage else 1, malformed_answers=1 if problems else 0,
                  truncated_answers=1 if finish_reason == "length" else 0)
        with stats.lock:
            for problem in problems:
                stats.problems[problem] = stats.problems.get(problem, 0) + 1
        client.log.write({"type": "request", **context, "docnos": window, "passage_words": words,
                          "prompt_tokens_counted": estimate, **({"messages": messages} if cfg.log_prompts else {}),
                          "answer": client.scrub(answer), "finish_reason": finish_reason, "usage": usage,
                          "problems": problems, "order": [o + 1 for o in order],
                          "seconds": round(time.monotonic() - began, 3)})
        ranking[start:end] = [window[o] for o in order]
    return ranking


def paths(output: str | Path) -> dict[str, Path]:
    output = Path(output)
    return {"run": output, "partial": Path(f"{output}.partial"), "log": Path(f"{output}.log.jsonl"),
            "summary": Path(f"{output}.summary.json")}


def read_partial(path: Path, candidates: dict[str, list[str]]) -> dict[str, list[str]]:
    """Completed queries of a killed (OUT.partial) or finished (OUT) run: {qid: docnos in teacher order}.

    Every query is verified before it is reused: exactly its candidates in the input's top --k, each once,
    ranks 1..n in order (a query is its own checksum). Only the end of the file can be cut (each query is one
    fsynced write, so a kill, or a file cut short, tears the last query): a last query that is an incomplete
    prefix, or a last line without its line break, is dropped and ranked again, with one line on stderr
    saying so. Anything else that disagrees with the input (another run, --k or --dataset, a damaged query
    before the last) is an error."""
    try:
        blocks = list(read_run_queries(path, torn_ok=True))
    except CrossrankError as e:
        raise CrossrankError(f"{e}; the file is damaged: delete it or pass --overwrite") from None
    torn = _ends_torn(path)
    done: dict[str, list[str]] = {}
    redone = ""
    for i, (number, qid, rows) in enumerate(blocks):
        docnos, ranks = [d for d, _, _ in rows], [r for _, r, _ in rows]
        expected = candidates.get(qid, [])
        in_order = ranks == list(range(1, len(rows) + 1))
        if qid not in done and in_order and sorted(docnos) == sorted(expected):
            done[qid] = docnos
            continue
        if i == len(blocks) - 1 and qid not in done and in_order and set(docnos) < set(expected):
            redone = f"query {qid} is incomplete ({len(docnos)} of its {len(expected)} candidates)"
            continue
        raise CrossrankError(f"{path}:{number}: query {qid or '?'} does not match the input run's top --k "
                             f"(expected its {len(expected)} candidates once, ranked 1..{len(expected)}, got "
                             f"{len(docnos)}); it is from another input or damaged: delete it or pass --overwrite")
    if redone or torn:
        what = redone or "its last line is cut"
        print(f"note: {path}: {what}, as a kill or a cut file leaves it; ranked again", file=sys.stderr)
    return done


def _ends_torn(path: Path) -> bool:
    """Whether the file's last line lacks its line break (a write cut short)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def dry_run(cfg: TeacherConfig, queries: dict[str, tuple[str, list[str]]], texts: dict[str, str],
            count: Callable, counting: str) -> dict:
    """What the queries still to do would cost, without a request: the windows over the first-stage order
    (the teacher's answers change which passages share a window, not how many windows there are)."""
    requests = prompt_tokens = 0
    for query, docnos in queries.values():
        for start, end in sliding_windows(len(docnos), cfg.window, cfg.step):
            if end - start >= 2:
                requests += 1
                prompt_tokens += fit_messages(query, [texts[d] for d in docnos[start:end]], cfg, count)[2]
    completion_tokens = requests * cfg.max_completion_tokens  # an upper bound: the reserve
    return {"state": "dry run", "token_counting": counting, "queries": len(queries), "requests": requests,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "cost_estimate": cfg.cost(prompt_tokens, completion_tokens)}


def resume_point(files: dict[str, Path], settings: dict) -> tuple[Path | None, dict]:
    """Where completed queries are (the partial file of a killed run, or a finished run to extend, e.g. with a
    larger --limit) and the previous summary; other settings than the previous session's are an error."""
    resume_from = next((files[f] for f in ("partial", "run") if files[f].is_file()), None)
    previous = read_summary(files["summary"]) if resume_from and files["summary"].is_file() else {}
    if previous.get("settings", settings) != settings:
        changed = [f"--{k.replace('_', '-')} {previous['settings'].get(k)!r} -> {settings[k]!r}"
                   for k in RESUME_KEYS if previous["settings"].get(k) != settings[k]]
        raise CrossrankError(f"{resume_from}: cannot resume with other settings ({'; '.join(changed)}; "
                             f"expected the same ones, or --overwrite to start again)")
    return resume_from, previous


def read_summary(path: Path) -> dict:
    """A previous session's summary, checked before its settings and counts are reused (it is written
    atomically, so a damaged one was damaged by something else: an error, not a guess)."""
    try:
        summary = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        summary = None
    counts = [summary.get(f, 0) for f in Stats.FIELDS] if isinstance(summary, dict) else []
    if not (isinstance(summary, dict) and isinstance(summary.get("settings"), dict)
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in counts)
            and all(isinstance(summary.get(k, {}), dict) for k in ("malformed_by_problem", "retries_by_reason"))):
        raise CrossrankError(f"{path}: not a teacher summary (damaged?), so neither its settings nor its counts "
                             f"can be checked (expected the JSON this command writes: delete it to resume "
                             f"without the earlier counts, or pass --overwrite)")
    return summary


def partial_lines(qid: str, docnos: list[str], tag: str) -> str:
    depth = len(docnos)
    return "".join(f"{qid} Q0 {d} {r} {depth - r + 1} {tag}\n" for r, d in enumerate(docnos, 1))


def clear_outputs(cfg: TeacherConfig, files: dict[str, Path]) -> None:
    """Remove a killed session's half-written temporaries, and with --overwrite the previous outputs."""
    if cfg.dry_run:
        return
    if files["run"].parent.is_dir():
        for path in files.values():
            remove_stale_temporaries(path)  # a killed session's half-written partial, summary or run
    if cfg.overwrite:
        for path in files.values():
            path.unlink(missing_ok=True)


def topics_of(path: str, qids: list[str]) -> dict[str, str]:
    """The topics of `path`; every qid to rank must have one."""
    topics = read_topics(path)
    missing = [qid for qid in qids if qid not in topics]
    if missing:
        raise CrossrankError(f"{path}: {len(missing)} queries of the run have no topic (e.g. "
                             f"{', '.join(missing[:5])}; expected every run qid in the topics)")
    return topics


def summary_writer(path: Path, cfg: TeacherConfig, settings: dict, counting: str, key_env: str,
                   stats: Stats) -> Callable[[str], dict]:
    """A function writing OUT.summary.json atomically in a given state (thread-safe); it returns the summary."""
    lock = threading.Lock()

    def write_summary(state: str) -> dict:
        summary = {"state": state, "settings": settings, "token_counting": counting, "api_key_env":
                   key_env, "base_url": redact_url(cfg.base_url), **stats.as_dict(cfg)}
        with lock, atomic_write(path) as f:
            json.dump(summary, f, indent=1)
        return summary

    return write_summary


def append_query(partial, qid: str, docnos: list[str], tag: str) -> None:
    """One completed query onto OUT.partial, flushed and fsynced: a kill tears the last query only."""
    partial.write(partial_lines(qid, docnos, tag))
    partial.flush()
    os.fsync(partial.fileno())


def run_pool(concurrency: int, todo: list[str], rank_one: Callable[[str], list[str]],
             record: Callable[[str, list[str]], None], stop: threading.Event) -> None:
    """Rank the `todo` qids, `concurrency` in flight; `record` each in this thread as it finishes. On the way
    out (done, error or interrupt) `stop` is set: in-flight queries stop after their current request."""
    pending: dict[Future, str] = {}
    remaining = iter(todo)
    with ThreadPoolExecutor(concurrency, thread_name_prefix="teacher") as pool:
        try:
            while True:
                while len(pending) < concurrency and (qid := next(remaining, None)) is not None:
                    pending[pool.submit(rank_one, qid)] = qid
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    qid = pending.pop(future)
                    record(qid, future.result())
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)


def rank(cfg: TeacherConfig) -> dict:
    """Rank every query of `cfg.run` (resuming from `OUT.partial`), write OUT; returns the summary."""
    from tqdm import tqdm

    cfg.validate()
    parse_url(cfg.base_url)  # one line naming the URL without its credentials (endpoint.redact_url)
    key_env = ""
    if not cfg.dry_run:  # refused credentials or an unusable proxy stop the run before anything is touched
        key_env = credentials_for(cfg.base_url, cfg.api_key_env).variable
        proxy_for(parse_url(cfg.base_url))
    tag = clean_tag(cfg.tag, "rankgpt")
    files = paths(cfg.output)
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    clear_outputs(cfg, files)
    resume_from, previous = resume_point(files, settings) if not cfg.overwrite else (None, {})
    candidates = top_k_docnos(cfg.run, cfg.k)
    qids = sorted(candidates, key=qid_order)[: cfg.limit or None]
    topics = topics_of(cfg.topics, qids)
    done = read_partial(resume_from, candidates) if resume_from else {}
    todo = [qid for qid in qids if qid not in done]
    texts = load_corpus(cfg.corpus, {d for qid in todo for d in candidates[qid]}) if todo else {}
    count, counting = token_counter(cfg.tokenizer, cfg.model)
    if cfg.dry_run:
        return dry_run(cfg, {qid: (topics[qid], candidates[qid]) for qid in todo}, texts, count, counting)
    with atomic_write(files["partial"]) as f:  # without a torn last query, before appending
        f.writelines(partial_lines(qid, docnos, tag) for qid, docnos in done.items())

    stats = Stats(previous)
    stats.counts["queries"] = len(done)  # the verified completed queries, not a count a kill may have skewed
    write_summary = summary_writer(files["summary"], cfg, settings, counting, key_env, stats)
    write_summary("running")
    log = JsonlLog(files["log"])
    log.write({"type": "session", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings,
               "base_url": redact_url(cfg.base_url), "token_counting": counting, "queries_done": len(done),
               "queries_todo": len(todo)})
    stop = threading.Event()
    client = ChatClient(cfg, stats, log, stop)
    stats.on_request = lambda: write_summary("running")  # the summary stays exact if the run is killed

    def rank_one(qid: str) -> list[str]:
        return rank_query(qid, topics[qid], candidates[qid], texts, cfg, client, count, stats)

    bar = tqdm(total=len(qids), initial=len(qids) - len(todo), desc="queries", unit="q", disable=not cfg.progress)
    try:
        with open(files["partial"], "a", encoding="utf-8") as partial:
            def record(qid: str, docnos: list[str]) -> None:
                done[qid] = docnos
                append_query(partial, qid, docnos, tag)
                stats.add(queries=1)
                write_summary("running")  # with this query: a kill before the next request keeps it counted
                bar.update(1)
                bar.set_postfix(requests=stats.counts["requests"], malformed=stats.counts["malformed_answers"],
                                retries=stats.counts["retries"], refresh=False)

            run_pool(cfg.concurrency, todo, rank_one, record, stop)
    except BaseException:
        write_summary("interrupted")
        raise
    finally:
        bar.close()
        log.close()
    write_run(files["run"], {qid: [(d, float(len(ds) - r)) for r, d in enumerate(ds)] for qid, ds in done.items()},
              tag)
    files["partial"].unlink()
    return write_summary("complete")
