"""Teacher rankings: windows, prompts and parsing on their own, then rank_gpt.py (a subprocess) against a real
OpenAI-compatible HTTP server on 127.0.0.1 (tests/chat_server.py) with injected faults."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crossrank.data.runs import read_run
from crossrank.teacher.rankgpt import (build_messages, estimate_tokens, fit_messages, parse_permutation, sliding_windows,
                               token_counter)
from crossrank.teacher.config import TeacherConfig

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-SECRET-4f9a1c"
FILLER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()
QUERY_WORDS = "cat dog fish bird tree river stone cloud".split()


# ---------------------------------------------------------------------------------------------------------
# Pure functions


def test_sliding_windows_bottom_up_and_clipped_at_the_top():
    assert sliding_windows(100, 20, 10) == [(80, 100), (70, 90), (60, 80), (50, 70), (40, 60), (30, 50),
                                            (20, 40), (10, 30), (0, 20)]
    assert sliding_windows(25, 20, 10) == [(5, 25), (0, 15)]  # RankGPT's loop would skip ranks 1-5
    assert sliding_windows(100, 100, 10) == [(0, 100)]  # --window k: one prompt
    assert sliding_windows(7, 20, 10) == [(0, 7)]


@pytest.mark.parametrize("answer, order, problems", [
    ("[2] > [3] > [1]", [1, 2, 0], []),
    ("[3] > [3] > [9]", [2, 0, 1], ["duplicates", "missing", "out_of_range"]),
    ("Passage three is the most relevant.", [0, 1, 2], ["no_ids"]),
    ("", [0, 1, 2], ["no_ids"]),
    ("[2] > [1]", [1, 0, 2], ["missing"]),
    ("2 > 3 > 1", [1, 2, 0], []),
    ("[3] > [1] > [2] (2 are off-topic)", [2, 0, 1], []),  # bracketed ids win over stray numbers
    ("<think>[1] is weak</think>[3] > [2] > [1]", [2, 1, 0], []),
])
def test_parse_permutation_repairs_like_rankgpt(answer, order, problems):
    assert parse_permutation(answer, 3) == (order, problems)


def test_rankgpt_conversation_format():
    messages = build_messages("what is a cat", ["one two three four", "five six"], words=3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                             "assistant", "user"]
    assert messages[3]["content"] == "[1] one two three"  # cut to 3 words
    assert messages[4]["content"] == "Received passage [1]."
    assert messages[-1]["content"].startswith("Search Query: what is a cat. \nRank the 2 passages above")
    assert "[] > []" in messages[-1]["content"] and "novelty" not in messages[-1]["content"]
    novelty = build_messages("what is a cat", ["x", "y"], words=3, novelty=True)
    assert "near-duplicate" in novelty[-1]["content"] and "novelty" in novelty[0]["content"]


def test_estimate_is_documented_formula():
    messages = [{"role": "user", "content": "abcd efgh ijkl"}]  # 14 chars -> 4; 3 words -> 4
    assert estimate_tokens(messages) == 3 + 4 + 4
    messages = [{"role": "user", "content": "a " * 30}]  # 60 chars -> 15; 30 words -> 40
    assert estimate_tokens(messages) == 3 + 40 + 4


def test_word_budget_shrinks_to_the_largest_that_fits(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *QUERY_WORDS]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path / "tok")
    count, how = token_counter(str(tmp_path / "tok"), "unused")
    assert "tok" in how
    passages = [" ".join(FILLER * 10)] * 4  # 150 words each
    cfg = TeacherConfig(run="", topics="", corpus="", output="", model="m", window=4, step=2, context_size=600,
                        max_completion_tokens=50).validate()
    messages, words, tokens = fit_messages("cat dog", passages, cfg, count)
    assert 0 < words < 150 and tokens == count(messages) <= 600 - 50
    assert count(build_messages("cat dog", passages, words + 1)) > 550  # the largest budget that fits
    with pytest.raises(Exception, match="does not fit --context-size 60 even at 1 word"):
        fit_messages("cat dog", passages, TeacherConfig(run="", topics="", corpus="", output="", model="m",
                                                         context_size=60, max_completion_tokens=10), count)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
    tokenizer.save_pretrained(tmp_path / "chat")
    count, how = token_counter(str(tmp_path / "chat"), "unused")
    assert how.endswith("(chat template)")
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert count(messages) == len(expected) > 0
    with pytest.raises(Exception, match="--tokenizer .*/missing: cannot load it"):
        token_counter(str(tmp_path / "missing"), "m")


# ---------------------------------------------------------------------------------------------------------
# The CLI against a real HTTP server


@pytest.fixture
def collection(tmp_path) -> dict:
    """4 queries x 30 candidates. Candidate j holds m_j query-word occurrences (m a permutation of 0..29, so
    the server's overlap ranking has no ties); the first-stage run lists the candidates in j order."""
    rng = random.Random(7)
    topics, corpus, run, truth = [], [], [], {}
    for q in range(1, 5):
        qid, words = f"q{q}", rng.sample(QUERY_WORDS, 3)
        topics.append(f"{qid}\t{' '.join(words)}")
        m = list(range(30))
        rng.shuffle(m)
        for j in range(30):
            text = " ".join([words[i % 3] for i in range(m[j])] + rng.sample(FILLER, 8))
            corpus.append(f"{qid}d{j}\t{text}")
            run.append(f"{qid} Q0 {qid}d{j} {j + 1} {100 - j} bm25")
        truth[qid] = [f"{qid}d{j}" for j in sorted(range(30), key=lambda j: -m[j])]
    files = {"topics": tmp_path / "topics.tsv", "corpus": tmp_path / "corpus.tsv", "run": tmp_path / "bm25.run"}
    for name, lines in (("topics", topics), ("corpus", corpus), ("run", run)):
        files[name].write_text("\n".join(lines) + "\n")
    return {**files, "truth": truth, "dir": tmp_path}


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


def cli(collection: dict, server: ChatServer, output: Path, *extra: str, env_key: str = SECRET,
        background: bool = False, key_flag: bool = True):
    args = [sys.executable, str(ROOT / "rank_gpt.py"), "--run", str(collection["run"]), "--topics",
            str(collection["topics"]), "--corpus", str(collection["corpus"]), "-o", str(output), "--model", "test-llm",
            "--base-url", server.url, *(["--api-key-env", "CROSSRANK_TEST_KEY"] if key_flag else []), "--k", "30",
            "--window", "10", "--step", "5", "--backoff", "0.01", "--timeout", "10", "--no-progress", *extra]
    env = {**os.environ, "CROSSRANK_TEST_KEY": env_key, "NO_PROXY": "*", "PYTHONPATH": str(ROOT)}
    if background:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def ranking(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    out: dict[str, list] = {}
    for qid, docno, rank, score in read_run(path):
        out.setdefault(qid, []).append((docno, rank, score))
    return out


def summary(output: Path) -> dict:
    return json.loads(Path(f"{output}.summary.json").read_text())


def test_happy_path_run_log_summary_and_preprocessing(collection, server, tmp_path):
    out = tmp_path / "teacher.run"
    result = cli(collection, server, out, "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    assert "20 requests" in result.stdout
    run = ranking(out)
    assert sorted(run) == ["q1", "q2", "q3", "q4"]
    for qid, rows in run.items():
        assert [r for _, r, _ in rows] == list(range(1, 31))
        assert [s for _, _, s in rows] == [30.0 - r + 1 for r in range(1, 31)]  # depth - rank + 1
        # with a perfect judge, bottom-up windows of 10 by 5 put the true top window-step at the top, in order
        assert [d for d, _, _ in rows][:5] == collection["truth"][qid][:5]
        assert sorted(d for d, _, _ in rows) == sorted(collection["truth"][qid])
    assert not Path(f"{out}.partial").exists()
    stats = summary(out)
    assert stats["state"] == "complete" and stats["queries"] == 4 and stats["requests"] == 4 * 5
    assert stats["malformed_answers"] == 0 and stats["retries"] == 0
    assert stats["prompt_tokens"] == sum(sum(len(m["content"].split()) for m in r["body"]["messages"])
                                         for r in server.requests)
    records = [json.loads(line) for line in Path(f"{out}.log.jsonl").read_text().splitlines()]
    requests = [r for r in records if r["type"] == "request"]
    assert len(requests) == 20 and {r["qid"] for r in requests} == {"q1", "q2", "q3", "q4"}
    assert requests[0]["window"] == [21, 30] and requests[0]["messages"][-1]["content"].startswith("Search Query")
    body = server.requests[0]["body"]
    assert body["temperature"] == 0 and body["model"] == "test-llm" and len(body["messages"]) == 3 + 2 * 10 + 1
    assert server.requests[0]["path"] == "/v1/chat/completions"

    # the output is a dataset's `teacher:` for preprocessing.py as it is: teacher order, best first
    from crossrank.training.examples import load_split
    (tmp_path / "kd.yaml").write_text(f"name: kd\ncorpus: {collection['corpus']}\ntopics: {collection['topics']}\n"
                                      f"teacher: {out}\n")
    prep = subprocess.run([sys.executable, str(ROOT / "preprocessing.py"), "--dataset", str(tmp_path / "kd.yaml"),
                           "--objective", "KD", "--evalperc", "0", "--out", str(tmp_path / "kd")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert prep.returncode == 0, prep.stderr
    queries = load_split(tmp_path / "kd", "train")
    assert len(queries) == 4
    for query in queries:
        assert query.docnos == [d for d, _, _ in run[query.qid]] and query.scores == list(range(30, 0, -1))


def test_sliding_windows_hand_computed(collection, server, tmp_path):
    # candidates a..f (first stage) with true order f > e > d > c > b > a; windows (3-6), then (1-4):
    # [c d e f] -> [f e d c] gives a b f e d c; [a b f e] -> [f e b a] gives f e b a d c
    (tmp_path / "t.tsv").write_text("q\tcat\n")
    (tmp_path / "c.tsv").write_text("".join(f"{d}\t{'cat ' * n}zeta\n" for n, d in enumerate("abcdef")))
    (tmp_path / "r.run").write_text("".join(f"q Q0 {d} {i + 1} {9 - i} x\n" for i, d in enumerate("abcdef")))
    files = {"run": tmp_path / "r.run", "topics": tmp_path / "t.tsv", "corpus": tmp_path / "c.tsv"}
    out = tmp_path / "hand.run"
    result = cli(files, server, out, "--k", "6", "--window", "4", "--step", "2")
    assert result.returncode == 0, result.stderr
    assert [d for d, _, _ in ranking(out)["q"]] == list("febadc")
    assert [s for _, _, s in ranking(out)["q"]] == [6, 5, 4, 3, 2, 1]


def test_retry_after_on_429_then_success(collection, server, tmp_path):
    server.fail(("status", 429, {"Retry-After": "1"}), ("status", 503, {}))
    out = tmp_path / "retry.run"
    result = cli(collection, server, out, "--limit", "1")
    assert result.returncode == 0, result.stderr
    times = [r["time"] for r in server.requests]
    assert times[1] - times[0] >= 0.95  # Retry-After: 1 honoured (backoff alone would be ~0.01 s)
    assert times[2] - times[1] < 0.9  # the 503 had no Retry-After: exponential backoff from 0.01 s
    stats = summary(out)
    assert stats["retries"] == 2 and stats["retries_by_reason"] == {"http_429": 1, "http_503": 1}
    assert stats["requests"] == 5 and len(server.requests) == 7
    assert [d for d, _, _ in ranking(out)["q1"]][:5] == collection["truth"]["q1"][:5]


def test_malformed_answers_are_repaired_and_counted(collection, server, tmp_path):
    server.fail(("answer", "[3] > [3] > [9]"), ("answer", "I would rank passage two first."), ("answer", ""))
    out = tmp_path / "bad.run"
    result = cli(collection, server, out, "--k", "6", "--window", "6", "--limit", "3")
    assert result.returncode == 0, result.stderr
    run = ranking(out)
    assert [d for d, _, _ in run["q1"]] == ["q1d2", "q1d0", "q1d1", "q1d3", "q1d4", "q1d5"]
    assert [d for d, _, _ in run["q2"]] == [f"q2d{j}" for j in range(6)]  # prose: first-stage order kept
    assert [d for d, _, _ in run["q3"]] == [f"q3d{j}" for j in range(6)]  # empty: the same
    stats = summary(out)
    assert stats["malformed_answers"] == 3 and stats["requests"] == 3
    assert stats["malformed_by_problem"] == {"duplicates": 1, "missing": 1, "out_of_range": 1, "no_ids": 2}


def test_dropped_connection_is_retried(collection, server, tmp_path):
    server.fail(("drop",), ("drop",))
    out = tmp_path / "drop.run"
    result = cli(collection, server, out, "--limit", "2")
    assert result.returncode == 0, result.stderr
    stats = summary(out)
    assert stats["retries_by_reason"] == {"connection": 2} and stats["requests"] == 10
    assert [d for d, _, _ in ranking(out)["q2"]][:5] == collection["truth"]["q2"][:5]


def test_timeouts_are_retried_and_queries_run_concurrently(collection, server, tmp_path):
    server.fail(("sleep", 3.0))
    server.delay = 0.1
    out = tmp_path / "slow.run"
    result = cli(collection, server, out, "--timeout", "0.5", "--concurrency", "3")
    assert result.returncode == 0, result.stderr
    stats = summary(out)
    assert stats["retries_by_reason"] == {"timeout": 1} and stats["requests"] == 20
    assert server.max_in_flight == 3  # --concurrency 3: three queries in flight, never more
    assert sorted(ranking(out)) == ["q1", "q2", "q3", "q4"]


def test_giving_up_keeps_completed_queries_and_resume_refuses_other_settings(collection, server, tmp_path):
    out = tmp_path / "down.run"
    server.fail(*[("ok",)] * 5, *[("status", 503, {})] * 3)  # q1 succeeds, then the server is down
    result = cli(collection, server, out, "--retries", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "gave up after 2 retries (last: http_503" in result.stderr
    assert sorted(ranking(Path(f"{out}.partial"))) == ["q1"] and not out.exists()
    assert summary(out)["state"] == "interrupted"
    other = cli(collection, server, out, "--window", "20")
    assert other.returncode == 2 and "cannot resume with other settings (--window 10 -> 20" in other.stderr
    resumed = cli(collection, server, out)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(ranking(out)) == ["q1", "q2", "q3", "q4"] and summary(out)["requests"] == 20


def test_killed_run_resumes_to_the_same_run(collection, server, tmp_path):
    server.delay = 0.05
    full = tmp_path / "full.run"
    assert cli(collection, server, full).returncode == 0
    n_full = len(server.requests)

    out = tmp_path / "killed.run"
    process = cli(collection, server, out, "--concurrency", "2", background=True)  # finishing order varies
    partial = Path(f"{out}.partial")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if partial.is_file() and len(partial.read_text().splitlines()) >= 60:  # 2 of 4 queries done
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    done = {line.split()[0] for line in partial.read_text().splitlines()}
    assert 2 <= len(done) < 4 and not out.exists()
    with open(partial, "a") as f:
        f.write("q4 Q0 q4d1")  # a torn last line, as a kill in the middle of a write leaves it
    before = len(server.requests)
    resumed = cli(collection, server, out, "--concurrency", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == full.read_bytes()
    assert len(server.requests) - before <= (4 - len(done)) * 5  # completed queries were not asked again
    # counts carry over from the killed session (a request killed in flight reached the server, not the count)
    assert 20 <= summary(out)["requests"] <= len(server.requests) - n_full


def test_api_key_is_sent_but_never_written(collection, server, tmp_path):
    server.fail(("status", 429, {"Retry-After": "0"}), ("drop",))
    out = tmp_path / "keyed" / "k.run"
    assert cli(collection, server, out, "--limit", "1").returncode == 0
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    server.fail(("status", 401, {}))  # the error body echoes the Authorization header
    denied = cli(collection, server, tmp_path / "keyed" / "denied.run")
    assert denied.returncode == 2 and len(denied.stderr.strip().splitlines()) == 1
    assert "HTTP 401 (is $CROSSRANK_TEST_KEY set?)" in denied.stderr and "Bearer ***" in denied.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 5
    for path in written:
        assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in denied.stderr + denied.stdout


def test_default_openai_key_goes_to_the_openai_api_only(collection, server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # exported for OpenAI, while --base-url points elsewhere
    plain = cli(collection, server, tmp_path / "d.run", "--limit", "1", key_flag=False)
    assert plain.returncode == 0, plain.stderr
    assert server.requests and all("Authorization" not in r["headers"] for r in server.requests)
    assert summary(tmp_path / "d.run")["api_key_env"] == ""
    server.fail(("status", 401, {}))
    denied = cli(collection, server, tmp_path / "denied.run", key_flag=False)
    assert denied.returncode == 2 and "no API key was sent to this host: name its variable with --api-key-env" \
        in denied.stderr


def test_a_named_key_never_travels_over_plain_http_to_another_host(collection, tmp_path):
    out = tmp_path / "remote" / "r.run"
    env = {**os.environ, "CROSSRANK_TEST_KEY": SECRET, "PYTHONPATH": str(ROOT)}
    refused = subprocess.run([sys.executable, str(ROOT / "rank_gpt.py"), "--run", str(collection["run"]),
                              "--topics", str(collection["topics"]), "--corpus", str(collection["corpus"]), "-o",
                              str(out), "--model", "m", "--base-url", "http://gpu-node.example:8000/v1",
                              "--api-key-env", "CROSSRANK_TEST_KEY"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: --base-url http://gpu-node.example:8000/v1: refusing to send $CROSSRANK_TEST_KEY over plain http "
        "to a host that is not loopback (expected an https:// URL, or http:// to localhost)"]
    assert not out.parent.exists()  # nothing written, nothing sent


@pytest.mark.parametrize("url, variable, sent", [
    ("https://api.openai.com/v1", "", ("OPENAI_API_KEY", "sk-openai")),
    ("http://api.openai.com/v1", "", ("", "")),  # plain http: not even to OpenAI
    ("https://api.together.xyz/v1", "", ("", "")),  # another host: only a named variable
    ("http://127.0.0.1:8000/v1", "", ("", "")),
    ("https://api.together.xyz/v1", "OTHER_KEY", ("OTHER_KEY", "sk-other")),
    ("http://localhost:8000/v1", "OTHER_KEY", ("OTHER_KEY", "sk-other")),
    ("http://[::1]:8000/v1", "OTHER_KEY", ("OTHER_KEY", "sk-other")),
    ("http://127.0.0.2:8000/v1", "OTHER_KEY", ("OTHER_KEY", "sk-other")),
    ("http://10.0.0.5:8000/v1", "UNSET_KEY", ("UNSET_KEY", "")),  # nothing to leak: not refused
])
def test_api_key_for(monkeypatch, url, variable, sent):
    from crossrank.teacher.chat import api_key_for

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("OTHER_KEY", "sk-other")
    monkeypatch.delenv("UNSET_KEY", raising=False)
    assert api_key_for(url, variable) == sent


def test_novelty_prompt_reaches_the_server(collection, server, tmp_path):
    assert cli(collection, server, tmp_path / "n.run", "--limit", "1", "--novelty-prompt").returncode == 0
    assert cli(collection, server, tmp_path / "r.run", "--limit", "1").returncode == 0
    novelty, plain = server.requests[0]["body"]["messages"], server.requests[-1]["body"]["messages"]
    assert "near-duplicate" in novelty[-1]["content"] and "novelty" in novelty[0]["content"]
    assert "near-duplicate" not in plain[-1]["content"]
    assert summary(tmp_path / "n.run")["settings"]["novelty"] is True


def test_dataset_key_and_bad_input(collection, server, tmp_path):
    yaml_path = tmp_path / "toy.yaml"
    yaml_path.write_text(f"name: toy\ncorpus: {collection['corpus']}\ntopics: {collection['topics']}\n"
                         f"runs: {{bm25: {collection['run']}}}\n")
    args = [sys.executable, str(ROOT / "rank_gpt.py"), "--dataset", str(yaml_path), "--run", "bm25", "-o",
            str(tmp_path / "ds.run"), "--model", "m", "--base-url", server.url, "--limit", "1", "--no-progress"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, "NO_PROXY": "*"})
    assert result.returncode == 0, result.stderr
    assert len(ranking(tmp_path / "ds.run")["q1"]) == 30
    (tmp_path / "few.tsv").write_text("q1\tcat\n")
    bad = cli({**collection, "topics": tmp_path / "few.tsv"}, server, tmp_path / "few.run")
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'few.tsv'}: 3 queries of the run have no topic (e.g. q2, q3, " \
                                 f"q4; expected every run qid in the topics)"


def test_finished_run_is_extended_not_redone(collection, server, tmp_path):
    out = tmp_path / "grow.run"
    dry = cli(collection, server, out, "--dry-run", "--price-prompt", "1000000")
    assert dry.returncode == 0 and not list(tmp_path.glob("grow*")) and not server.requests
    # the windows over the first-stage order (candidate j at rank j + 1), estimated
    topics = dict(line.split("\t") for line in collection["topics"].read_text().splitlines())
    texts = dict(line.split("\t") for line in collection["corpus"].read_text().splitlines())
    expected = sum(estimate_tokens(build_messages(topics[q], [texts[f"{q}d{j}"] for j in range(start, end)], 300))
                   for q in topics for start, end in sliding_windows(30, 10, 5))
    assert dry.stdout.startswith("dry run (estimate (max(chars/4")
    assert f"4 queries, 20 requests, {expected} prompt tokens, {20 * (6 * 10 + 32)} completion tokens" in dry.stdout
    assert cli(collection, server, out, "--limit", "1").returncode == 0
    first = out.read_text()
    assert cli(collection, server, out, "--limit", "2").returncode == 0  # e.g. after a cost estimate on 1 query
    assert len(server.requests) == 10 and sorted(ranking(out)) == ["q1", "q2"]
    assert out.read_text().startswith(first)
    again = cli(collection, server, out, "--limit", "2")
    assert again.returncode == 0 and len(server.requests) == 10  # nothing left to ask
    assert "2 queries, 10 requests" in again.stdout
    other = cli(collection, server, out, "--novelty-prompt")
    assert other.returncode == 2 and "cannot resume with other settings (--novelty False -> True" in other.stderr


def test_irds_topics_and_corpus(server, tmp_path, shared_data):
    import shutil

    shutil.copytree(shared_data / "ir_datasets_home" / "vaswani", tmp_path / "irds" / "vaswani")
    (tmp_path / "v.run").write_text("".join(f"1 Q0 {d} {r} {20 - r} bm25\n" for r, d in enumerate(range(1, 13), 1)))
    args = [sys.executable, str(ROOT / "rank_gpt.py"), "--run", str(tmp_path / "v.run"), "--topics", "irds:vaswani",
            "--corpus", "irds:vaswani", "-o", str(tmp_path / "v.teacher.run"), "--model", "m", "--base-url",
            server.url, "--window", "12", "--no-progress"]
    env = {**os.environ, "NO_PROXY": "*", "IR_DATASETS_HOME": str(tmp_path / "irds")}
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    messages = server.requests[0]["body"]["messages"]
    assert "MEASUREMENT OF DIELECTRIC CONSTANT" in messages[-1]["content"].upper()  # vaswani query 1
    assert messages[3]["content"].startswith("[1] compact memories have flexible capacities")  # doc 1
    assert sorted(d for d, _, _ in ranking(tmp_path / "v.teacher.run")["1"]) == sorted(str(d) for d in range(1, 13))
