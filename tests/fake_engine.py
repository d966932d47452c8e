"""A deterministic Engine for UI and server tests: streams a scripted reply word by word on its
own thread, with fixed metrics. It implements the same protocol as LocalEngine, nothing more."""

from __future__ import annotations

import itertools
import threading
import time

from picochat.config import SamplingParams
from picochat.engine.protocol import (ChatMessage, Delta, DeviceStats, EngineInfo, MetricsSnapshot,
                                      Prompt, RequestTimings, Stream)
from picochat.errors import ConfigError, PromptTooLongError

DEFAULT_REPLY = "Hello! Here is some **Markdown**:\n\n```python\nprint('hi')\n```\n\nDone."


class FakeEngine:
    def __init__(self, reply: str = DEFAULT_REPLY, token_delay_s: float = 0.005,
                 max_model_len: int = 2048, first_token_gate: threading.Event | None = None):
        """``first_token_gate``: requests hold their first token until it is set (a long prefill)."""
        self.reply = reply
        self.first_token_gate = first_token_gate
        self.token_delay_s = token_delay_s
        self.max_model_len = max_model_len
        self.submitted: list[tuple[Prompt, SamplingParams]] = []
        self.arrivals: list[float | None] = []  # the ``arrival`` each submit was given
        self.reconfigured: list[dict] = []
        self._ids = itertools.count()
        self._cancelled: set[str] = set()
        self._running = 0
        self._finished: list[RequestTimings] = []
        self._lock = threading.Lock()
        self._info = EngineInfo(model="fake-model", dtype="float32", quant="none", device="cpu",
                                attention="sdpa", max_model_len=max_model_len, max_num_seqs=4,
                                max_num_batched_tokens=256,
                                unsupported={"spec": "speculative decoding is not available in the fake engine"})

    @property
    def info(self) -> EngineInfo:
        return self._info

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        if isinstance(prompt, str):
            return len(prompt.split())
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        return sum(len(m["content"].split()) + 4 for m in prompt)  # type: ignore[index]

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
               arrival: float | None = None) -> Stream:
        params.validate()
        n = self.count_prompt_tokens(prompt)
        if n + 1 > self.max_model_len:
            raise PromptTooLongError(f"prompt is {n} tokens; the context holds {self.max_model_len}")
        request_id = request_id or f"fake-{next(self._ids)}"
        self.submitted.append((prompt, params))
        self.arrivals.append(arrival)
        stream = Stream(request_id, self.cancel)
        threading.Thread(target=self._generate, args=(stream, n, params), daemon=True).start()
        return stream

    def _generate(self, stream: Stream, prompt_tokens: int, params: SamplingParams) -> None:
        t = RequestTimings(stream.request_id, arrival=time.perf_counter(), prompt_tokens=prompt_tokens)
        t.scheduled = time.perf_counter()
        with self._lock:
            self._running += 1
        if self.first_token_gate is not None:
            self.first_token_gate.wait()
        words = self.reply.split(" ")[: params.max_tokens]
        reason = "stop" if len(self.reply.split(" ")) <= params.max_tokens else "length"
        for i, word in enumerate(words):
            time.sleep(self.token_delay_s)
            if stream.request_id in self._cancelled:
                reason = "cancelled"
                break
            now = time.perf_counter()
            if t.first_token is None:
                t.first_token = now
            t.output_tokens += 1
            text = word if i == 0 else " " + word
            stream._put(Delta(stream.request_id, text, (i,)))
        t.finished = time.perf_counter()
        t.finish_reason = reason  # type: ignore[assignment]
        with self._lock:
            self._running -= 1
            self._finished.append(t)
        stream._put(Delta(stream.request_id, "", (), finish_reason=reason, timings=t.copy()))  # type: ignore[arg-type]

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)

    def metrics(self) -> MetricsSnapshot:
        with self._lock:
            running, recent = self._running, tuple(self._finished[-16:])
        return MetricsSnapshot(
            time=time.perf_counter(), num_requests_running=running, num_requests_waiting=0,
            num_preemptions_total=0, kv_cache_usage_perc=0.25, kv_blocks_used=16, kv_blocks_total=64,
            prefix_cache_queries_total=100, prefix_cache_hits_total=40, prompt_tokens_total=100,
            generation_tokens_total=50, requests_finished_total=len(recent), prefill_tok_s=1000.0,
            decode_tok_s=100.0, tokens_per_step=1.0, weight_bytes=100_000_000, quant="none",
            memory=(DeviceStats("CPU (RAM)", "cpu", 8 << 30, 24 << 30, 50.0, 1 << 30),),
            recent_requests=recent)

    def reconfigure(self, **changes) -> None:
        if "spec" in changes:
            raise ConfigError(self._info.unsupported["spec"])
        self.reconfigured.append(changes)

    def close(self) -> None:
        pass


def chat(text: str) -> list[ChatMessage]:
    return [{"role": "user", "content": text}]
