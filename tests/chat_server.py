"""A small OpenAI-compatible chat-completions endpoint for the teacher tests, on 127.0.0.1 only.

It reads a RankGPT conversation (`[i] passage` messages, a final `Search Query: ...` instruction) and answers
`[i] > [j] > ...` ranked by how often the query's words occur in each passage (ties: lower id first), with
token usage. Faults are queued with `fail(...)` and consumed one per request, in order:

    ("status", 429, {"Retry-After": "1"})   an error status with headers
    ("drop",)                                close the connection without answering
    ("answer", "[3] > [3] > [9]")            a fixed (malformed) answer
    ("sleep", 2.0)                           answer only after 2 s (for client timeouts)
Every request is recorded (time, path, headers, parsed body) in `requests`; `delay` slows every answer;
`max_in_flight` is the most requests that were being answered at the same time.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def rank_by_overlap(messages: list[dict]) -> str:
    passages = {}
    query = ""
    for message in messages:
        if message["role"] != "user":
            continue
        numbered = re.match(r"\[(\d+)\] (.*)", message["content"], flags=re.DOTALL)
        if numbered:
            passages[int(numbered.group(1))] = numbered.group(2).lower().split()
        searched = re.match(r"Search Query: (.*?)\. \n", message["content"])
        if searched:
            query = searched.group(1)
    terms = set(query.lower().split())
    order = sorted(passages, key=lambda i: (-sum(w in terms for w in passages[i]), i))
    return " > ".join(f"[{i}]" for i in order)


class ChatServer:
    def __init__(self):
        self.faults: list[tuple] = []
        self.requests: list[dict] = []
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"time": time.monotonic(), "path": self.path,
                                            "headers": dict(self.headers), "body": body})
                    fault = server.faults.pop(0) if server.faults else ("ok",)
                    counted = fault[0] != "sleep"  # a request its client abandoned is not in flight
                    server.in_flight += counted
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.answer(body, fault)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer
                finally:
                    with server.lock:
                        server.in_flight -= counted

            def answer(self, body: dict, fault: tuple):
                if fault[0] == "drop":
                    self.close_connection = True
                    return  # nothing written: the client sees the connection close
                if fault[0] == "status":
                    self.reply(fault[1], {"error": {"message": f"fault {fault[1]}",  # and an HTML trailer:
                                                    "echo": self.headers.get("Authorization", "")}}, fault[2],
                               trailer=b"\n<html>\n<body>proxy error</body>\n</html>\n")  # several lines
                    return
                time.sleep(fault[1] if fault[0] == "sleep" else server.delay)
                answer = fault[1] if fault[0] == "answer" else rank_by_overlap(body["messages"])
                prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
                self.reply(200, {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer}}],
                                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.split()),
                                           "total_tokens": prompt_tokens + len(answer.split())}})

            def reply(self, status: int, payload: dict, headers: dict | None = None, trailer: bytes = b""):
                data = json.dumps(payload).encode() + trailer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def fail(self, *faults: tuple) -> None:
        with self.lock:
            self.faults.extend(faults)

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
