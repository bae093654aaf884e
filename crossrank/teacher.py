"""LLM teacher rankings: RankGPT's sliding-window listwise ranking over any OpenAI-compatible chat endpoint.

RankGPT (Sun et al., "Is ChatGPT Good at Search? Investigating Large Language Models as Re-Ranking Agents",
EMNLP 2023, arXiv:2304.09542) re-ranks a query's top-k candidates with a chat model. A window of `window`
passages is shown as one message per numbered passage; the model answers `[3] > [1] > [2] ...`. Windows slide
from the bottom of the list to the top by `step`, so good passages bubble up: with k=100, window 20, step 10
the windows are ranks 81-100, 71-90, ..., 1-20 (9 requests per query). `window >= k` is one request.

Prompt size: passages are cut to a word budget (RankGPT's 300 words) that shrinks until the conversation plus
the answer's token reserve fits `context_size`. Tokens are counted with the model's tokenizer when one is
available locally (a folder or the Hugging Face cache; its chat template when it has one), else estimated:
    tokens(text) = max(chars / 4, words * 4 / 3)    (OpenAI's two rules of thumb for English; the larger)
    tokens(conversation) = sum over messages of tokens(content) + 4, plus 3 for the answer's priming.

Outputs, for `--output OUT`:
    OUT                  TREC run, score = depth - rank + 1 (depth = the query's number of candidates), teacher
                         order, queries in qid order; written atomically at the end
    OUT.partial          completed queries, appended one query at a time (flushed and fsynced); a killed run
                         resumes from it; deleted when OUT is written
    OUT.log.jsonl        one record per request (prompt, answer, usage, parse problems) and per retry
    OUT.summary.json     settings and cost-relevant counts (requests, tokens, retries, malformed answers),
                         cumulative over resumed sessions; rewritten after every request
The API key is read from an environment variable only, sent in the Authorization header, and never written.
By default $OPENAI_API_KEY goes to the OpenAI API over https only; another host gets a key only from a
variable named with --api-key-env, and never over plain http unless the host is loopback (`api_key_for`).
"""
from __future__ import annotations

import argparse
import dataclasses
import email.utils
import http.client
import ipaddress
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from crossrank import cli
from crossrank.io import (IRDS_PREFIX, CrossrankError, qid_order, atomic_write, load_corpus, load_run, read_topics,
                          read_run_queries, remove_stale_temporaries, write_run)

SYSTEM = "You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query."
NOVELTY_SYSTEM = ("You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to "
                  "the query and their novelty.")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}
# settings that change the ranking: a resumed run must use the same ones
RESUME_KEYS = ("run", "topics", "corpus", "k", "window", "step", "model", "novelty", "passage_words",
               "context_size", "max_completion_tokens")


@dataclasses.dataclass
class TeacherConfig:
    run: str
    topics: str
    corpus: str
    output: str
    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = ""  # "": $OPENAI_API_KEY, sent to api.openai.com (https) only; see api_key_for
    k: int = 100
    window: int = 20
    step: int = 10
    novelty: bool = False
    passage_words: int = 300  # RankGPT's starting budget; shrinks until the prompt fits
    context_size: int = 4096  # gpt-3.5-turbo's (RankGPT's teacher) context
    max_completion_tokens: int = 0  # 0: 6 tokens per passage + 32 (an answer `[12] > ` is ~5 tokens per id)
    tokenizer: str = ""  # local tokenizer folder or cached hub id; "" tries --model; "none" estimates
    concurrency: int = 1
    timeout: float = 120.0
    retries: int = 8
    backoff: float = 1.0  # first retry waits ~backoff seconds, then doubling, capped at max_backoff
    max_backoff: float = 60.0
    limit: int = 0  # rank only the first N queries (qid order), e.g. to estimate cost
    tag: str = "rankgpt"
    log_prompts: bool = True
    price_prompt: float = 0.0  # per million prompt tokens, for the summary's cost estimate
    price_completion: float = 0.0
    overwrite: bool = False
    dry_run: bool = False  # count requests and prompt tokens, send nothing, write nothing
    progress: bool = True

    def validate(self) -> "TeacherConfig":
        checks = [(self.k >= 1, "--k", "a positive integer", self.k),
                  (self.window >= 2, "--window", "at least 2", self.window),
                  (1 <= self.step <= self.window, "--step", f"between 1 and --window ({self.window})", self.step),
                  (self.passage_words >= 1, "--passage-words", "a positive integer", self.passage_words),
                  (self.concurrency >= 1, "--concurrency", "a positive integer", self.concurrency),
                  (self.timeout > 0, "--timeout", "a positive number of seconds", self.timeout),
                  (self.retries >= 0, "--retries", "0 or more", self.retries),
                  (self.limit >= 0, "--limit", "0 (all) or more", self.limit),
                  (self.base_url.startswith(("http://", "https://")), "--base-url", "an http(s):// URL",
                   self.base_url)]
        for ok, flag, expected, got in checks:
            if not ok:
                raise CrossrankError(f"{flag} is invalid (expected {expected}, got {got!r})")
        if self.max_completion_tokens <= 0:
            self.max_completion_tokens = 6 * min(self.window, self.k) + 32
        return self


# ---------------------------------------------------------------------------------------------------------
# Windows, prompts, parsing


def sliding_windows(n: int, window: int, step: int) -> list[tuple[int, int]]:
    """[start, end) windows over ranks 0..n-1, from the bottom of the list up; the last one starts at 0.

    RankGPT's loop stops once a window would start above the list, so with n=25, window 20, step 10 it never
    compares the top 5 with anything; here the last window is clipped to start at 0 instead."""
    spans = []
    end = n
    while True:
        start = max(end - window, 0)
        spans.append((start, end))
        if start == 0:
            return spans
        end -= step


def build_messages(query: str, passages: list[str], words: int, novelty: bool = False) -> list[dict[str, str]]:
    """RankGPT's conversation: system role, the task, one user message per numbered passage (cut to `words`
    words) each acknowledged by the assistant, then the instruction asking for `[i] > [j]` output."""
    num = len(passages)
    if novelty:
        task = (f"I will provide you with {num} passages, each indicated by number identifier []. \nRank the "
                f"passages based on their relevance to query: {query}, and on their novelty: a passage that repeats "
                f"the information of a passage ranked above it is not novel.")
        instruction = (f"Search Query: {query}. \nRank the {num} passages above based on their relevance to the "
                       f"search query and their novelty. The most relevant passages should be listed first; a "
                       f"passage that is a near-duplicate of a passage ranked above it, or repeats its information, "
                       f"must go to the bottom, below every passage that adds new information. The passages should "
                       f"be listed in descending order using identifiers. The output format should be [] > [], "
                       f"e.g., [1] > [2]. Only respond with the ranking results, do not say any word or explain.")
    else:
        task = (f"I will provide you with {num} passages, each indicated by number identifier []. \nRank the "
                f"passages based on their relevance to query: {query}.")
        instruction = (f"Search Query: {query}. \nRank the {num} passages above based on their relevance to the "
                       f"search query. The passages should be listed in descending order using identifiers. The most "
                       f"relevant passages should be listed first. The output format should be [] > [], e.g., "
                       f"[1] > [2]. Only respond with the ranking results, do not say any word or explain.")
    messages = [{"role": "system", "content": NOVELTY_SYSTEM if novelty else SYSTEM},
                {"role": "user", "content": task},
                {"role": "assistant", "content": "Okay, please provide the passages."}]
    for i, text in enumerate(passages, 1):
        messages.append({"role": "user", "content": f"[{i}] {' '.join(text.split()[:words])}"})
        messages.append({"role": "assistant", "content": f"Received passage [{i}]."})
    messages.append({"role": "user", "content": instruction})
    return messages


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    """The documented estimate when no tokenizer is available (see the module docstring)."""
    total = 3
    for message in messages:
        text = message["content"]
        total += max(-(-len(text) // 4), -(-len(text.split()) * 4 // 3)) + 4
    return total


def token_counter(source: str, model: str) -> tuple[Callable[[list[dict[str, str]]], int], str]:
    """A function counting a conversation's tokens, and a description of how it counts.

    `source` is a tokenizer folder or hub id ("" tries `model`, "none" forces the estimate). Only local files
    are read: a hub id must already be in the Hugging Face cache. An explicit `source` that cannot be loaded is
    an error; an implicit one falls back to the estimate."""
    if source == "none" or (not source and not _tokenizer_is_local(model)):
        return estimate_tokens, "estimate (max(chars/4, words*4/3) + 4 per message)"
    name = source or model
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... for missing or foreign files
        if source:
            raise CrossrankError(f"--tokenizer {source}: cannot load it from local files ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0][:200]}; expected a tokenizer folder or a cached hub id, "
                                 f"or 'none' for the estimate)") from None
        return estimate_tokens, "estimate (max(chars/4, words*4/3) + 4 per message)"

    def count_template(messages: list[dict[str, str]]) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def count_contents(messages: list[dict[str, str]]) -> int:
        return 3 + sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) + 4 for m in messages)

    if getattr(tokenizer, "chat_template", None):
        try:
            count_template(build_messages("query", ["passage", "passage"], 1))
            return count_template, f"{name} (chat template)"
        except Exception:  # templates that refuse a system role or alternate roles strictly (jinja errors)
            pass
    return count_contents, f"{name} (contents + 4 per message)"


def _tokenizer_is_local(model: str) -> bool:
    if Path(model).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "tokenizer_config.json"), str)
    except Exception:  # not a valid repo id, no cache: then there is no local tokenizer
        return False


def fit_messages(query: str, passages: list[str], cfg: TeacherConfig,
                 count: Callable[[list[dict[str, str]]], int]) -> tuple[list[dict[str, str]], int, int]:
    """The largest word budget <= passage_words whose prompt fits `context_size - max_completion_tokens`
    (binary search: the token count grows with the budget). Returns (messages, words, prompt tokens)."""
    limit = cfg.context_size - cfg.max_completion_tokens

    def fits(words: int) -> tuple[bool, list[dict[str, str]], int]:
        messages = build_messages(query, passages, words, cfg.novelty)
        tokens = count(messages)
        return tokens <= limit, messages, tokens

    ok, messages, tokens = fits(cfg.passage_words)
    if ok:
        return messages, cfg.passage_words, tokens
    low, high = 0, cfg.passage_words  # fits(low) (or low == 0), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle)[0]:
            low = middle
        else:
            high = middle
    if low == 0:
        raise CrossrankError(f"a window of {len(passages)} passages does not fit --context-size {cfg.context_size} "
                             f"even at 1 word per passage (needs {fits(1)[2]} tokens + {cfg.max_completion_tokens} "
                             f"for the answer; expected a larger --context-size or a smaller --window)")
    _, messages, tokens = fits(low)
    return messages, low, tokens


def parse_permutation(answer: str, n: int) -> tuple[list[int], list[str]]:
    """An answer like `[2] > [1] > [3]` -> a 0-based order of all `n` passages, and the problems found.

    RankGPT's repair: take the identifiers in order, drop repeats and out-of-range ids, append the missing
    ones in their previous order. Identifiers are the `[i]` in the answer when it has any (so `[3] > [1], 2
    passages are off-topic` does not read `2` as an id), else every number in it; `<think>...</think>`
    reasoning is ignored. Problems: no_ids, duplicates, out_of_range, missing (empty list: well-formed)."""
    text = re.sub(r"<think>.*?(</think>|$)", " ", answer or "", flags=re.DOTALL)
    tokens = re.findall(r"\[\s*(\d+)\s*\]", text) or re.findall(r"\d+", text)
    order: list[int] = []
    problems: set[str] = set()
    for token in tokens:
        index = int(token) - 1
        if not 0 <= index < n:
            problems.add("out_of_range")
        elif index in order:
            problems.add("duplicates")
        else:
            order.append(index)
    if not tokens:
        problems.add("no_ids")
    elif len(order) < n:
        problems.add("missing")
    return order + [i for i in range(n) if i not in order], sorted(problems)


# ---------------------------------------------------------------------------------------------------------
# The endpoint


class Stats:
    """Cost-relevant counts, shared by the worker threads; cumulative over resumed sessions."""

    FIELDS = ("queries", "requests", "prompt_tokens", "completion_tokens", "requests_without_usage",
              "malformed_answers", "truncated_answers", "retries", "seconds_waiting")

    def __init__(self, previous: dict | None = None):
        self.lock = threading.Lock()
        self.on_request: Callable[[], object] = lambda: None  # called after each counted request
        previous = previous or {}
        self.counts = {f: previous.get(f, 0) for f in self.FIELDS}
        self.problems = dict(previous.get("malformed_by_problem", {}))
        self.retry_reasons = dict(previous.get("retries_by_reason", {}))

    def add(self, **counts: float) -> None:
        with self.lock:
            for key, value in counts.items():
                self.counts[key] += value
        if "requests" in counts:
            self.on_request()

    def as_dict(self, cfg: TeacherConfig) -> dict:
        with self.lock:
            out = dict(self.counts, malformed_by_problem=dict(self.problems),
                       retries_by_reason=dict(self.retry_reasons))
        out["seconds_waiting"] = round(out["seconds_waiting"], 3)
        out["cost_estimate"] = round((out["prompt_tokens"] * cfg.price_prompt
                                      + out["completion_tokens"] * cfg.price_completion) / 1e6, 6)
        return out


OPENAI_KEY_ENV, OPENAI_HOST = "OPENAI_API_KEY", "api.openai.com"


def api_key_for(base_url: str, api_key_env: str) -> tuple[str, str]:
    """(variable, key) to send to `base_url`, ("", "") for none.

    The default variable ($OPENAI_API_KEY, exported for OpenAI) goes to the OpenAI API over https only, so a
    vLLM or proxy URL does not receive it by accident; a variable the user names goes to any host, but a set
    key never travels in clear text (plain http) to a host that is not loopback.
    """
    url = urllib.parse.urlsplit(base_url)
    if not api_key_env:
        if url.scheme == "https" and url.hostname == OPENAI_HOST:
            return OPENAI_KEY_ENV, os.environ.get(OPENAI_KEY_ENV, "")
        return "", ""
    key = os.environ.get(api_key_env, "")
    if key and url.scheme != "https" and not _is_loopback(url.hostname or ""):
        raise CrossrankError(f"--base-url {base_url}: refusing to send ${api_key_env} over plain http to a host "
                             f"that is not loopback (expected an https:// URL, or http:// to localhost)")
    return api_key_env, key


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


class ChatClient:
    """POSTs chat completions with timeouts and retries: exponential backoff with jitter, `Retry-After`
    honoured, on 429, 5xx, dropped connections, timeouts and unreadable bodies. Standard library only."""

    def __init__(self, cfg: TeacherConfig, stats: Stats, log: "JsonlLog", stop: threading.Event):
        self.cfg, self.stats, self.log, self.stop = cfg, stats, log, stop
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.key_env, self.key = api_key_for(cfg.base_url, cfg.api_key_env)

    def complete(self, messages: list[dict[str, str]], context: dict) -> dict:
        cfg = self.cfg
        body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0,
                           "max_tokens": cfg.max_completion_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(cfg.retries + 1):
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=cfg.timeout) as response:
                    data = json.loads(response.read())
                if not isinstance(data, dict) or not data.get("choices"):
                    raise ValueError(f"no choices in the response ({self.redact(str(data))[:200]})")
                return data
            except urllib.error.HTTPError as e:
                try:
                    detail = self.redact(e.read().decode("utf-8", "replace"))[:300]
                except (OSError, http.client.HTTPException):  # the error body itself was cut off
                    detail = ""
                if e.code not in RETRY_STATUS:
                    hint = (f" (is ${self.key_env} set?)" if self.key_env else " (no API key was sent to this "
                            "host: name its variable with --api-key-env)") if e.code in (401, 403) else ""
                    raise CrossrankError(f"{self.url}: HTTP {e.code}{hint}: {detail}") from None
                reason, retry_after = f"http_{e.code}", _retry_after(e.headers.get("Retry-After"))
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                    socket.timeout) as e:
                reason = "timeout" if "timed out" in str(e) else "connection"
                detail = self.redact(f"{type(e).__name__}: {e}")[:300]
            except ValueError as e:  # a 200 whose body is not a chat completion (proxies, truncated bodies)
                reason, detail = "bad_response", self.redact(str(e))[:300]
            if attempt == cfg.retries:
                raise CrossrankError(f"{self.url}: gave up after {cfg.retries} retries (last: {reason}: {detail}; "
                                     f"completed queries are kept: run again to resume)")
            delay = min(cfg.max_backoff, cfg.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            delay = retry_after if retry_after is not None else delay
            with self.stats.lock:
                self.stats.retry_reasons[reason] = self.stats.retry_reasons.get(reason, 0) + 1
            self.stats.add(retries=1, seconds_waiting=delay)
            self.log.write({"type": "retry", **context, "attempt": attempt + 1, "reason": reason, "detail": detail,
                            "wait": round(delay, 3)})
            if self.stop.wait(delay):
                raise CrossrankError("stopped")
        raise AssertionError("unreachable")

    def redact(self, text: str) -> str:
        """The text on one line (error pages have many), without the API key (a server may echo it)."""
        text = " ".join(text.split())
        return text.replace(self.key, "***") if self.key else text


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP date), capped at an hour."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), 3600.0)


class JsonlLog:
    """Append-only JSONL, one line per write (thread-safe); a torn last line from a kill is closed first."""

    def __init__(self, path: Path):
        self.lock = threading.Lock()
        torn = False
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self.file = open(path, "a", encoding="utf-8")
        if torn:
            self.file.write("\n")

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.lock:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------------------
# One query, and the whole run


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


def load_candidates(run: str, k: int) -> dict[str, list[str]]:
    """{qid: top-k docnos, best first} of a run. Files stream through preprocessing's Arrow reader (a 400M-line
    training run needs no more memory than its top-k); `irds:` goes through `crossrank.io.load_run`."""
    if run.startswith(IRDS_PREFIX):
        return {qid: [docno for docno, _ in ranking] for qid, ranking in load_run(run, depth=k).items()}
    from crossrank.runs import read_run_blocks

    candidates: dict[str, list[str]] = {}
    for table in read_run_blocks(run):  # complete queries, each sorted best first
        for qid, docno in zip(table["qid"].to_pylist(), table["docno"].to_pylist()):
            ranking = candidates.setdefault(qid, [])
            if len(ranking) < k:
                ranking.append(docno)
    if not candidates:
        raise CrossrankError(f"{run}: the run is empty (expected at least one line)")
    return candidates


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
            "cost_estimate": round((prompt_tokens * cfg.price_prompt + completion_tokens * cfg.price_completion)
                                   / 1e6, 6)}


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


def rank(cfg: TeacherConfig) -> dict:
    """Rank every query of `cfg.run` (resuming from `OUT.partial`), write OUT; returns the summary."""
    from tqdm import tqdm

    cfg.validate()
    # a refused key stops the run before anything is touched
    key_env = api_key_for(cfg.base_url, cfg.api_key_env)[0] if not cfg.dry_run else ""
    tag = "".join(cfg.tag.split()) or "rankgpt"
    files = paths(cfg.output)
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    if not cfg.dry_run and files["run"].parent.is_dir():
        for path in files.values():
            remove_stale_temporaries(path)  # a killed session's half-written partial, summary or run
    if cfg.overwrite and not cfg.dry_run:
        for path in files.values():
            path.unlink(missing_ok=True)
    resume_from, previous = resume_point(files, settings) if not cfg.overwrite else (None, {})
    candidates = load_candidates(cfg.run, cfg.k)
    qids = sorted(candidates, key=qid_order)[: cfg.limit or None]
    topics = read_topics(cfg.topics)
    missing = [qid for qid in qids if qid not in topics]
    if missing:
        raise CrossrankError(f"{cfg.topics}: {len(missing)} queries of the run have no topic (e.g. "
                             f"{', '.join(missing[:5])}; expected every run qid in the topics)")
    done = read_partial(resume_from, candidates) if resume_from else {}
    todo = [qid for qid in qids if qid not in done]
    texts = load_corpus(cfg.corpus, {d for qid in todo for d in candidates[qid]}) if todo else {}
    count, counting = token_counter(cfg.tokenizer, cfg.model)
    if cfg.dry_run:
        return dry_run(cfg, {qid: (topics[qid], candidates[qid]) for qid in todo}, texts, count, counting)
    with atomic_write(files["partial"]) as f:  # without a torn last query, before appending
        f.writelines(partial_lines(qid, docnos, tag) for qid, docnos in done.items())

    stats = Stats(previous)
    summary_lock = threading.Lock()

    def write_summary(state: str) -> dict:
        summary = {"state": state, "settings": settings, "token_counting": counting, "api_key_env":
                   key_env, "base_url": cfg.base_url, **stats.as_dict(cfg)}
        with summary_lock, atomic_write(files["summary"]) as f:
            json.dump(summary, f, indent=1)
        return summary

    write_summary("running")
    log = JsonlLog(files["log"])
    log.write({"type": "session", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings,
               "base_url": cfg.base_url, "token_counting": counting, "queries_done": len(done),
               "queries_todo": len(todo)})
    stop = threading.Event()
    client = ChatClient(cfg, stats, log, stop)
    stats.on_request = lambda: write_summary("running")  # the summary stays exact if the run is killed

    bar = tqdm(total=len(qids), initial=len(qids) - len(todo), desc="queries", unit="q", disable=not cfg.progress)
    pending: dict[Future, str] = {}
    remaining = iter(todo)
    try:
        with open(files["partial"], "a", encoding="utf-8") as partial, \
                ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="teacher") as pool:
            try:
                while True:
                    while len(pending) < cfg.concurrency and (qid := next(remaining, None)) is not None:
                        pending[pool.submit(rank_query, qid, topics[qid], candidates[qid], texts, cfg, client,
                                            count, stats)] = qid
                    if not pending:
                        break
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        qid = pending.pop(future)
                        done[qid] = future.result()
                        partial.write(partial_lines(qid, done[qid], tag))  # a kill tears the last query only
                        partial.flush()
                        os.fsync(partial.fileno())
                        stats.add(queries=1)
                        bar.update(1)
                        bar.set_postfix(requests=stats.counts["requests"], malformed=stats.counts["malformed_answers"],
                                        retries=stats.counts["retries"], refresh=False)
            finally:
                stop.set()  # in-flight queries stop after their current request
                pool.shutdown(wait=True, cancel_futures=True)
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


# ---------------------------------------------------------------------------------------------------------
# Command line


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
                                                          "http://localhost:8000/v1 for vLLM (default: %(default)s)")
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
                   help="seconds per request (default: %(default)s)")
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
    if dataset:
        from crossrank.datasets import load_dataset

        ds = load_dataset(dataset)
        args["run"] = ds.run(args["run"])
        args["topics"] = args["topics"] or ds.source("topics")
        args["corpus"] = args["corpus"] or ds.source("corpus")
    for flag in ("topics", "corpus"):
        if not args[flag]:
            raise CrossrankError(f"--{flag} is missing (expected a path or irds:<id>, or --dataset KEY)")
    return rank(TeacherConfig(**args))


def format_summary(summary: dict) -> str:
    keys = ("queries", "requests", "prompt_tokens", "completion_tokens", "malformed_answers", "retries")
    if summary.get("state") == "dry run":
        keys = ("queries", "requests", "prompt_tokens", "completion_tokens")
    text = ", ".join(f"{summary.get(k, 0)} {k.replace('_', ' ')}" for k in keys)
    text = f"dry run ({summary['token_counting']}): {text} at most" if summary.get("state") == "dry run" else text
    return text + (f", cost estimate {summary['cost_estimate']}" if summary.get("cost_estimate") else "")
