"""One request's state inside the engine: its tokens, progress, sampling state and stream."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from picochat.config import SamplingParams
from picochat.engine.protocol import RequestTimings, Stream


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    token_ids: list[int]  # prompt followed by the output so far
    num_prompt_tokens: int
    params: SamplingParams
    max_total_tokens: int  # prompt + output never exceeds this (max_tokens or the context)
    stream: Stream
    timings: RequestTimings
    stop_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    detokenizer: object | None = None  # IncrementalDetokenizer
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING
    spec_token_ids: list[int] = field(default_factory=list)  # draft proposals to verify this step
    held_text: str = ""  # decoded text held back while it may still become a stop string
    last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]
