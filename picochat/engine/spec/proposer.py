"""Proposers: per step, the draft tokens each decoding request should verify.

A proposer keeps per-request state (an n-gram index, an adaptive-k controller) keyed by request
id; the engine calls ``propose`` before scheduling, ``update`` after verification and ``drop``
when a request ends. ``draft_probs`` is None for the n-gram proposer (its drafts are certain).
"""

from __future__ import annotations

from dataclasses import dataclass

from picochat.config import SpecConfig
from picochat.engine.request import Request
from picochat.engine.spec.adaptive import AdaptiveK
from picochat.engine.spec.ngram import NgramIndex


@dataclass
class _NgramState:
    index: NgramIndex
    controller: AdaptiveK


class NgramProposer:
    """Prompt lookup: propose what followed the latest earlier occurrence of the last n tokens."""

    def __init__(self, config: SpecConfig):
        self.config = config
        self._states: dict[str, _NgramState] = {}

    def propose(self, requests: list[Request]) -> None:
        """Set ``spec_token_ids`` on each request (empty where it should not speculate)."""
        for req in requests:
            state = self._states.get(req.request_id)
            if state is None:
                state = self._states[req.request_id] = _NgramState(
                    NgramIndex(self.config.ngram_n, self.config.k), AdaptiveK(self.config.k))
            # accepted drafts plus the bonus token must stay within the request's token limit
            k = min(state.controller.k, req.max_total_tokens - req.num_tokens - 1)
            req.spec_token_ids = state.index.propose(req.token_ids)[:k] if k > 0 else []

    def update(self, req: Request, proposed: int, accepted: int) -> None:
        state = self._states.get(req.request_id)
        if state is not None:
            state.controller.update(proposed, accepted)

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)


def make_proposer(config: SpecConfig) -> NgramProposer | None:
    if config.mode == "off":
        return None
    if config.mode == "ngram":
        return NgramProposer(config)
    raise ValueError(f"no proposer for spec mode {config.mode!r}")
