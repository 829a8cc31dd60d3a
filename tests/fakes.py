"""Fake LLM upstreams (OpenAI and Ollama shapes) that record what reached them."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def ollama_details(model: str) -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}


class FakeUpstream:
    """An OpenAI + Ollama compatible server on a free port, answering with its `name` in every reply. With
    `api_key` it answers 401 (OpenAI-shaped) to every request without `Authorization: Bearer <api_key>`.

    Streams end like real servers': OpenAI SSE with a usage event (`"choices":[]`) before `data: [DONE]` when
    the request asks for `stream_options.include_usage` (and, with `usage_null`, `"usage":null` in every
    other chunk, as OpenAI itself does; with `obfuscation`, OpenAI's shape since 2025: `"usage":null` and a
    last field `"obfuscation":"<padding>"` in every chunk, the usage event included); Ollama NDJSON with
    `prompt_eval_count`/`eval_count` in the last line. Non-streamed answers: `tool_args` adds a tool call with
    these arguments (a JSON string for OpenAI, an object for Ollama's /api/chat, as each sends them);
    `prompt_logprobs` adds vLLM's `prompt_logprobs` (tokens such as "usage") after the usage.
    Knobs for broken streams: `cut_after` events the connection is closed without ending the stream,
    `stall_after` events it goes silent for `stall` seconds; `split` sends each event in two pieces, cut
    inside the first "é" (give the text one with `suffix`); `fail_status` answers every POST with that error,
    `delay` holds every POST's answer (head included) that many seconds.

    `apis` says which APIs it speaks, as a real server would: "openai" (/v1/*, as vLLM) and/or "ollama" (/api/*
    and `GET /`, answered exactly as Ollama does, so the real `ollama` library validates them); the other
    API's paths get the 404 such a server gives. `running`: the models /api/ps reports (default: the first).
    /api/pull streams Ollama's progress lines (`pull_steps` of them, `pull_delay` apart; a name starting with
    "missing" fails as an unknown model does, with an `error` line) and adds the model; /api/delete removes one
    (404 with Ollama's error when it is not there)."""

    def __init__(self, name: str, models: list[str], chunk_delay: float = 0.0, chunks: int = 5, port: int = 0,
                 api_key: str | None = None, apis: tuple[str, ...] = ("openai", "ollama")):
        self.name = name
        self.apis = apis
        self.running: list[str] | None = None
        self.version = "0.6.5"
        self.api_key = api_key
        self.models = models
        self.chunk_delay = chunk_delay
        self.chunks = chunks
        self.usage_null = False
        self.obfuscation = False
        self.tool_args: str | None = None
        self.prompt_logprobs = False
        self.answer: bytes | None = None  # the JSON body of any other POST (e.g. /v1/responses), as it is
        self.answer_type = "application/json"  # its Content-Type
        self.chat_usage = True  # False: non-streamed chat answers without `usage` (nothing for the meter to count)
        self.suffix = ""  # added to every streamed piece of text, e.g. "é" for multibyte characters
        self.split = False
        self.cut_after: int | None = None
        self.stall_after: int | None = None
        self.stall = 0.0
        self.linger = 0.0  # seconds between a stream's last line and its terminating chunk
        self.fail_status: int | None = None  # every POST answered with this error status (e.g. 503 overloaded)
        self.delay = 0.0  # seconds before answering a POST (its head too): a slow first byte
        self.pull_steps = 4  # progress lines of a layer's download in /api/pull (pull_delay apart)
        self.pull_delay = 0.0  # seconds between those lines
        # model loading, as Ollama does it: with `load_delay`, a POST for a model that is not loaded waits that
        # long (its head too) while the model loads; at most `max_loaded` stay loaded (the least recently used
        # goes), listed by /api/ps; `loads` counts them
        self.load_delay = 0.0
        self.max_loaded = 1
        self.loads = 0
        self.load_lock = threading.Lock()
        self.metrics: str | None = None  # the Prometheus text of GET /metrics (vLLM's), when set
        self.requests: list[dict[str, Any]] = []
        self.stream_finished = threading.Event()
        handler = type("Handler", (_Handler,), {"upstream": self})
        self.server = _Server(("127.0.0.1", port), handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets its connection (e.g. an idle keepalive one, as nginx workers exit) is no error;
        its traceback on stderr would also land in the output of a CLI command a test runs meanwhile (CliRunner
        swaps sys.stderr)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    upstream: FakeUpstream
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as uvicorn, vLLM and other real servers set it: http.server writes an answer's head and its
    # body separately, and with Nagle the body waits for nginx's delayed ACK, 40 ms on every reused connection.
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def _record(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        entry = {"path": self.path, "method": self.command, "headers": dict(self.headers), "body": raw,
                 "peer": self.client_address}
        self.upstream.requests.append(entry)
        return entry

    def _json(self, payload: Any, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, content_type: str, lines: list[bytes]) -> None:
        up = self.upstream
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, line in enumerate(lines):
            if i:
                time.sleep(up.chunk_delay)
            if i == up.cut_after:  # dies mid-stream: no terminating chunk
                self.close_connection = True
                return
            if i == up.stall_after:
                time.sleep(up.stall)
                self.close_connection = True
                return
            cut = line.find("é".encode()) + 1 if up.split else 0  # inside the two bytes of "é"
            for piece in (line[:cut], line[cut:]) if cut else (line,):
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.flush()
                if cut:
                    time.sleep(0.01)
        time.sleep(up.linger)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        up.stream_finished.set()

    def _openai_stream(self, body: dict[str, Any], chat: bool) -> None:
        """An OpenAI stream, as vLLM or OpenAI (`usage_null`) sends it."""
        up = self.upstream
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        events = []
        for i in range(up.chunks):
            text = f"{up.name}-{i} {up.suffix}"
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": None} if chat
                      else {"index": 0, "text": text, "finish_reason": None, "logprobs": None})
            chunk: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk" if chat else "text_completion",
                                     "created": 0, "model": body.get("model", ""), "choices": [choice]}
            if usage and (up.usage_null or up.obfuscation):
                chunk["usage"] = None
            events.append(chunk)
        if usage:
            events.append({"id": "c1", "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": 0, "model": body.get("model", ""), "choices": [],
                           "usage": {"prompt_tokens": 11, "completion_tokens": up.chunks * 2,
                                     "total_tokens": 11 + up.chunks * 2,
                                     "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}}})
        if up.obfuscation:  # random padding of varying length in OpenAI's; fixed here so runs can be compared,
            for i, event in enumerate(events):  # and sometimes "usage" (a string, after the usage key)
                event["obfuscation"] = "usage" if i % 2 else "aZ0-_xQ9"[: 1 + i % 8] * (1 + i % 3)
            events[-1]["obfuscation"] = "usage"
        lines = [b"data: " + json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
                 for e in events]
        self._stream("text/event-stream", [*lines, b"data: [DONE]\n\n"])

    def _load(self, entry: dict[str, Any]) -> None:
        """Load the request's model unless it is loaded (one load at a time, as Ollama's scheduler)."""
        up = self.upstream
        try:
            model = json.loads(entry["body"] or b"{}").get("model")
        except (ValueError, AttributeError):
            return
        if not isinstance(model, str):
            return
        with up.load_lock:
            loaded = list(up.running or [])
            if model not in loaded:
                time.sleep(up.load_delay)
                up.loads += 1
            up.running = ([model] + [m for m in loaded if m != model])[: up.max_loaded]

    def _refused(self) -> bool:
        """Answer 401 when the upstream wants a key and did not get it."""
        key = self.upstream.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return False
        self._json({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                              "param": None, "code": "invalid_api_key"}}, 401)
        return True

    def _unspoken(self) -> bool:
        """Answer 404 to a path of an API this server does not speak (as vLLM does to /api/*, Ollama to /)."""
        up, path = self.upstream, self.path
        ollama = path.startswith("/api/") or path == "/"
        spoken = "ollama" in up.apis if ollama else ("openai" in up.apis or not path.startswith("/v1/"))
        if spoken:
            return False
        if ollama:  # vLLM / FastAPI
            self._json({"detail": "Not Found"}, 404)
        else:  # Ollama (Go's net/http)
            data = b"404 page not found"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        return True

    def _tag(self, model: str) -> dict[str, Any]:
        """An /api/tags entry as Ollama 0.6 lists it (digest and size derived from the name)."""
        digest = hashlib.sha256(model.encode()).hexdigest()
        return {"name": model, "model": model, "modified_at": "2025-03-14T09:26:53.123456789+01:00",
                "size": 4_661_224_676 + len(model), "digest": digest, "details": ollama_details(model)}

    def do_HEAD(self) -> None:
        self._record()
        if self.path == "/" and "ollama" in self.upstream.apis:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", "17")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_GET(self) -> None:
        self._record()
        if self._refused() or self._unspoken():
            return
        up = self.upstream
        if self.path == "/v1/models":
            self._json({"object": "list", "data": [{"id": m, "object": "model", "created": 1_700_000_000 + i,
                                                    "owned_by": f"{up.name}-org"} for i, m in enumerate(up.models)]})
        elif self.path == "/api/tags":
            self._json({"models": [self._tag(m) for m in up.models]})
        elif self.path == "/api/ps":
            running = up.models[:1] if up.running is None else up.running
            self._json({"models": [{**{k: x for k, x in self._tag(m).items() if k != "modified_at"},
                                    "expires_at": "2099-01-01T00:00:00.000000000Z", "size_vram": 5_000_000_000,
                                    "context_length": 4096} for m in running]})
        elif self.path == "/api/version":
            self._json({"version": up.version})
        elif self.path == "/metrics" and up.metrics is not None:
            data = up.metrics.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/":
            data = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._json({"upstream": up.name, "path": self.path})

    def do_DELETE(self) -> None:
        entry = self._record()
        if self._refused() or self._unspoken():
            return
        up = self.upstream
        try:
            name = json.loads(entry["body"] or b"{}").get("model", "")
        except (ValueError, AttributeError):
            name = ""
        if self.path != "/api/delete":
            self._json({"error": "not found"}, 404)
        elif name not in up.models:
            self._json({"error": f"model '{name}' not found"}, 404)
        else:
            up.models.remove(name)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _pull(self, name: str) -> None:
        """Ollama's /api/pull stream, as 0.6 sends it (a layer's digest cut to 12 characters in the status)."""
        up = self.upstream
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        total = 4_661_224_676
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        if name.startswith("missing"):
            lines.append({"error": "pull model manifest: file does not exist"})
        else:
            lines += [{"status": f"pulling {digest[7:19]}", "digest": digest, "total": total,
                       "completed": total * i // up.pull_steps} for i in range(up.pull_steps + 1)]
            lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, line in enumerate(lines):
            if i:
                time.sleep(up.pull_delay)
            data = json.dumps(line).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        if not name.startswith("missing") and name not in up.models:
            up.models.append(name)

    def do_POST(self) -> None:
        entry = self._record()
        if self._refused() or self._unspoken():
            return
        up = self.upstream
        if up.delay:
            time.sleep(up.delay)
        if up.load_delay:
            self._load(entry)
        if up.fail_status is not None:
            self._json({"error": {"message": f"{up.name} is unavailable", "type": "server_error", "param": None,
                                  "code": "overloaded"}}, up.fail_status)
            return
        try:
            body = json.loads(entry["body"] or b"{}")
        except ValueError:
            body = {}
        model = body.get("model", "")
        if self.path in ("/v1/chat/completions", "/v1/completions") and body.get("stream") is True:
            self._openai_stream(body, self.path == "/v1/chat/completions")
        elif self.path == "/v1/chat/completions":
            answer = {
                "id": "c1", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hello from {up.name}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                "received_bytes": len(entry["body"]),
            }
            if up.tool_args is not None:
                answer["choices"][0]["message"]["tool_calls"] = [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": up.tool_args}}]
            if up.prompt_logprobs:  # vLLM: after the usage, with prompt tokens that spell keys
                answer["prompt_logprobs"] = [None, {"7": {"logprob": -1.5, "rank": 1, "decoded_token": "usage"}},
                                             {"8": {"logprob": -0.5, "rank": 2, "decoded_token": '"usage":{'}}]
            if not up.chat_usage:
                del answer["usage"]
            self._json(answer)
        elif self.path == "/v1/completions":
            self._json({"id": "t1", "object": "text_completion", "created": 0, "model": model,
                        "choices": [{"index": 0, "text": f"text from {up.name}", "finish_reason": "stop",
                                     "logprobs": None}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})
        elif self.path == "/v1/embeddings":
            self._json({"object": "list", "model": model,
                        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                        "usage": {"prompt_tokens": 1, "total_tokens": 1}})
        elif self.path == "/api/chat" and body.get("stream") is False:
            message: dict[str, Any] = {"role": "assistant", "content": f"hello from {up.name}"}
            if up.tool_args is not None:  # Ollama writes the arguments as JSON, not as a string
                message["tool_calls"] = [{"function": {"name": "f", "arguments": json.loads(up.tool_args)}}]
            self._json({"model": model, "message": message, "done": True, "done_reason": "stop",
                        "prompt_eval_count": 9, "eval_count": up.chunks})
        elif self.path == "/api/pull":
            self._pull(body.get("model") or body.get("name") or "")
        elif self.path == "/api/show":
            name = body.get("model") or body.get("name") or ""
            if name not in up.models and f"{name}:latest" not in up.models:
                self._json({"error": f"model '{name}' not found"}, 404)
            else:
                self._json({"license": "", "modelfile": f"FROM {name}\n", "parameters": "stop \"<|eot_id|>\"",
                            "template": "{{ .Prompt }}", "details": ollama_details(name),
                            "model_info": {"general.architecture": "llama", "general.parameter_count": 8030261248,
                                           "llama.context_length": 131072},
                            "capabilities": ["completion"], "modified_at": "2025-03-14T09:26:53.123456789+01:00"})
        elif self.path == "/api/generate":
            pieces = [{"model": model, "created_at": "2024-01-01T00:00:00Z", "response": f"{up.name}-{i}{up.suffix}",
                       "done": False} for i in range(up.chunks)]
            last = {"model": model, "created_at": "2024-01-01T00:00:00Z", "response": "", "done": True,
                    "done_reason": "stop", "context": [1, 2, 3], "total_duration": 1000, "load_duration": 10,
                    "prompt_eval_count": 9, "prompt_eval_duration": 100, "eval_count": up.chunks,
                    "eval_duration": 500}
            if body.get("stream") is False:
                self._json({**last, "response": "".join(p["response"] for p in pieces)})
            else:
                self._stream("application/x-ndjson", [json.dumps(x, ensure_ascii=False).encode() + b"\n"
                                                      for x in (*pieces, last)])
        elif self.path == "/api/embed":
            self._json({"model": model, "embeddings": [[0.1, 0.2, 0.3]], "total_duration": 1000,
                        "load_duration": 10, "prompt_eval_count": 1})
        elif self.path == "/api/chat":
            lines = [json.dumps({"model": model, "created_at": "2024-01-01T00:00:00Z",
                                 "message": {"role": "assistant", "content": f"{up.name}-{i}{up.suffix}"},
                                 "done": False}, ensure_ascii=False).encode() + b"\n" for i in range(up.chunks)]
            lines.append(json.dumps({"model": model, "created_at": "2024-01-01T00:00:00Z",
                                     "message": {"role": "assistant", "content": ""}, "done": True,
                                     "done_reason": "stop", "total_duration": 1000, "prompt_eval_count": 9,
                                     "eval_count": up.chunks}).encode() + b"\n")
            self._stream("application/x-ndjson", lines)
        elif self.path.startswith("/v1/fail/"):  # the upstream's own error, e.g. /v1/fail/500
            self._json({"error": {"message": f"{up.name} failed on purpose", "type": "server_error",
                                  "param": None, "code": "upstream_said_so"}}, int(self.path.rsplit("/", 1)[1]))
        elif self.path == "/v1/evil":  # a compromised upstream trying to hop into another pool
            data = b"{}"
            self.send_response(200)
            self.send_header("X-Accel-Redirect", "@pool_beta")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif up.answer is not None:
            self.send_response(200)
            self.send_header("Content-Type", up.answer_type)
            self.send_header("Content-Length", str(len(up.answer)))
            self.end_headers()
            self.wfile.write(up.answer)
        else:
            self._json({"upstream": up.name, "path": self.path, "model": model})


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B85"


def ws_accept(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def ws_frame(payload: bytes, mask: bool) -> bytes:
    """One final text frame (clients mask theirs, servers do not)."""
    head = bytes([0x81])
    size = len(payload)
    length = bytes([size]) if size < 126 else bytes([126]) + size.to_bytes(2, "big")
    if not mask:
        return head + length + payload
    key = os.urandom(4)
    return head + bytes([length[0] | 0x80]) + length[1:] + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_read(sock: socket.socket) -> bytes:
    """The payload of one frame (short frames, masked or not)."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            piece = sock.recv(n - len(data))
            if not piece:
                raise ConnectionError("closed inside a frame")
            data += piece
        return data
    _, second = exactly(2)
    size = second & 0x7F
    if size == 126:
        size = int.from_bytes(exactly(2), "big")
    key = exactly(4) if second & 0x80 else b""
    payload = exactly(size)
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if key else payload


def ws_handshake(port: int, query: str, key: str | None) -> tuple[str, dict[str, str], bytes, socket.socket]:
    """An upgrade request to /v1/realtime: (status line, headers, body bytes read so far, the open socket)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    nonce = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock.sendall((f"GET /v1/realtime?{query} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
                  f"{auth}\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(4096)
        assert piece, data
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    if line.split()[1] == "101":
        assert headers["sec-websocket-accept"] == ws_accept(nonce)
    return line, headers, rest, sock


class FakeWebSocket:
    """A realtime-API upstream: answers a WebSocket handshake (101) and echoes each text frame back prefixed
    with its name, recording each handshake's request line and headers. The stdlib has no WebSocket server;
    this is the least of RFC 6455 that a proxy test needs."""

    def __init__(self, name: str):
        self.name = name
        self.handshakes: list[dict[str, Any]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                piece = conn.recv(4096)
                if not piece:
                    return
                head += piece
            line, *fields = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
            self.handshakes.append({"line": line, "headers": headers})
            if headers.get("upgrade", "").lower() != "websocket" or "sec-websocket-key" not in headers:
                body = json.dumps({"upstream": self.name, "websocket": False}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                return
            conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {ws_accept(headers['sec-websocket-key'])}\r\n\r\n").encode())
            try:
                while True:
                    conn.sendall(ws_frame(self.name.encode() + b": " + ws_read(conn), mask=False))
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
