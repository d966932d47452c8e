"""The draft-model proposer: a small model sharing the target's tokenizer drafts k tokens per step.

It owns the draft Transformer, its own paged KV pool and its own ``ModelRunner`` (the target's
pool is never touched). Per request it remembers how many of the request's tokens the draft cache
holds and which draft tokens follow them there. ``propose`` first reconciles that with the
request's tokens — drafts the target accepted stay cached, the rest are truncated (this also
covers steps ``update`` never saw: a preempted request, drafts the scheduler trimmed) — then runs
one batched forward that catches every request's draft cache up to its last token (the whole
prompt on first sight, usually 1–2 tokens later) and k − 1 batched single-token forwards.

Each draft token is drawn from ``sampling.probs`` on the draft's logits with the request's
SamplingParams and the row ``position_rows`` gives its position (penalties see the earlier
drafts), exactly as the verifier builds the target's rows; greedy rows take the argmax. The
distribution it was drawn from (q, ``draft_probs``) goes to the rejection sampler, which makes the
output follow the target's distribution whatever q is, provided each draft is drawn from q
independently of the verifier's uniforms. So the draft draws from its own generator: seeded from
the request's seed (a seeded request stays reproducible, and the target's generator is consumed
exactly as in n-gram speculation), the global RNG for an unseeded one.

k adapts per request (``AdaptiveK``) and is capped by the request's token limit and the draft's
context. A request whose draft blocks do not fit the pool simply does not speculate this step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from picochat.config import SpecConfig
from picochat.engine import sampling
from picochat.engine.kv_cache import KVCacheManager
from picochat.engine.request import Request
from picochat.engine.runner import ModelRunner
from picochat.engine.sampling import SamplingRow
from picochat.engine.scheduler import ScheduledChunk, SchedulerOutput
from picochat.engine.spec.adaptive import AdaptiveK
from picochat.engine.spec.rejection import position_rows
from picochat.kernels import dispatch

if TYPE_CHECKING:
    from picochat.engine.engine import LoadedModel
    from picochat.engine.spec.proposer import ProposerTarget

DRAFT_BLOCK_SIZE = 16
DRAFT_KV_TOKENS = 8192  # the draft pool: a few long chats, or many short ones, at once
DRAFT_SEED_OFFSET = 0x5EED  # a seeded request's draft generator: seed + this


@dataclass
class _DraftState:
    controller: AdaptiveK
    generator: torch.Generator | None  # the draft's draws (never the request's own generator)
    num_cached: int = 0  # leading tokens of the request whose K/V the draft cache holds
    drafts: list[int] = field(default_factory=list)  # this step's proposal; all but the last are cached
    probs: Tensor | None = None  # [len(drafts), V]: the distributions the drafts were drawn from
    request: Request | None = None


@dataclass
class _DraftSequence:
    """What ``ModelRunner.execute`` reads of a request: compute token_ids[num_computed_tokens:]
    into the draft cache and return the logits of the last one."""

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    spec_token_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftModelProposer:
    def __init__(self, config: SpecConfig, draft: LoadedModel, target: ProposerTarget,
                 num_kv_blocks: int = DRAFT_KV_TOKENS // DRAFT_BLOCK_SIZE):
        self.config = config
        self.model = draft.model
        self.model.select_kernels(dispatch.resolve_attention_backend("auto", target.device), target.device)
        self.max_positions = self.model.config.max_position_embeddings
        self.kv = KVCacheManager(num_kv_blocks, DRAFT_BLOCK_SIZE, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, self.kv, target.dtype, target.device)
        self._states: dict[str, _DraftState] = {}

    def propose(self, requests: list[Request]) -> None:
        """Set ``spec_token_ids`` on each request (empty where it should not speculate)."""
        batch: list[tuple[Request, _DraftState, int]] = []
        for req in requests:
            state = self._state(req)
            self._reconcile(req, state)
            # accepted drafts plus the bonus token stay within the request's token limit, and the
            # k − 1 cached drafts within the draft's context
            k = min(state.controller.k, req.max_total_tokens - req.num_tokens - 1,
                    self.max_positions - req.num_tokens + 1)
            req.spec_token_ids = []
            if k > 0 and self.kv.allocate_slots(req.request_id, req.num_tokens + k - 1):
                batch.append((req, state, k))
        if not batch:
            return
        # catch up: from what the draft has cached (at least the last token, for its logits) to the end
        logits = self._forward([_DraftSequence(req.request_id, req.token_ids, min(state.num_cached, req.num_tokens - 1))
                                for req, state, _ in batch])
        for req, state, _ in batch:
            state.num_cached = req.num_tokens
        probs: list[list[Tensor]] = [[] for _ in batch]
        drafting = list(range(len(batch)))
        for j in range(max(k for _, _, k in batch)):
            if j > 0:  # the previous draft in, the next one's logits out
                logits = self._forward([_DraftSequence(batch[i][0].request_id, batch[i][0].token_ids + batch[i][1].drafts,
                                                       batch[i][0].num_tokens + j - 1) for i in drafting])
            q = self._draw(logits, [batch[i] for i in drafting])
            for i, q_row in zip(drafting, q):
                probs[i].append(q_row)
            drafting = [i for i in drafting if batch[i][2] > j + 1]
            if not drafting:
                break
        for (req, state, _), probs_r in zip(batch, probs):
            req.spec_token_ids = list(state.drafts)
            state.probs = torch.stack(probs_r)

    def update(self, req: Request, proposed: int, accepted: int) -> None:
        state = self._states.get(req.request_id)
        if state is not None:
            state.controller.update(proposed, accepted)

    def draft_probs(self, request_id: str) -> Tensor:
        """[k, V] the distributions the request's current drafts were drawn from (k: the drafts it
        verifies, after the scheduler's trimming)."""
        state = self._states[request_id]
        assert state.probs is not None and state.request is not None, request_id
        return state.probs[:len(state.request.spec_token_ids)]

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self.kv.free(request_id)

    # ------------------------------------------------------------------------------ helpers
    def _state(self, req: Request) -> _DraftState:
        state = self._states.get(req.request_id)
        if state is None:
            seed = req.params.seed
            state = self._states[req.request_id] = _DraftState(
                AdaptiveK(self.config.k), sampling.make_generator(None if seed is None else seed + DRAFT_SEED_OFFSET),
                request=req)
        return state

    def _reconcile(self, req: Request, state: _DraftState) -> None:
        """Keep the cached drafts that became the request's tokens; truncate the rest."""
        cached = state.drafts[:-1]
        new = req.token_ids[state.num_cached:state.num_cached + len(cached)]
        kept = 0
        while kept < len(new) and new[kept] == cached[kept]:
            kept += 1
        state.num_cached += kept
        state.drafts, state.probs = [], None
        if req.request_id in self.kv.requests:
            self.kv.truncate(req.request_id, state.num_cached)

    def _forward(self, sequences: list[_DraftSequence]) -> Tensor:
        chunks = [ScheduledChunk(seq, seq.num_tokens - seq.num_computed_tokens) for seq in sequences]  # type: ignore[arg-type]
        logits, _ = self.runner.execute(SchedulerOutput(chunks))
        return logits

    def _draw(self, logits: Tensor, batch: list[tuple[Request, _DraftState, int]]) -> Tensor:
        """Append one draft token per request, drawn from q; returns q [B, V]."""
        rows = [position_rows(SamplingRow(req.params, req.prompt_token_ids, req.output_token_ids, state.generator),
                              state.drafts)[-1] for req, state, _ in batch]
        q = sampling.probs(logits, rows)
        tokens = q.argmax(dim=-1)  # greedy rows: q is one-hot at the argmax
        sampled = [i for i, row in enumerate(rows) if not row.greedy]
        if sampled:
            index = torch.tensor(sampled, dtype=torch.int64, device=q.device)
            tokens[index] = sampling.sample_from_probs(q[index], [rows[i].generator for i in sampled])
        for (_, state, _), token in zip(batch, tokens.tolist()):
            state.drafts.append(token)
        return q
