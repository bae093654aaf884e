"""Hostile endpoints for rank_gpt.py (issue 24), as tables: where credentials may go (redirects, proxies,
credentials in --base-url), limits (a deadline per request, a size cap), malformed chat completions, and what a
resume trusts. Every request goes to 127.0.0.0/8: the chat server of tests/chat_server.py (http, or https with a
throw-away certificate) and a recording proxy on another loopback address. Assertions are on behaviour (exit
status, the one line, what each side received), not on clocks: the bounds on elapsed time are safety nets many
times the deadline."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer, RecordingProxy, completion  # noqa: E402
from test_teacher import SECRET, make_collection, ranking, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                   "NO_PROXY")


@pytest.fixture(name="collection")
def collection_fixture(tmp_path) -> dict:
    return make_collection(tmp_path)  # test_teacher.py's: 4 queries x 30 candidates


@pytest.fixture(name="server")
def server_fixture():
    with ChatServer() as chat:
        yield chat


def rank_gpt(collection: dict, output: Path, *extra: str, base_url: str, key: bool = True,
             env: dict | None = None, background: bool = False):
    """rank_gpt.py on the first query's top 6 in one window (one request per query) unless `extra` says
    otherwise; no proxy variable is inherited, `env` adds some."""
    args = [sys.executable, str(ROOT / "rank_gpt.py"), "--run", str(collection["run"]), "--topics",
            str(collection["topics"]), "--corpus", str(collection["corpus"]), "-o", str(output), "--model", "test-llm",
            "--base-url", base_url, *(["--api-key-env", "CROSSRANK_TEST_KEY"] if key else []), "--k", "6",
            "--window", "6", "--step", "3", "--limit", "1", "--retries", "0", "--backoff", "0.01", "--timeout", "10",
            "--no-progress", *extra]
    base = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES and k != "OPENAI_API_KEY"}
    full = {**base, "CROSSRANK_TEST_KEY": SECRET, "PYTHONPATH": str(ROOT), **(env or {})}
    if background:
        return subprocess.Popen(args, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=full, capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and exactly one line on stderr (no traceback); that line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def written(folder: Path) -> str:
    """Everything under `folder` as text, to search for secrets."""
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def basic(pair: str) -> str:
    return base64.b64encode(pair.encode()).decode()


# ---------------------------------------------------------------------------------------------------------
# Secrets: redirects, proxies, credentials in --base-url


@pytest.mark.parametrize("url, shown", [
    ("https://user:pass@host.example/v1", "https://***@host.example/v1"),
    ("http://tok3n@127.0.0.1:8000/v1", "http://***@127.0.0.1:8000/v1"),
    ("https://user:p@ss/w#rd@host.example/v1", "https://***@host.example/v1"),  # unencoded @ / # in the password
    ("https://host.example/v1?api_key=sk-123#frag", "https://host.example/v1?***"),
    ("user:pass@proxy.example:3128", "***@proxy.example:3128"),  # a proxy variable without a scheme
    ("https://host.example/v1", "https://host.example/v1"),
])
def test_redact_url(url, shown):
    from crossrank.teacher.endpoint import redact_url

    assert redact_url(url) == shown


@pytest.mark.parametrize("status, location, names", [
    (302, "http://{other}/v1/chat/completions", "redirect to http://{other}/v1/chat/completions refused (another "
                                                "host"),
    (307, "/v2/chat/completions", "redirect to http://127.0.0.1:{port}/v2/chat/completions refused (the same host"),
    (301, "https://{other}/v1/chat/completions", "redirect to https://{other}/v1/chat/completions refused (another"),
    (308, "http://attacker:pw@{other}/x?token=1", "redirect to http://{other}/x refused (another host"),
])
def test_a_redirect_is_never_followed(collection, server, tmp_path, status, location, names):
    with RecordingProxy(upstream=server.port) as other:  # stands for another host: records any byte it gets
        address = other.url.removeprefix("http://")
        server.fail(("redirect", status, location.format(other=address)))
        line = one_line_error(rank_gpt(collection, tmp_path / "r.run", base_url=server.url))
        assert f"HTTP {status} {names.format(other=address, port=server.port)}" in line
        assert "redirects are not followed" in line and "attacker" not in line and "pw@" not in line
        assert len(server.requests) == 1 and not other.received  # asked once, never anywhere else
        assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_a_redirect_without_location_is_one_line(collection, server, tmp_path):
    server.fail(("status", 303, {}))
    line = one_line_error(rank_gpt(collection, tmp_path / "r.run", base_url=server.url))
    assert "HTTP 303 redirect without a Location refused" in line


@pytest.mark.parametrize("variable", ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"])
def test_a_loopback_url_never_goes_through_a_proxy(collection, server, tmp_path, variable):
    with RecordingProxy(upstream=server.port) as proxy:
        result = rank_gpt(collection, tmp_path / "p.run", base_url=server.url, env={variable: proxy.url})
        assert result.returncode == 0, result.stderr
        assert not proxy.received  # not a byte: the key stayed on this machine
        assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_a_plain_http_url_without_credentials_may_use_the_proxy(collection, server, tmp_path):
    with RecordingProxy(upstream=server.port) as proxy:
        result = rank_gpt(collection, tmp_path / "p.run", base_url="http://llm.example.test/v1", key=False,
                          env={"http_proxy": proxy.url})
        assert result.returncode == 0, result.stderr
        assert proxy.heads[0].startswith("POST http://llm.example.test:80/v1/chat/completions HTTP/1.1")
        assert b"Authorization" not in proxy.received  # nothing to leak, nothing sent
    # the same with a key: refused before anything is sent (a proxy does not make plain http safe)
    with RecordingProxy(upstream=server.port) as proxy:
        line = one_line_error(rank_gpt(collection, tmp_path / "k" / "p.run", base_url="http://llm.example.test/v1",
                                       env={"http_proxy": proxy.url}))
        assert "refusing to send $CROSSRANK_TEST_KEY over plain http" in line
        assert not proxy.received and not (tmp_path / "k").exists()


def test_an_https_url_tunnels_through_the_proxy_and_a_refused_tunnel_is_one_line(collection, server, tmp_path):
    with RecordingProxy(upstream=server.port, deny=True) as proxy:
        line = one_line_error(rank_gpt(collection, tmp_path / "t.run", base_url="https://llm.example.test/v1",
                                       env={"https_proxy": proxy.url}))
        assert "gave up after 0 retries (last: connection:" in line and "403" in line
        assert len(proxy.heads) == 1 and proxy.heads[0].startswith("CONNECT llm.example.test:443 HTTP/1.")
        assert b"Authorization" not in proxy.received and SECRET.encode() not in proxy.received
    assert SECRET not in written(tmp_path) + line


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A throw-away self-signed certificate for llm.example.test (openssl's command line)."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=llm.example.test", "-addext",
                    "subjectAltName=DNS:llm.example.test"], check=True, capture_output=True)
    return str(cert), str(key)


def test_the_key_crosses_a_proxy_only_inside_tls(collection, tmp_path, certificate):
    with ChatServer(tls=certificate) as tls_server, RecordingProxy(upstream=tls_server.port) as proxy:
        env = {"https_proxy": f"http://proxyuser:proxy-pass-9@{proxy.url.removeprefix('http://')}",
               "SSL_CERT_FILE": certificate[0]}
        result = rank_gpt(collection, tmp_path / "t.run", base_url="https://llm.example.test/v1", env=env)
        assert result.returncode == 0, result.stderr
        assert tls_server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"  # end to end
        assert proxy.heads[0].startswith("CONNECT llm.example.test:443 HTTP/1.")
        assert f"Proxy-Authorization: Basic {basic('proxyuser:proxy-pass-9')}" in proxy.heads[0]
        assert SECRET.encode() not in proxy.received and b"Bearer" not in proxy.received  # ciphertext only
    # without the certificate trusted: one line, not retried (it will not get better)
    with ChatServer(tls=certificate) as tls_server, RecordingProxy(upstream=tls_server.port) as proxy:
        line = one_line_error(rank_gpt(collection, tmp_path / "u.run", "--retries", "3",
                                       base_url="https://llm.example.test/v1", env={"https_proxy": proxy.url}))
        assert "the server's TLS certificate is not valid" in line and not tls_server.requests
    assert "proxy-pass-9" not in written(tmp_path)


@pytest.mark.parametrize("proxy", ["socks5://puser:ppass-77@127.0.0.2:1080", "https://puser:ppass-77@127.0.0.2:3128"])
def test_an_unsupported_proxy_scheme_is_refused_not_bypassed(collection, tmp_path, proxy):
    line = one_line_error(rank_gpt(collection, tmp_path / "s" / "s.run", base_url="https://llm.example.test/v1",
                                   env={"all_proxy": proxy}))
    scheme = proxy.split(":")[0]
    assert line == f"error: $all_proxy {scheme}://***@127.0.0.2:{proxy.rsplit(':', 1)[1]}: a {scheme}:// proxy is " \
                   f"not supported (expected http://host:port, or llm.example.test in $no_proxy)"
    assert not (tmp_path / "s").exists()
    assert rank_gpt(collection, tmp_path / "n" / "n.run", "--dry-run", base_url="https://llm.example.test/v1",
                    env={"all_proxy": proxy, "no_proxy": "example.test"}).returncode == 0  # no_proxy honoured


def test_credentials_in_the_base_url_are_sent_as_basic_auth_and_shown_nowhere(collection, server, tmp_path):
    url = server.url.replace("http://", "http://alice:pa55-w0rd%21@")
    result = rank_gpt(collection, tmp_path / "u" / "u.run", base_url=url, key=False)
    assert result.returncode == 0, result.stderr
    assert server.requests[0]["headers"]["Authorization"] == f"Basic {basic('alice:pa55-w0rd!')}"
    shown = server.url.replace("http://", "http://***@")
    assert summary(tmp_path / "u" / "u.run")["base_url"] == shown
    session = json.loads((tmp_path / "u" / "u.run.log.jsonl").read_text().splitlines()[0])
    assert session["type"] == "session" and session["base_url"] == shown
    server.fail(("status", 401, {}))  # the error body echoes the Authorization header
    line = one_line_error(rank_gpt(collection, tmp_path / "u" / "d.run", base_url=url, key=False))
    assert "HTTP 401" in line and "Basic ***" in line
    everything = written(tmp_path) + result.stdout + result.stderr + line
    for secret in ("pa55-w0rd", basic("alice:pa55-w0rd!"), "alice:"):
        assert secret not in everything


def test_a_key_the_server_echoes_in_its_answer_is_not_logged(collection, server, tmp_path):
    server.fail(("answer", f"[2] > [1] > [3] > [4] > [5] > [6] (your key: {SECRET})"))
    out = tmp_path / "echo" / "e.run"
    result = rank_gpt(collection, out, base_url=server.url)
    assert result.returncode == 0, result.stderr
    requests = [json.loads(line) for line in Path(f"{out}.log.jsonl").read_text().splitlines()
                if json.loads(line)["type"] == "request"]
    assert requests[0]["answer"] == "[2] > [1] > [3] > [4] > [5] > [6] (your key: ***)"
    assert SECRET not in written(tmp_path) + result.stdout + result.stderr


@pytest.mark.parametrize("url, key, expected", [
    ("http://alice:pa55-w0rd@{local}/v1", True, "http://***@{local}/v1: it holds credentials (user:password@) and "
                                                "$CROSSRANK_TEST_KEY is set: both would be the Authorization header"),
    ("http://alice:pa55-w0rd@10.0.0.5:8000/v1", False, "http://***@10.0.0.5:8000/v1: refusing to send its "
                                                       "credentials (user:password@) over plain http"),
    ("https://alice:pa55/w0rd@llm.example.test/v1", False, "https://***@llm.example.test/v1 is invalid: its host or "
                                                           "port cannot be read"),
    ("https://alice:pa55-w0rd@llm.example.test/v1?key=sk-9", False, "https://***@llm.example.test/v1?*** is "
                                                                    "invalid: it has a query or fragment"),
    ("ftp://alice:pa55-w0rd@llm.example.test/v1", False, "ftp://***@llm.example.test/v1 is invalid: it is not an "
                                                         "http:// or https:// URL"),
])
def test_refused_base_urls_are_one_redacted_line(collection, server, tmp_path, url, key, expected):
    local = f"127.0.0.1:{server.port}"
    line = one_line_error(rank_gpt(collection, tmp_path / "x" / "x.run", base_url=url.format(local=local), key=key))
    assert f"--base-url {expected.format(local=local)}" in line
    assert "pa55" not in line and "w0rd" not in line and "sk-9" not in line
    assert not server.requests and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------
# Limits: a deadline per request, a size cap


@pytest.mark.parametrize("phase", ["body", "head"])
def test_a_dripping_server_is_cut_at_the_deadline(collection, server, tmp_path, phase):
    server.fail(("drip", 0.1, phase))  # ~400 bytes at 10 a second: 40 s; never idle for 0.1 s
    started = time.monotonic()
    line = one_line_error(rank_gpt(collection, tmp_path / "d.run", "--timeout", "1", base_url=server.url))
    assert time.monotonic() - started < 20  # a safety net only: the deadline is 1 s, the drip 40 s
    assert "gave up after 0 retries (last: timeout: no complete answer within --timeout 1 s (a deadline for the " \
           "whole request" in line


def test_a_timeout_is_retried_then_succeeds(collection, server, tmp_path):
    server.fail(("drip", 0.1, "body"), ("hold",))
    result = rank_gpt(collection, tmp_path / "d.run", "--timeout", "1", "--retries", "2", base_url=server.url)
    assert result.returncode == 0, result.stderr
    assert summary(tmp_path / "d.run")["retries_by_reason"] == {"timeout": 2}
    assert len(ranking(tmp_path / "d.run")["q1"]) == 6


@pytest.mark.parametrize("framing, says", [("length", "Content-Length 1000"), ("chunked", "stopped reading at")])
def test_an_answer_over_the_size_cap_is_refused_while_read(collection, server, tmp_path, framing, says):
    server.fail(("huge", 1_000_000, framing))
    out = tmp_path / "h.run"
    line = one_line_error(rank_gpt(collection, out, "--max-response-bytes", "100000", base_url=server.url))
    assert "(last: too_large: the answer" in line and "over --max-response-bytes 100000" in line and says in line
    assert Path(f"{out}.log.jsonl").stat().st_size < 10_000  # nothing of it was logged


def test_an_oversized_answer_is_retried_like_a_bad_one(collection, server, tmp_path):
    server.fail(("huge", 5 * 2**20, "chunked"))  # over the 4 MiB default
    out = tmp_path / "h.run"
    result = rank_gpt(collection, out, "--retries", "1", base_url=server.url)
    assert result.returncode == 0, result.stderr
    assert summary(out)["retries_by_reason"] == {"too_large": 1}
    assert Path(f"{out}.log.jsonl").stat().st_size < 20_000


@pytest.mark.parametrize("value", ["100", "-1", "4M"])
def test_the_size_cap_flag_is_checked(collection, server, tmp_path, value):
    result = rank_gpt(collection, tmp_path / "f.run", "--max-response-bytes", value, base_url=server.url)
    assert result.returncode == 2 and "--max-response-bytes" in result.stderr and not server.requests


# ---------------------------------------------------------------------------------------------------------
# Malformed but valid JSON (and bodies that are not JSON): one line, a failed request under the retry rules


GOOD = completion("test-llm", "[2] > [1] > [3] > [4] > [5] > [6]")
MALFORMED = [
    ("content-integer", ("json", {**GOOD, "choices": [{"message": {"content": 7}}]}),
     "choices[0].message.content is a number, not a string"),
    ("content-array", ("json", {**GOOD, "choices": [{"message": {"content": [{"type": "text"}]}}]}),
     "choices[0].message.content is an array"),
    ("choices-string", ("json", {**GOOD, "choices": "[1] > [2]"}), "'choices' is a string, not an array"),
    ("choices-empty", ("json", {**GOOD, "choices": []}), "'choices' is empty"),
    ("choices-missing", ("json", {"error": {"message": "overloaded"}}), "no 'choices'"),
    ("choice-number", ("json", {**GOOD, "choices": [1]}), "choices[0] is a number, not an object"),
    ("message-missing", ("json", {**GOOD, "choices": [{"text": "[1] > [2]"}]}), "no choices[0].message"),
    ("message-string", ("json", {**GOOD, "choices": [{"message": "[1] > [2]"}]}), "choices[0].message is a string"),
    ("finish-number", ("json", {**GOOD, "choices": [{"message": {"content": "[1]"}, "finish_reason": 3}]}),
     "choices[0].finish_reason is a number"),
    ("usage-string", ("json", {**GOOD, "usage": "12 tokens"}), "'usage' is a string, not an object"),
    ("usage-count-string", ("json", {**GOOD, "usage": {"prompt_tokens": "12"}}), "usage.prompt_tokens is not a count"),
    ("usage-count-negative", ("json", {**GOOD, "usage": {"completion_tokens": -1}}),
     "usage.completion_tokens is not a count"),
    ("usage-count-boolean", ("json", {**GOOD, "usage": {"prompt_tokens": True}}), "usage.prompt_tokens is not a count"),
    ("body-array", ("json", [GOOD]), "the body is an array, not an object"),
    ("body-null", ("raw", b"null"), "the body is null, not an object"),
    ("body-number", ("raw", b"42"), "the body is a number, not an object"),
    ("not-json", ("raw", b"<html>bad gateway</html>"), "the body is not JSON (JSONDecodeError)"),
    ("empty", ("raw", b""), "the body is not JSON (JSONDecodeError)"),
    ("not-utf8", ("raw", b'{"choices": "\xc3\x28"}'), "the body is not JSON (UnicodeDecodeError)"),
    ("nesting-bomb", ("raw", b"[" * 200_000), "the body is not JSON (RecursionError)"),
]


@pytest.mark.parametrize("name, fault, problem", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_completion_is_one_line(collection, server, tmp_path, name, fault, problem):
    server.fail(fault)
    line = one_line_error(rank_gpt(collection, tmp_path / "m.run", base_url=server.url))
    assert "gave up after 0 retries (last: bad_response: " in line and problem in line


def test_a_malformed_completion_is_retried_then_counted_as_a_retry(collection, server, tmp_path):
    server.fail(("json", {**GOOD, "usage": "n/a"}), ("json", {**GOOD, "choices": "x"}))
    result = rank_gpt(collection, tmp_path / "m.run", "--retries", "2", base_url=server.url)
    assert result.returncode == 0, result.stderr
    stats = summary(tmp_path / "m.run")
    assert stats["retries_by_reason"] == {"bad_response": 2} and stats["requests"] == 1


@pytest.mark.parametrize("answer, counted", [
    ({**GOOD, "choices": [{"message": {"content": None}, "finish_reason": "stop"}]},  # a refusal: no ids
     {"malformed_answers": 1, "requests_without_usage": 0}),
    ({**GOOD, "usage": None}, {"malformed_answers": 0, "requests_without_usage": 1}),
    ({key: value for key, value in GOOD.items() if key != "usage"}, {"requests_without_usage": 1}),
    ({**GOOD, "usage": {"prompt_tokens": 12.0, "completion_tokens": 3}}, {"prompt_tokens": 12, "requests": 1}),
])
def test_completions_that_are_well_formed_enough_are_used(collection, server, tmp_path, answer, counted):
    server.fail(("json", answer))
    result = rank_gpt(collection, tmp_path / "ok.run", base_url=server.url)
    assert result.returncode == 0, result.stderr
    stats = summary(tmp_path / "ok.run")
    assert {key: stats[key] for key in counted} == counted


# ---------------------------------------------------------------------------------------------------------
# Resume: the partial and the summary are verified before they are reused


def full_lines(collection: dict, server: ChatServer, tmp_path: Path) -> list[str]:
    """The finished run of the first two queries (window 10 by 5 over 30: 5 requests a query); its summary is
    left in tmp_path/full."""
    out = tmp_path / "full" / "f.run"
    result = rank_gpt(collection, out, "--k", "30", "--window", "10", "--step", "5", "--limit", "2",
                      base_url=server.url)
    assert result.returncode == 0, result.stderr
    return out.read_text().splitlines(keepends=True)


@pytest.mark.parametrize("cut, note", [
    (30 + 12, "query q2 is incomplete (12 of its 30 candidates)"),  # a cut at a line boundary
    (30 + 1, "query q2 is incomplete (1 of its 30 candidates)"),
    (30 + 12.5, "query q2 is incomplete (12 of its 30 candidates)"),  # and in the middle of a line
    (30 + 0.5, "its last line is cut"),  # the torn first line of q2: no block of q2 at all
    (30, None),  # nothing cut: nothing said, nothing redone
])
def test_a_cut_partial_is_ranked_again_with_one_note(collection, server, tmp_path, cut, note):
    lines = full_lines(collection, server, tmp_path)
    out = tmp_path / "cut.run"
    whole = int(cut)
    text = "".join(lines[:whole]) + (lines[whole][: len(lines[whole]) // 2] if cut != whole else "")
    Path(f"{out}.partial").write_text(text)
    # the summary of a session that counted both queries (then the file was cut)
    Path(f"{out}.summary.json").write_text(json.dumps({**summary(tmp_path / "full" / "f.run"),
                                                       "state": "interrupted"}))
    before = len(server.requests)
    result = rank_gpt(collection, out, "--k", "30", "--window", "10", "--step", "5", "--limit", "2",
                      base_url=server.url)
    if note is None:
        assert result.returncode == 0 and result.stderr == "", result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == f"note: {out}.partial: {note}, as a kill or a cut file leaves it; ranked again"
    assert out.read_text() == "".join(lines)
    assert len(server.requests) - before == 5  # q2 only: q1 was complete
    assert summary(out)["queries"] == 2  # the verified queries, not the stale count plus the redone one


@pytest.mark.parametrize("damage, says", [
    (lambda lines: lines[:10] + lines[30:], "query q1 does not match the input run's top --k (expected its 30 "
                                            "candidates once, ranked 1..30, got 10); it is from another input or "
                                            "damaged"),
    (lambda lines: [lines[1], lines[0], *lines[2:]], "query q1 does not match"),  # ranks out of order
    (lambda lines: lines + lines[:30], "docno q1d"),  # q1 twice: "appears twice for query q1"
])
def test_a_partial_damaged_before_its_end_is_refused_and_kept(collection, server, tmp_path, damage, says):
    lines = full_lines(collection, server, tmp_path)
    out = tmp_path / "bad.run"
    partial = Path(f"{out}.partial")
    partial.write_text("".join(damage(lines)))
    before = partial.read_bytes()
    line = one_line_error(rank_gpt(collection, out, "--k", "30", "--window", "10", "--step", "5", "--limit", "2",
                                   base_url=server.url))
    assert says in line and partial.read_bytes() == before and not out.exists()


@pytest.mark.parametrize("content", [
    b"{not json", b"", b"[1, 2]", b'{"settings": 5}', b'{"settings": {}, "requests": "many"}',
    b'{"settings": {}, "retries_by_reason": []}', b"\xff\xfe{}",
])
def test_a_damaged_summary_is_refused_before_anything_changes(collection, server, tmp_path, content):
    lines = full_lines(collection, server, tmp_path)
    out = tmp_path / "s.run"
    Path(f"{out}.partial").write_text("".join(lines[:30]))
    Path(f"{out}.summary.json").write_bytes(content)
    line = one_line_error(rank_gpt(collection, out, "--k", "30", "--window", "10", "--step", "5", "--limit", "2",
                                   base_url=server.url))
    assert line.startswith(f"error: {out}.summary.json: not a teacher summary (damaged?)")
    assert Path(f"{out}.summary.json").read_bytes() == content and Path(f"{out}.partial").read_text() == \
        "".join(lines[:30])
