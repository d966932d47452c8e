"""The continuous-batching scheduler: waiting and running queues, token and sequence budgets,
chunked prefill, prefix-cache admission and preemption by recompute.

Each step it decides how many tokens of each request to compute — a prefill chunk or one decode
token (plus draft tokens to verify) are the same idea: ``num_new_tokens``. Running requests go
first (FCFS); when the KV pool runs dry the most recently admitted running request is preempted:
its blocks are freed and it returns to the front of the waiting queue to be recomputed later,
losing nothing. The scheduler knows nothing about tensors, models or text.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from picochat.config import SchedulerConfig
from picochat.engine.kv_cache import KVCacheManager
from picochat.engine.protocol import now
from picochat.engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    num_new_tokens: int  # tokens computed for it this step

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the request's known tokens (a token is sampled)."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens >= r.num_tokens + len(r.spec_token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens, budget)
            if req.spec_token_ids and num_new < 1 + len(req.spec_token_ids):
                req.spec_token_ids = req.spec_token_ids[:max(num_new - 1, 0)]  # fit the token budget
            while not self.kv.allocate_slots(req.request_id, req.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            out.chunks.append(ScheduledChunk(req, num_new))
            budget -= num_new
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            computed_blocks, num_cached = self.kv.get_computed_blocks(req.token_ids)
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req.request_id, num_cached + num_new, computed_blocks):
                break
            self.waiting.popleft()
            first_admission = req.timings.scheduled is None
            if first_admission:
                req.timings.scheduled = now()
                req.timings.cached_tokens = num_cached
                self.kv.stats.queries += req.num_tokens
                self.kv.stats.hits += num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, num_new))
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.timings.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a request wherever it is and free its blocks at once."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        self.kv.free(req.request_id)
