"""LLM teacher rankings: RankGPT's sliding windows (`crossrank.teacher.rankgpt`) over an OpenAI-compatible chat endpoint
(`crossrank.teacher.chat`), one query at a time, resumable; `crossrank.teacher.cli` is its command line (`rank_gpt.py`).

Outputs, for `--output OUT`:
    OUT                  TREC run, score = depth - rank + 1 (depth = the query's number of candidates), teacher
                         order, queries in qid order; written atomically at the end
    OUT.partial          completed queries, appended one query at a time (flushed and fsynced); a killed run
                         resumes from it; deleted when OUT is written
    OUT.log.jsonl        one record per request (prompt, answer, usage, parse problems) and per retry
    OUT.summary.json     settings and cost-relevant counts (requests, tokens, retries, malformed answers),
                         cumulative over resumed sessions; rewritten after every request
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from crossrank.teacher.chat import ChatClient, JsonlLog, Stats, api_key_for
from crossrank.errors import CrossrankError
from crossrank.data.runs import qid_order, clean_tag, read_run_queries, write_run
from crossrank.data.atomic import atomic_write, remove_stale_temporaries
from crossrank.data.texts import load_corpus, read_topics
from crossrank.teacher.rankgpt import fit_messages, parse_permutation, sliding_windows, token_counter
from crossrank.data.runs import top_k_docnos
from crossrank.teacher.config import RESUME_KEYS, TeacherConfig


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
        data = client.complete(messages, context)
        choice = data["choices"][0]
        answer = (choice.get("message") or {}).get("content") or ""
        order, problems = parse_permutation(answer, len(window))
        usage = data.get("usage") or {}
        stats.add(requests=1, prompt_tokens=usage.get("prompt_tokens", 0) or 0,
                  completion_tokens=usage.get("completion_tokens", 0) or 0,
                  requests_without_usage=0 if usage else 1, malformed_answers=1 if problems else 0,
                  truncated_answers=1 if choice.get("finish_reason") == "length" else 0)
        with stats.lock:
            for problem in problems:
                stats.problems[problem] = stats.problems.get(problem, 0) + 1
        client.log.write({"type": "request", **context, "docnos": window, "passage_words": words,
                          "prompt_tokens_counted": estimate, **({"messages": messages} if cfg.log_prompts else {}),
                          "answer": answer, "finish_reason": choice.get("finish_reason"), "usage": usage,
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

    Only the last query can be torn (each query is one fsynced write); it is dropped. Anything else that
    disagrees with the input (another run, --k or --dataset) is an error."""
    try:
        blocks = [(number, qid, [docno for docno, _, _ in rows])
                  for number, qid, rows in read_run_queries(path, torn_ok=True)]
    except CrossrankError as e:
        raise CrossrankError(f"{e}; the file is damaged: delete it or pass --overwrite") from None
    done: dict[str, list[str]] = {}
    for i, (number, qid, docnos) in enumerate(blocks):
        complete = qid in candidates and sorted(docnos) == sorted(candidates[qid]) and qid not in done
        if complete:
            done[qid] = docnos
        elif i < len(blocks) - 1 or qid not in candidates:
            raise CrossrankError(f"{path}:{number}: query {qid or '?'} does not match the input run's top --k "
                                 f"(expected its {len(candidates.get(qid, []))} candidates once, got "
                                 f"{len(docnos)}); it is from another input: delete it or pass --overwrite")
    return done


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
    previous = json.loads(files["summary"].read_text()) if resume_from and files["summary"].is_file() else {}
    if previous.get("settings", settings) != settings:
        changed = [f"--{k.replace('_', '-')} {previous['settings'].get(k)!r} -> {settings[k]!r}"
                   for k in RESUME_KEYS if previous["settings"].get(k) != settings[k]]
        raise CrossrankError(f"{resume_from}: cannot resume with other settings ({'; '.join(changed)}; "
                             f"expected the same ones, or --overwrite to start again)")
    return resume_from, previous


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
                   key_env, "base_url": cfg.base_url, **stats.as_dict(cfg)}
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
    # a refused key stops the run before anything is touched
    key_env = api_key_for(cfg.base_url, cfg.api_key_env)[0] if not cfg.dry_run else ""
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
    write_summary = summary_writer(files["summary"], cfg, settings, counting, key_env, stats)
    write_summary("running")
    log = JsonlLog(files["log"])
    log.write({"type": "session", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings,
               "base_url": cfg.base_url, "token_counting": counting, "queries_done": len(done),
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
