"""A minimal client for OpenAI-compatible chat-completions endpoints (standard library only).

Any server speaking the protocol works: OpenAI, vLLM, llama.cpp's server, Ollama, LiteLLM...
Transient failures (HTTP 429, 5xx, refused or dropped connections, timeouts) are retried with
exponential backoff and jitter, honouring ``Retry-After``; anything else raises
:class:`ChatError` with one line naming the endpoint, the status and the server's message.
The API key is sent as a Bearer token and never appears in messages, logs or ``repr``.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from lmsae.errors import LmsaeError

log = logging.getLogger(__name__)

#: longest wait honoured from a Retry-After header (a server asking for hours is treated as down)
MAX_RETRY_AFTER_S = 300.0


class ChatError(LmsaeError):
    """A chat-completions request failed. ``status`` is the HTTP status (None: no response);
    ``retryable`` tells whether the failure was transient (and retries ran out)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_message(raw: bytes) -> str:
    """The error message in an error body: ``{"error": {"message": ...}}``, ``{"error": "..."}``,
    ``{"message": ...}`` or the raw text."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return _one_line(text) or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            for key in ("message", "detail", "error"):
                if isinstance(error.get(key), str):
                    return _one_line(error[key])
        elif isinstance(error, str):
            return _one_line(error)
        if isinstance(data.get("detail"), str):
            return _one_line(data["detail"])
    return _one_line(text)


def public_url(url: str) -> str:
    """``url`` without user info or query string (either may carry a credential), for messages
    and records."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class ChatClient:
    """Sends chat-completions requests to ``{base_url}/chat/completions``.

    - ``api_key``: the key itself; when None it is read from the environment variable
      ``api_key_env`` (no key at all is fine for local servers: no Authorization header is sent).
    - ``timeout_s``: per attempt (connect + read); ``max_retries``: retries after the first
      attempt; ``backoff_s``: first backoff, doubled each retry, with jitter, at most
      ``max_backoff_s`` (a Retry-After header replaces it).
    - ``temperature``, ``max_tokens``: sent with every request.

    Thread-safe: requests share no mutable state except counters behind a lock.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0, max_retries: int = 4,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0, temperature: float = 0.0,
                 max_tokens: int = 512, extra_headers: Mapping[str, str] | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise LmsaeError(f"the explainer base_url must start with http:// or https://, got {base_url!r}")
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise LmsaeError("ChatClient needs max_retries >= 0, timeout_s > 0 and backoff_s >= 0")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self._shown_url = public_url(self.url)  # what messages and logs name
        self.model = model
        self.api_key_env = api_key_env
        # kept private and out of repr: the key must never reach a log line or an error message
        self._api_key = api_key if api_key is not None else (os.environ.get(api_key_env) or None)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self._extra_headers = dict(extra_headers or {})
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "retries": 0, "failures": 0}

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return f"ChatClient(url={self._shown_url!r}, model={self.model!r}, api_key={key})"

    @property
    def has_api_key(self) -> bool:
        return self._api_key is not None

    def stats(self) -> dict[str, int]:
        """Counts so far: ``requests`` (HTTP attempts), ``retries`` and ``failures`` (calls that raised)."""
        with self._lock:
            return dict(self._counts)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "lmsae-autointerp", **self._extra_headers}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        # full exponential step scaled into [0.5, 1): spreads out workers that failed together
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + 0.5 * random.random())

    def complete(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The assistant's reply to ``messages`` (``[{"role": ..., "content": ...}, ...]``).

        Raises :class:`ChatError` on a non-retryable HTTP error, a malformed response, or when
        every attempt failed."""
        body = json.dumps({"model": self.model, "messages": [dict(m) for m in messages],
                           "temperature": self.temperature, "max_tokens": self.max_tokens}).encode("utf-8")
        attempt = 0
        while True:
            retry_after: float | None = None
            status: int | None = None
            self._count("requests")
            try:
                request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                return self._content(raw)
            except urllib.error.HTTPError as e:
                status = e.code
                try:
                    message = _server_message(e.read())
                except (OSError, http.client.HTTPException):
                    message = e.reason or "(no body)"
                retry_after = _retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
                e.close()
                problem = f"HTTP {status}: {message}"
                if status != 429 and status < 500:
                    self._count("failures")
                    raise ChatError(f"chat completions request to {self._shown_url} failed with {problem}",
                                    status=status) from None
            except urllib.error.URLError as e:
                reason = e.reason
                problem = (f"timed out after {self.timeout_s:g}s" if isinstance(reason, TimeoutError)
                           else f"could not connect ({reason})")
            except TimeoutError:
                problem = f"timed out after {self.timeout_s:g}s"
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                problem = f"connection failed ({type(e).__name__}: {e})"
            if attempt >= self.max_retries:
                self._count("failures")
                tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                raise ChatError(f"chat completions request to {self._shown_url} failed after {tries}: {problem}",
                                status=status, retryable=True)
            delay = self._backoff(attempt, retry_after)
            log.debug("chat request failed (%s); retrying in %.2fs", problem, delay)
            self._count("retries")
            time.sleep(delay)
            attempt += 1

    def _content(self, raw: bytes) -> str:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self._count("failures")
            raise ChatError(f"chat completions response from {self._shown_url} is not valid JSON: "
                            f"{_one_line(raw.decode('utf-8', errors='replace'), 120)!r}") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            self._count("failures")
            raise ChatError(f"chat completions response from {self._shown_url} has no choices[0].message.content: "
                            f"{_one_line(json.dumps(data), 160)}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            self._count("failures")
            raise ChatError(f"chat completions response from {self._shown_url} has empty message content")
        return content
