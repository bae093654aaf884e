"""An OpenAI-compatible chat-completions client: timeouts, retries with backoff and `Retry-After`, the API-key
rules, cost-relevant counts (`Stats`) and the append-only request log (`JsonlLog`). Standard library only.

The API key is read from an environment variable only, sent in the Authorization header, and never written.
By default $OPENAI_API_KEY goes to the OpenAI API over https only; another host gets a key only from a
variable named with --api-key-env, and never over plain http unless the host is loopback (`api_key_for`).
"""
from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from crossrank.errors import CrossrankError
from crossrank.teacher.config import TeacherConfig

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}


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
        out["cost_estimate"] = cfg.cost(out["prompt_tokens"], out["completion_tokens"])
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
