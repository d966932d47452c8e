"""RemoteEngine: the Engine protocol over HTTP, against any OpenAI-compatible server.

Requests stream from ``/v1/chat/completions`` (chat messages) or ``/v1/completions`` (text or
token ids) on one asyncio loop thread, so many concurrent requests cost no threads; cancelling a
request closes its connection, which makes the server drop it. Per-request timings (TTFT,
inter-chunk gaps, tokens/s) are measured here on the client; server-wide numbers come from
scraping ``/metrics`` once a second (picochat's, vLLM's or llama.cpp's names; see
:mod:`picochat.remote_metrics`). What neither provides is None: shown as unavailable, never 0.
Errors arrive as the stream's last delta (``finish_reason="error"``) rather than from ``submit``,
which never waits on the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from picochat.config import SamplingParams
from picochat.engine.protocol import (Delta, EngineInfo, FinishReason, MetricsSnapshot, Prompt,
                                      RequestTimings, Stream, now)
from picochat.errors import ConfigError, EngineClosedError, ModelLoadError
from picochat.remote_metrics import parse_exposition, with_counter_rates

SCRAPE_INTERVAL_S = 1.0
RECENT_REQUESTS = 64
REMOTE_SETTINGS = ("quant", "spec", "batch", "attention", "model")
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}
CHARS_PER_TOKEN = 4  # the estimate when the server cannot count tokens


class RemoteStreamError(Exception):
    """The server sent an error instead of (or in the middle of) a completion."""


def base_url(url: str) -> str:
    """``http://host:8000/v1/`` → ``http://host:8000``: the API paths are added per call."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def error_message(response: httpx.Response) -> str:
    """One line from an error response: the OpenAI ``error.message`` when there is one."""
    try:
        body = response.json()
        detail = body.get("error", body) if isinstance(body, dict) else body
        message = detail.get("message", detail) if isinstance(detail, dict) else detail
    except ValueError:
        message = response.text
    first_line = str(message).strip().splitlines()[0] if str(message).strip() else response.reason_phrase
    return f"server answered {response.status_code}: {first_line}"


def request_body(model: str, prompt: Prompt, params: SamplingParams, token_ids: bool) -> tuple[str, dict]:
    """(path, JSON body) of a streamed request. vLLM's extra parameters are sent only when they
    differ from their defaults, so strict servers see plain OpenAI requests."""
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": params.max_tokens, "temperature": params.temperature,
                            "top_p": params.top_p}
    optional = {"seed": params.seed, "stop": list(params.stop) or None,
                "presence_penalty": params.presence_penalty or None,
                "frequency_penalty": params.frequency_penalty or None,
                "top_k": params.top_k if params.top_k > 0 else None, "min_p": params.min_p or None,
                "repetition_penalty": None if params.repetition_penalty == 1.0 else params.repetition_penalty,
                "stop_token_ids": list(params.stop_token_ids) or None,
                "ignore_eos": params.ignore_eos or None, "return_token_ids": token_ids or None}
    body |= {k: v for k, v in optional.items() if v is not None}
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return "/v1/completions", body | {"prompt": prompt}
    return "/v1/chat/completions", body | {"messages": prompt}


def estimate_tokens(prompt: str | list[dict]) -> int:
    """About four characters a token, plus a few per chat message for the template."""
    texts = [prompt] if isinstance(prompt, str) else [m.get("content", "") for m in prompt]
    per_message = 0 if isinstance(prompt, str) else 4
    return sum(-(-len(text) // CHARS_PER_TOKEN) + per_message for text in texts)


@dataclass
class StreamReader:
    """Turns one request's OpenAI stream chunks into Deltas, measuring timings on the way."""

    timings: RequestTimings
    chat: bool
    finish_reason: FinishReason | None = None
    usage: dict[str, Any] | None = None
    chunks: int = 0
    token_ids: int = 0
    _last: float | None = field(default=None, repr=False)

    def feed(self, chunk: dict[str, Any], t: float) -> Delta | None:
        """A delta for a chunk with output, None for one without (role, usage, finish)."""
        if "error" in chunk:
            error = chunk["error"]
            raise RemoteStreamError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choice = next((c for c in chunk.get("choices") or () if c.get("index", 0) == 0), None)
        if choice is None:
            return None
        if choice.get("finish_reason"):
            self.finish_reason = FINISH_REASONS.get(choice["finish_reason"], "stop")
        text = ((choice.get("delta") or {}).get("content") if self.chat else choice.get("text")) or ""
        ids = tuple(choice.get("token_ids") or ())
        if not text and not ids:
            return None
        if self._last is None:
            self.timings.first_token = t
        else:
            self.timings.itl.append(t - self._last)
        self._last = t
        self.chunks += 1
        self.token_ids += len(ids)
        return Delta(self.timings.request_id, text, ids)

    def final(self, t: float, error: str | None = None) -> Delta:
        """The last delta, with the timings (token counts from ``usage`` where the server sent it)."""
        usage = self.usage or {}
        t_ = self.timings
        t_.finished = t
        t_.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        t_.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        t_.output_tokens = int(usage.get("completion_tokens") or self.token_ids or self.chunks)
        if error is None and self.finish_reason is None:
            error = "the server closed the stream before it finished"
        reason: FinishReason = "error" if error is not None else self.finish_reason  # type: ignore[assignment]
        t_.finish_reason = reason
        return Delta(t_.request_id, "", (), finish_reason=reason, timings=t_.copy(), error=error)


def _engine_info(card: dict[str, Any], url: str) -> EngineInfo:
    """What /v1/models says about the model; picochat servers add their engine settings."""
    extra = card.get("picochat") or {}
    max_len = card.get("max_model_len") or (card.get("meta") or {}).get("n_ctx_train") or 0
    where = urlsplit(url).netloc or url
    return EngineInfo(
        model=str(card["id"]), dtype=extra.get("dtype", "unknown"), quant=extra.get("quant", "unknown"),
        device=f"{where} ({extra['device']})" if "device" in extra else where,
        attention=extra.get("attention", "unknown"), max_model_len=int(max_len),
        spec=extra.get("spec", "off"), max_num_seqs=int(extra.get("max_num_seqs", 1)),
        max_num_batched_tokens=int(extra.get("max_num_batched_tokens", 0)), remote=True,
        unsupported={area: "settings of a remote server cannot be changed from here"
                     for area in REMOTE_SETTINGS})


class RemoteEngine:
    def __init__(self, url: str, api_key: str | None = None, model: str | None = None):
        self.url = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=10.0)
        card = self._model_card(model)
        self._info = _engine_info(card, self.url)
        self._token_ids = card.get("owned_by") in ("picochat", "vllm")  # return_token_ids is understood
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._recent: deque[RequestTimings] = deque(maxlen=RECENT_REQUESTS)
        self._scraped: MetricsSnapshot | None = None
        self._can_tokenize = True  # until the server shows it has no vLLM-style /tokenize
        self._tasks: dict[str, asyncio.Task] = {}
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="picochat-remote", daemon=True)
        self._thread.start()
        self._client = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._scraper = asyncio.run_coroutine_threadsafe(self._scrape_forever(), self._loop)

    # ----------------------------------------------------------------------------- protocol
    @property
    def info(self) -> EngineInfo:
        return self._info

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
               arrival: float | None = None) -> Stream:
        if self._closed:
            raise EngineClosedError("the remote engine is closed")
        params.validate()
        request_id = request_id or f"remote-{next(self._ids)}"
        stream = Stream(request_id, self.cancel)
        path, body = request_body(self._info.model, prompt, params, self._token_ids)
        timings = RequestTimings(request_id, arrival=now() if arrival is None else arrival)
        self._loop.call_soon_threadsafe(self._start, stream, timings, path, body)
        return stream

    def cancel(self, request_id: str) -> None:
        if not self._closed:
            self._loop.call_soon_threadsafe(self._cancel, request_id)

    def metrics(self) -> MetricsSnapshot:
        with self._lock:
            scraped, recent = self._scraped, tuple(r.copy() for r in self._recent)
        quant = None if self._info.quant == "unknown" else self._info.quant
        return dataclasses.replace(scraped or MetricsSnapshot(time=now()), time=now(), quant=quant,
                                   recent_requests=recent)

    def reconfigure(self, **changes) -> None:
        raise ConfigError(f"cannot change {', '.join(sorted(changes)) or 'settings'} of the remote "
                          f"server {self.url}")

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """The server's count (vLLM's and picochat's /tokenize), else an estimate."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return len(prompt)
        count = self._server_count(prompt) if self._can_tokenize else None
        return estimate_tokens(prompt) if count is None else count

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._scraper.cancel()
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._http.close()

    # ------------------------------------------------------------------------------ helpers
    def _server_count(self, prompt: Prompt) -> int | None:
        key = "prompt" if isinstance(prompt, str) else "messages"
        try:
            response = self._http.post("/tokenize", json={"model": self._info.model, key: prompt}, timeout=2.0)
        except httpx.HTTPError:  # unreachable just now: estimate, and ask again next time
            return None
        if response.status_code in (404, 405):
            self._can_tokenize = False
        if response.status_code != 200:
            return None
        try:
            count = response.json().get("count")
        except (ValueError, AttributeError):
            count = None
        if not isinstance(count, int):
            self._can_tokenize = False  # it answers, but not as vLLM does
            return None
        return count

    def _model_card(self, model: str | None) -> dict[str, Any]:
        try:
            response = self._http.get("/v1/models")
        except httpx.HTTPError as e:
            raise ModelLoadError(f"cannot reach {self.url}: {e}") from None
        if response.status_code != 200:
            raise ModelLoadError(f"{self.url}/v1/models: {error_message(response)}")
        try:
            cards = [c for c in response.json()["data"] if isinstance(c, dict) and "id" in c]
        except (ValueError, KeyError, TypeError):
            raise ModelLoadError(f"{self.url}/v1/models did not answer an OpenAI model list") from None
        chosen = [c for c in cards if model is None or c["id"] == model]
        if not chosen:
            served = ", ".join(str(c["id"]) for c in cards) or "nothing"
            raise ModelLoadError(f"{self.url} does not serve {model!r} (it serves {served})")
        return chosen[0]

    # ------------------------------------------------------------------------ loop thread
    def _start(self, stream: Stream, timings: RequestTimings, path: str, body: dict) -> None:
        reader = StreamReader(timings, chat=path.endswith("chat/completions"))
        task = self._loop.create_task(self._run(stream, reader, path, body))
        self._tasks[stream.request_id] = task
        task.add_done_callback(lambda t: self._done(stream, reader, t))

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def _done(self, stream: Stream, reader: StreamReader, task: asyncio.Task) -> None:
        """Runs on the loop once the request's task ends, however it ended."""
        self._tasks.pop(stream.request_id, None)
        if task.cancelled():  # closing the connection made the server drop the request
            reader.timings.finished = now()
            reader.timings.output_tokens = reader.token_ids or reader.chunks
            reader.timings.finish_reason = "cancelled"
            final = Delta(stream.request_id, "", (), finish_reason="cancelled", timings=reader.timings.copy())
        elif task.exception() is not None:
            final = reader.final(now(), f"internal error: {task.exception()!r}")
        else:
            final = task.result()
        with self._lock:
            self._recent.append(final.timings)  # type: ignore[arg-type]
        stream._put(final)

    async def _run(self, stream: Stream, reader: StreamReader, path: str, body: dict) -> Delta:
        """Stream one request; returns its last delta (never raises, except when cancelled)."""
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return reader.final(now(), error_message(response))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    delta = reader.feed(json.loads(data), now())
                    if delta is not None:
                        stream._put(delta)
        except httpx.HTTPError as e:
            return reader.final(now(), f"{self.url}: {type(e).__name__}: {e}".rstrip(": "))
        except (ValueError, RemoteStreamError) as e:  # ValueError: a chunk that is not JSON
            return reader.final(now(), f"{self.url}: {e}")
        return reader.final(now())

    async def _scrape_forever(self) -> None:
        previous: MetricsSnapshot | None = None
        while True:
            try:
                response = await self._client.get("/metrics", timeout=5.0)
                snap = parse_exposition(response.text, now()) if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                snap = None
            if snap is not None:
                snap = with_counter_rates(snap, previous)
            previous = snap
            with self._lock:
                self._scraped = snap
            await asyncio.sleep(SCRAPE_INTERVAL_S)

    async def _shutdown(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()
