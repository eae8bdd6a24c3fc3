"""A scripted OpenAI-compatible chat-completions server for tests (127.0.0.1, random port).

``ChatServer(reply)`` answers ``POST .../chat/completions`` with ``reply(request_json)``: a string
(the assistant's content) or a ``(status, body_dict_or_text, headers)`` tuple for an error. It
can fail the first ``fail_first`` requests with ``fail_status`` (and a ``Retry-After`` header),
fail every request (``fail_always``), or sleep ``delay_s`` before answering. Every request is
recorded (path, headers, JSON body), and so is the largest number of requests in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

Reply = Callable[[dict[str, Any]], "str | tuple[int, Any, dict[str, str]]"]


class ChatServer:
    def __init__(self, reply: Reply | None = None, *, fail_first: int = 0, fail_status: int = 429,
                 retry_after: str | None = None, fail_always: bool = False, delay_s: float = 0.0):
        self.reply = reply or (lambda request: "ok")
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.fail_always = fail_always
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # a short poll interval makes shutdown() quick (it waits for the serving loop to notice)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The base URL clients use (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    number = len(server.requests)
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = None
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                try:
                    status, payload, headers = self._answer(number, body)
                finally:
                    # leave the count before replying: once the reply is sent the client may
                    # start its next request while this thread is still winding down
                    with server._lock:
                        server.in_flight -= 1
                self._send(status, payload, headers)

            def _answer(self, number: int, body: Any) -> tuple[int, Any, dict[str, str]]:
                if server.delay_s:
                    time.sleep(server.delay_s)
                if not self.path.endswith("/chat/completions"):
                    return 404, {"error": {"message": f"no route {self.path}"}}, {}
                if server.fail_always or number < server.fail_first:
                    headers = {"Retry-After": server.retry_after} if server.retry_after else {}
                    return server.fail_status, {"error": {"message": "scripted failure"}}, headers
                result = server.reply(body)
                if isinstance(result, tuple):
                    return result
                return 200, {"id": f"chat-{number}", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": result}}]}, {}

        return Handler
