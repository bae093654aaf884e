"""An OpenAI-compatible chat-completions client: a deadline and a size cap per request, retries with backoff and
`Retry-After`, the credential rules, cost-relevant counts (`Stats`) and the append-only request log
(`JsonlLog`). Standard library only (http.client: every byte on the wire is ours to decide).

Credentials and where they go (crossrank.teacher.endpoint: `api_key_for`, `Endpoint`, `proxy_for`):
- The API key is read from an environment variable only, sent in the Authorization header, and never written.
  By default $OPENAI_API_KEY goes to the OpenAI API over https only; another host gets a key only from a
  variable named with --api-key-env, and never over plain http unless the host is loopback.
- `user:password@` in --base-url is sent as HTTP Basic authentication (as curl and requests do), under the same
  rules as a key, and never together with one; `redact_url` takes it out of everything shown or stored.
- Redirects are never followed: a 3xx is one line naming where it pointed (a redirect is how a key would reach
  another host; urllib re-sent the Authorization header to any host a 302 named).
- Proxies ($https_proxy, $http_proxy, $all_proxy; $no_proxy honoured): a loopback --base-url never goes through
  one (Go's net/http does the same), so a key meant for localhost never crosses the network; an https URL goes
  through an http:// proxy as a CONNECT tunnel (the proxy sees host:port, the key travels inside TLS); a
  plain-http URL that is not loopback carries no credentials (refused above), so it may use the proxy as
  urllib would. Another proxy scheme (socks5://, https://) is refused in one line, not bypassed.
- `--timeout` is a deadline for the whole exchange (connect, send, headers, body), enforced by a watchdog
  that closes the socket, not the socket's idle timeout (a server sending a byte a second is cut at the
  deadline); `--max-response-bytes` caps the answer while it is read (a larger Content-Length is refused
  before reading). A 200 whose body is not a well-formed chat completion (`completion_of`) is a bad response,
  retried like a dropped connection, and one line once the retries are spent.
"""
from __future__ import annotations

import base64
import contextlib
import email.utils
import http.client
import json
import math
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from crossrank.errors import CrossrankError
from crossrank.teacher.config import TeacherConfig
from crossrank.teacher.endpoint import credentials_for, parse_url, proxy_for, redact_url, secrets_of


RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}
READ_CHUNK = 64 * 1024
ERROR_BODY_BYTES = 64 * 1024  # read of an error status's body: its message is in the first bytes


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


# ---------------------------------------------------------------------------------------------------------
# One request and its answer


class Timeout(Exception):
    """No complete answer within --timeout."""


class TooLarge(Exception):
    """An answer over --max-response-bytes."""


class BadResponse(Exception):
    """A 2xx whose body is not a chat completion."""


def _kind(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _count(value) -> int | None:
    """A token count as the usage object holds it (an integer; 12.0 is 12), None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if value >= 0 else None


def completion_of(raw: bytes) -> dict:
    """The parts of a chat completion the teacher reads, checked: {"content": str ("" for null),
    "finish_reason": str | None, "usage": dict ({} when the server sent none)}. Anything else is a
    BadResponse naming what is wrong: a body that is not JSON, not UTF-8, nested past the parser's limit, or
    JSON of another shape (no `choices`, `choices` not a non-empty array of objects, no `message` object,
    `content` not a string, `usage` not an object, a token count that is not a count)."""
    head = " ".join(raw[:200].decode("utf-8", "replace").split())
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a nesting bomb
        raise BadResponse(f"the body is not JSON ({type(e).__name__}): {head!r}") from None

    def bad(problem: str):
        raise BadResponse(f"{problem} (expected a chat completion; got {head!r})")

    if not isinstance(data, dict):
        bad(f"the body is {_kind(data)}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list):
        bad("no 'choices'" if choices is None else f"'choices' is {_kind(choices)}, not an array")
    if not choices:
        bad("'choices' is empty")
    choice = choices[0]
    if not isinstance(choice, dict):
        bad(f"choices[0] is {_kind(choice)}, not an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        bad("no choices[0].message" if message is None else f"choices[0].message is {_kind(message)}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        bad(f"choices[0].message.content is {_kind(content)}, not a string")
    finish_reason = choice.get("finish_reason")
    if finish_reason is not None and not isinstance(finish_reason, str):
        bad(f"choices[0].finish_reason is {_kind(finish_reason)}, not a string")
    usage = data.get("usage")
    if usage is None:
        usage = {}
    elif not isinstance(usage, dict):
        bad(f"'usage' is {_kind(usage)}, not an object")
    usage = dict(usage)
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if usage.get(field) is not None:
            usage[field] = _count(usage[field])
            if usage[field] is None:
                bad(f"usage.{field} is not a count")
    return {"content": content or "", "finish_reason": finish_reason, "usage": usage}


class ChatClient:
    """POSTs chat completions: one deadline per request, a size cap, no redirects, proxies by the rules of
    `proxy_for`; retries with exponential backoff and jitter, `Retry-After` honoured, on 408/409/429/5xx,
    dropped connections, timeouts, oversized and malformed answers."""

    def __init__(self, cfg: TeacherConfig, stats: Stats, log: "JsonlLog", stop: threading.Event):
        self.cfg, self.stats, self.log, self.stop = cfg, stats, log, stop
        self.endpoint = parse_url(cfg.base_url)
        self.shown = f"{self.endpoint.shown.rstrip('/')}/chat/completions"  # for messages: no credentials
        credentials = credentials_for(cfg.base_url, cfg.api_key_env)
        self.key_env, self.secrets = credentials.variable, list(credentials.secrets)
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if credentials.authorization:
            self.headers["Authorization"] = credentials.authorization
        self.proxy = proxy_for(self.endpoint)
        self.proxy_headers: dict[str, str] = {}
        if self.proxy is not None:
            if self.endpoint.scheme == "http" and credentials.authorization:  # unreachable: refused above
                raise CrossrankError(f"--base-url {self.endpoint.shown}: refusing to send credentials through "
                                     f"the plain-http proxy {self.proxy.shown}")
            if self.proxy.has_credentials:
                pair = f"{self.proxy.username}:{self.proxy.password}"
                token = base64.b64encode(pair.encode()).decode()
                self.proxy_headers["Proxy-Authorization"] = f"Basic {token}"
                self.secrets = list(secrets_of(*self.secrets, pair, self.proxy.password, token))
        self.tls = ssl.create_default_context() if self.endpoint.scheme == "https" else None

    def complete(self, messages: list[dict[str, str]], context: dict) -> dict:
        """The checked answer (`completion_of`) to one conversation, after retries; one line when they run out."""
        cfg = self.cfg
        body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0,
                           "max_tokens": cfg.max_completion_tokens}).encode()
        for attempt in range(cfg.retries + 1):
            retry_after = None
            try:
                status, headers, raw = self.exchange(body)
                if 200 <= status < 300:
                    return completion_of(raw)
                if 300 <= status < 400:
                    raise CrossrankError(self.redirect_refused(status, headers.get("Location")))
                detail = self.redact(raw.decode("utf-8", "replace"))[:300]
                if status not in RETRY_STATUS:
                    hint = (f" (is ${self.key_env} set?)" if self.key_env else " (no API key was sent to this "
                            "host: name its variable with --api-key-env)") if status in (401, 403) else ""
                    raise CrossrankError(f"{self.shown}: HTTP {status}{hint}: {detail}")
                reason, retry_after = f"http_{status}", _retry_after(headers.get("Retry-After"))
            except Timeout as e:
                reason, detail = "timeout", str(e)
            except TooLarge as e:
                reason, detail = "too_large", str(e)
            except BadResponse as e:  # a 2xx whose body is not a chat completion (proxies, truncated bodies)
                reason, detail = "bad_response", self.redact(str(e))[:300]
            except ssl.SSLCertVerificationError as e:  # will not get better by asking again
                raise CrossrankError(f"{self.shown}: the server's TLS certificate is not valid "
                                     f"({self.redact(e.verify_message or str(e))}; expected one that this "
                                     f"system's CA store verifies)") from None
            except (OSError, http.client.HTTPException) as e:
                reason, detail = "connection", self.redact(f"{type(e).__name__}: {e}")[:300]
            if attempt == cfg.retries:
                raise CrossrankError(f"{self.shown}: gave up after {cfg.retries} retries (last: {reason}: {detail}; "
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

    def exchange(self, body: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One POST: (status, headers, body). --timeout bounds all of it: a watchdog shuts the socket down at
        the deadline, whatever phase (connect, TLS, CONNECT, headers, body) is still waiting (Timeout). A 2xx
        body over --max-response-bytes is TooLarge (a larger Content-Length before reading anything); an
        error status's body is read up to ERROR_BODY_BYTES, for its message."""
        cfg, url, proxy = self.cfg, self.endpoint, self.proxy
        host, port = (proxy.host, proxy.port) if proxy else (url.host, url.port)
        target = f"{url.path}/chat/completions"
        headers = dict(self.headers)
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=cfg.timeout, context=self.tls)
            if proxy:  # CONNECT host:port; the request and its Authorization travel inside TLS
                conn.set_tunnel(url.host, url.port, headers=self.proxy_headers)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=cfg.timeout)
            if proxy:  # absolute-form request to the proxy (no credentials on plain http: see __init__)
                target = f"http://{url.authority}{target}"
                headers.update(self.proxy_headers)
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(cfg.timeout, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            if expired.is_set():
                raise TimeoutError
            conn.request("POST", target, body=body, headers=headers)
            response = conn.getresponse()
            ok = 200 <= response.status < 300
            limit = cfg.max_response_bytes if ok else ERROR_BODY_BYTES
            if ok and response.length is not None and response.length > limit:
                raise TooLarge(f"the answer's Content-Length {response.length} is over --max-response-bytes "
                               f"{limit} (nothing read)")
            data = bytearray()
            while len(data) <= limit:
                chunk = response.read1(READ_CHUNK)
                if not chunk:
                    break
                data += chunk
            if expired.is_set():
                raise TimeoutError
            if len(data) > limit:
                if ok:
                    raise TooLarge(f"the answer is over --max-response-bytes {limit} (stopped reading at "
                                   f"{len(data)} bytes)")
                del data[limit:]
            elif response.length:  # the connection closed before Content-Length bytes came
                raise http.client.IncompleteRead(bytes(data), response.length)
            return response.status, response.headers, bytes(data)
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set() or isinstance(e, TimeoutError):
                raise Timeout(f"no complete answer within --timeout {cfg.timeout:g} s (a deadline for the "
                              f"whole request, not the gap between bytes)") from None
            raise
        finally:
            watchdog.cancel()
            conn.close()

    def redirect_refused(self, status: int, location: str | None) -> str:
        """The one line for a 3xx: redirects are never followed, the Location is named (redacted)."""
        if not location:
            return f"{self.shown}: HTTP {status} redirect without a Location refused (redirects are not followed)"
        try:
            where = urllib.parse.urlsplit(urllib.parse.urljoin(f"{self.endpoint.scheme}://{self.endpoint.authority}"
                                                               f"{self.endpoint.path}/", location))
            same = (where.scheme, (where.hostname or "").lower(), where.port or (443 if where.scheme == "https"
                    else 80)) == (self.endpoint.scheme, self.endpoint.host, self.endpoint.port)
            host = where.netloc.rpartition("@")[2]
            target = f"{where.scheme}://{host}{where.path}" if host else redact_url(location)
        except ValueError:
            same, target = False, redact_url(location)
        return (f"{self.shown}: HTTP {status} redirect to {self.redact(target)} refused ("
                f"{'the same host' if same else 'another host'}; redirects are not followed, so credentials go "
                f"to the --base-url host only: expected the final URL as --base-url)")

    def redact(self, text: str) -> str:
        """The text on one line (error pages have many), without any credential (a server may echo them)."""
        return self.scrub(" ".join(text.split()))

    def scrub(self, text: str) -> str:
        """The text without any credential, otherwise unchanged (an answer as it is logged)."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


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
    if not math.isfinite(seconds):
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
