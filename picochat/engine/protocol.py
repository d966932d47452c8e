"""The Engine protocol: the one interface the TUI, the CLI, the server and the remote client share.

An engine takes a prompt (chat messages, raw text or token ids) with :class:`SamplingParams` and
returns a :class:`Stream` of :class:`Delta` objects. ``metrics()`` returns a
:class:`MetricsSnapshot` with vLLM's metric definitions; a field that an engine cannot measure is
``None`` (shown as "unavailable", never as 0). ``reconfigure()`` changes engine-level settings
between steps. This module knows nothing about torch, models or HTTP.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Union

from picochat.config import SamplingParams

ChatMessage = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}
Prompt = Union[str, list[ChatMessage], list[int]]  # raw text | chat messages | token ids
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class RequestTimings:
    """Per-request timestamps (``time.perf_counter`` seconds) and token counts.

    vLLM's definitions: queue = first scheduled − arrival; prefill = first token − first
    scheduled; decode = finished − first token; TTFT = first token − arrival.
    """

    request_id: str
    arrival: float
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0
    preemptions: int = 0
    itl: list[float] = field(default_factory=list)  # gaps between successive output tokens
    finish_reason: FinishReason | None = None
    spec_steps: int = 0  # verification steps that carried drafts
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def spec_mean_accept_len(self) -> float | None:
        """Tokens produced per verification step: 1 + accepted / steps (vLLM's definition)."""
        return 1.0 + self.accepted_tokens / self.spec_steps if self.spec_steps else None

    @property
    def queue_s(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def prefill_s(self) -> float | None:
        if self.first_token is None or self.scheduled is None:
            return None
        return self.first_token - self.scheduled

    @property
    def decode_s(self) -> float | None:
        if self.finished is None or self.first_token is None:
            return None
        return self.finished - self.first_token

    @property
    def prefill_tok_s(self) -> float | None:
        s = self.prefill_s
        computed = self.prompt_tokens - self.cached_tokens
        return computed / s if s and computed > 0 else None

    @property
    def decode_tok_s(self) -> float | None:
        s = self.decode_s
        return (self.output_tokens - 1) / s if s and self.output_tokens > 1 else None

    def copy(self) -> "RequestTimings":
        return RequestTimings(**{**self.__dict__, "itl": list(self.itl)})


@dataclass(frozen=True)
class Delta:
    """New output of one request since the previous delta."""

    request_id: str
    text: str  # newly decoded text (never a broken UTF-8 sequence)
    token_ids: tuple[int, ...]  # newly generated token ids
    finish_reason: FinishReason | None = None  # set on the last delta only
    timings: RequestTimings | None = None  # a snapshot, on the last delta
    error: str | None = None  # one-line message when finish_reason == "error"
    accepted_draft: tuple[bool, ...] = ()  # per token id: produced by an accepted draft proposal

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A whole stream collected (``Stream.result()``)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    timings: RequestTimings | None
    error: str | None = None
    accepted_draft_tokens: int = 0


class Stream:
    """The deltas of one request, readable from a thread (``for d in stream``) or from asyncio
    (``async for d in stream``). The engine thread calls ``_put``; readers never block it."""

    def __init__(self, request_id: str, canceller: Callable[[str], None] | None = None):
        self.request_id = request_id
        self._queue: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        self._canceller = canceller
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._lock = threading.Lock()
        self._done = False
        self._sink: Callable[[Delta], object] | None = None

    # -- engine side
    def _put(self, delta: Delta) -> None:
        with self._lock:
            if self._sink is not None:
                self._sink(delta)
                return
            self._queue.put(delta)
            loop, event = self._loop, self._event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the reader's loop is closed: nobody is listening
                pass

    def redirect(self, sink: Callable[[Delta], object]) -> None:
        """Hand every delta to ``sink`` instead of queueing it, those already queued first: for a
        reader in another process (:mod:`picochat.engine.process`). ``sink`` must not block."""
        with self._lock:
            while True:
                try:
                    sink(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._sink = sink

    # -- reader side
    def cancel(self) -> None:
        if self._canceller is not None:
            self._canceller(self.request_id)

    def __iter__(self):
        while not self._done:
            delta = self._queue.get()
            self._done = delta.finished
            yield delta

    def get(self, timeout: float | None = None) -> Delta | None:
        """Next delta, or None after ``timeout`` seconds."""
        try:
            delta = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        self._done = self._done or delta.finished
        return delta

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()
        while not self._done:
            self._event.clear()
            try:
                delta = self._queue.get_nowait()
            except queue.Empty:
                await self._event.wait()
                continue
            self._done = delta.finished
            yield delta

    def result(self) -> Completion:
        texts: list[str] = []
        ids: list[int] = []
        accepted = 0
        last: Delta | None = None
        for delta in self:
            texts.append(delta.text)
            ids.extend(delta.token_ids)
            accepted += sum(delta.accepted_draft)
            last = delta
        assert last is not None and last.finish_reason is not None
        return Completion(self.request_id, "".join(texts), ids, last.finish_reason, last.timings,
                          last.error, accepted)


@dataclass(frozen=True)
class DeviceStats:
    """Memory and utilisation of one device: a GPU from NVML, or the host (RAM, CPU %)."""

    name: str  # "NVIDIA H100 80GB" or "CPU (RAM)"
    kind: Literal["gpu", "cpu"]
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_pct: float | None  # GPU util, or this process's CPU %
    process_rss_bytes: int | None = None  # host only


@dataclass(frozen=True)
class MetricsSnapshot:
    """Engine metrics at one instant. Counters are totals since start; None = unavailable."""

    time: float  # perf_counter at the snapshot
    num_requests_running: int | None = None
    num_requests_waiting: int | None = None
    num_preemptions_total: int | None = None
    kv_cache_usage_perc: float | None = None  # 0..1 fraction of KV blocks in use
    kv_blocks_used: int | None = None
    kv_blocks_total: int | None = None
    prefix_cache_queries_total: int | None = None  # prompt tokens looked up
    prefix_cache_hits_total: int | None = None  # prompt tokens found
    prompt_tokens_total: int | None = None
    generation_tokens_total: int | None = None
    requests_finished_total: int | None = None
    prefill_tok_s: float | None = None  # recent prefill throughput (all requests)
    decode_tok_s: float | None = None  # recent decode throughput (all requests)
    tokens_per_step: float | None = None  # tokens in the last step
    spec_decode_num_drafts_total: int | None = None
    spec_decode_num_draft_tokens_total: int | None = None
    spec_decode_num_accepted_tokens_total: int | None = None
    spec_decode_accepted_per_pos: tuple[int, ...] | None = None
    weight_bytes: int | None = None
    quant: str | None = None
    activity: str | None = None  # a background change in progress ("preparing int4 weights 40%")
    memory: tuple[DeviceStats, ...] = ()
    recent_requests: tuple[RequestTimings, ...] = ()  # last finished requests, oldest first

    @property
    def spec_acceptance_rate(self) -> float | None:
        drafted, accepted = self.spec_decode_num_draft_tokens_total, self.spec_decode_num_accepted_tokens_total
        if not drafted or accepted is None:
            return None
        return accepted / drafted

    @property
    def spec_mean_accept_len(self) -> float | None:
        """Tokens produced per verification step: 1 + accepted / drafts (vLLM's definition)."""
        drafts, accepted = self.spec_decode_num_drafts_total, self.spec_decode_num_accepted_tokens_total
        if not drafts or accepted is None:
            return None
        return 1.0 + accepted / drafts


@dataclass(frozen=True)
class EngineInfo:
    """What a status bar shows, and which settings this engine can change."""

    model: str
    dtype: str
    quant: str
    device: str
    attention: str
    max_model_len: int
    spec: str = "off"
    max_num_seqs: int = 1
    max_num_batched_tokens: int = 0
    remote: bool = False
    # setting area ("quant", "spec", "batch", "attention", "model") → why it cannot be changed
    unsupported: dict[str, str] = field(default_factory=dict)


class Engine(Protocol):
    """Implemented by LocalEngine (in process), EngineProcess (a LocalEngine in a child process)
    and RemoteEngine (HTTP)."""

    @property
    def info(self) -> EngineInfo: ...

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
               arrival: float | None = None) -> Stream:
        """Queue a request; raises PicochatError (one line) for a prompt that can never run.
        ``arrival`` (``now()`` seconds, default: this call) is when the request came in: a server
        passes the moment its HTTP request arrived, so TTFT includes its parsing and tokenization."""

    def cancel(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason 'cancelled'. Unknown ids are ignored."""

    def metrics(self) -> MetricsSnapshot: ...

    def reconfigure(self, **changes) -> None:
        """Change engine settings (quant=, spec=, scheduler=, attention=, model=) for the next
        steps. Raises ConfigError for an invalid or unsupported change."""

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """Tokens the prompt takes once rendered (chat template applied), for context display."""

    def close(self) -> None: ...


def now() -> float:
    return time.perf_counter()


# A local engine's thread gives up the GIL at every torch op and must win it back from the other
# threads of its process (the server's event loop, a console engine process's forwarding thread);
# each win can wait out Python's switch interval (5 ms by default), which delays tokens on their
# way out and the engine alike. Measured when the console's UI shared the engine's process
# (benchmarks/console.py, bf16): 0.72 of headless decode at 0.5 ms, 0.81 at 0.1 ms; the console
# now runs the engine in a process of its own (picochat.engine.process).
GIL_SWITCH_INTERVAL_S = 0.0001


def share_gil_promptly() -> None:
    """Shorten the GIL switch interval for a process whose engine thread shares it with readers."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
