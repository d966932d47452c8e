"""Proposers: per step, the draft tokens each decoding request should verify.

A proposer keeps per-request state (an n-gram index, an adaptive-k controller) keyed by request
id; the engine calls ``propose`` before scheduling, ``update`` after verification and ``drop``
when a request ends. ``draft_probs`` is None for the n-gram proposer (its drafts are certain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from picochat.config import EngineConfig, SpecConfig
from picochat.engine.request import Request
from picochat.engine.spec.adaptive import AdaptiveK
from picochat.engine.spec.draft import DraftModelProposer
from picochat.engine.spec.ngram import NgramIndex
from picochat.errors import ConfigError


@dataclass(frozen=True)
class ProposerTarget:
    """What a proposer needs to know of the target model it drafts for."""

    vocab_size: int
    dtype: torch.dtype
    device: torch.device


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

    def draft_probs(self, request_id: str) -> None:
        """The distribution the drafts were drawn from: none, n-gram drafts are certain."""
        return None

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)


def make_proposer(config: SpecConfig, target: ProposerTarget) -> NgramProposer | DraftModelProposer | None:
    if config.mode == "off":
        return None
    if config.mode == "ngram":
        return NgramProposer(config)
    if config.mode == "draft":
        # imported here: the engine imports this module
        from picochat.engine import engine

        dtype = next(name for name, value in engine.DTYPES.items() if value == target.dtype)
        draft = engine.load_model(EngineConfig(model=config.draft_model, dtype=dtype), target.device)
        vocab = draft.model.config.vocab_size
        if vocab != target.vocab_size:
            raise ConfigError(f"draft model {draft.name} has a vocabulary of {vocab} tokens; "
                              f"the target's has {target.vocab_size} (they must share a tokenizer)")
        return DraftModelProposer(config, draft, target)
    raise ValueError(f"no proposer for spec mode {config.mode!r}")
