"""A small OpenAI-compatible chat-completions endpoint for the teacher tests, on 127.0.0.1 only (optionally over
TLS), and a recording proxy on another loopback address.

It reads a RankGPT conversation (`[i] passage` messages, a final `Search Query: ...` instruction) and answers
`[i] > [j] > ...` ranked by how often the query's words occur in each passage (ties: lower id first), with
token usage. Faults are queued with `fail(...)` and consumed one per request, in order:

    ("status", 429, {"Retry-After": "1"})   an error status with headers
    ("drop",)                                close the connection without answering
    ("answer", "[3] > [3] > [9]")            a fixed (malformed) answer
    ("sleep", 2.0)                           answer only after 2 s (for client timeouts)
    ("hold",)                                answer only once `release` is set; `held` is set on arrival, so a
                                             test knows the client is waiting on this request (no clock)
    ("barrier",)                             answer once `barrier` (a threading.Barrier the test sets) is full:
                                             that many requests were in flight together
    ("redirect", 302, "http://...")          a redirect to that Location
    ("drip", 0.2, "body")                    a good answer, one byte every 0.2 s, after the headers ("body")
                                             or from the status line on ("head")
    ("huge", 5_000_000, "length")            a well-formed answer of that many bytes, with a Content-Length
                                             ("length") or chunked without one ("chunked")
    ("json", {...})                          a 200 with this JSON body (malformed chat completions)
    ("raw", b"...")                          a 200 with these body bytes
Every request is recorded (time, path, headers, parsed body) in `requests`; `delay` slows every answer;
`max_in_flight` is the most requests that were being answered at the same time.

`RecordingProxy` is an HTTP proxy on 127.0.0.2 (127.0.0.1 where that address cannot be bound) that forwards
whatever host a request names to one upstream loopback port (CONNECT tunnels and absolute-form requests alike)
and keeps every byte the client sent it in `received`: a test asks whether a key crossed it in clear text.
"""
from __future__ import annotations

import json
import re
import select
import socket
import ssl
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


def completion(model: str, answer: str, prompt_tokens: int = 0) -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.split()),
                      "total_tokens": prompt_tokens + len(answer.split())}}


class ChatServer:
    def __init__(self, tls: tuple[str, str] | None = None):
        """`tls`: (certificate file, key file) to serve https."""
        self.faults: list[tuple] = []
        self.requests: list[dict] = []
        self.delay = 0.0
        self.held, self.release = threading.Event(), threading.Event()
        self.barrier: threading.Barrier | None = None
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
                    counted = fault[0] not in ("sleep", "hold", "drip")  # abandoned by their clients
                    server.in_flight += counted
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.answer(body, fault)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
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
                if fault[0] == "redirect":
                    self.reply(fault[1], {"error": "moved"}, {"Location": fault[2]})
                    return
                if fault[0] in ("hold", "drip"):
                    self.close_connection = True
                if fault[0] == "hold":
                    server.held.set()
                    server.release.wait()
                    return  # the client was killed meanwhile: nothing to answer
                if fault[0] == "barrier":
                    try:
                        server.barrier.wait(timeout=60)  # a safety net: a serial client fails, not hangs
                    except threading.BrokenBarrierError:
                        pass
                if fault[0] == "json":
                    self.reply(200, fault[1])
                    return
                if fault[0] == "raw":
                    self.reply(200, None, raw=fault[1])
                    return
                time.sleep(fault[1] if fault[0] == "sleep" else server.delay)
                answer = fault[1] if fault[0] == "answer" else rank_by_overlap(body["messages"])
                prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
                payload = completion(body["model"], answer, prompt_tokens)
                if fault[0] == "drip":
                    self.drip(json.dumps(payload).encode(), fault[1], fault[2])
                elif fault[0] == "huge":
                    self.huge(payload, fault[1], fault[2])
                else:
                    self.reply(200, payload)

            def reply(self, status: int, payload: dict | None, headers: dict | None = None, trailer: bytes = b"",
                      raw: bytes = b""):
                data = (json.dumps(payload).encode() if payload is not None else raw) + trailer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def drip(self, data: bytes, every: float, phase: str):
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                        f"\r\n").encode()
                if phase == "body":
                    self.wfile.write(head)
                    self.wfile.flush()
                    head = b""
                for i in range(len(head + data)):  # a byte at a time: the socket is never idle for long
                    self.wfile.write((head + data)[i:i + 1])
                    self.wfile.flush()
                    if server.release.wait(every):
                        return  # the test is over

            def huge(self, payload: dict, size: int, framing: str):
                payload["choices"][0]["message"]["content"] += " " * size  # valid JSON, `size` bytes longer
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if framing == "length":
                    self.send_header("Content-Length", str(len(data)))
                else:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(data), 65536):
                    piece = data[start:start + 65536]
                    self.wfile.write(piece if framing == "length" else b"%x\r\n%s\r\n" % (len(piece), piece))
                if framing != "length":
                    self.wfile.write(b"0\r\n\r\n")

        Handler.protocol_version = "HTTP/1.1"  # Content-Length framing; chunked answers need 1.1
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/v1"

    def fail(self, *faults: tuple) -> None:
        with self.lock:
            self.faults.extend(faults)

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()  # held and dripping answers end
        self.httpd.shutdown()
        self.httpd.server_close()


def loopback_address() -> str:
    """127.0.0.2 (another loopback address than the chat server's), or 127.0.0.1 where it cannot be bound."""
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"


class RecordingProxy:
    """An HTTP proxy that sends every connection to `upstream` (a loopback port) whatever host it names, and
    records what the client sent: `received` (all bytes, tunnelled ones included) and `heads` (request
    heads: CONNECT host:port, or an absolute-form request). `deny`: answer CONNECT with 403 instead."""

    def __init__(self, upstream: int, deny: bool = False):
        self.upstream, self.deny = upstream, deny
        self.received, self.heads = bytearray(), []
        self.lock = threading.Lock()
        self.listener = socket.create_server((loopback_address(), 0))
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.closed = False

    @property
    def url(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def serve(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(client,), daemon=True).start()

    def record(self, data: bytes) -> None:
        with self.lock:
            self.received += data

    def handle(self, client: socket.socket) -> None:
        try:
            self.forward(client)
        except OSError:
            pass  # either side hung up: nothing more to record

    def forward(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
                self.record(data)
            self.heads.append(head.split(b"\r\n\r\n")[0].decode("latin-1"))
            tunnel = head.startswith(b"CONNECT ")
            if tunnel and self.deny:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            with socket.create_connection(("127.0.0.1", self.upstream)) as upstream:
                if tunnel:
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    rest = head.split(b"\r\n\r\n", 1)[1]
                    if rest:
                        upstream.sendall(rest)
                else:
                    upstream.sendall(head)
                self.pipe(client, upstream)

    def pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        while True:
            readable, _, _ = select.select([client, upstream], [], [], 30)
            if not readable:
                return
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                if sock is client:
                    self.record(data)
                    upstream.sendall(data)
                else:
                    client.sendall(data)

    def __enter__(self) -> "RecordingProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closed = True
        self.listener.close()
