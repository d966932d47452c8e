"""The draft-model proposer: a small model sharing the target's tokenizer drafts k tokens per step.

It owns the draft Transformer, its own paged KV pool and its own ``ModelRunner`` (the target's
pool is never touched). Per request it remembers how many of the request's tokens the draft cache
holds and which draft tokens follow them there. ``propose`` first reconciles that with the
request's tokens — drafts the target accepted stay cached, the rest are truncated. The rollback
lives there rather than in ``update`` (which only feeds AdaptiveK), so it also covers steps
``update`` never sees: a preempted request, a request the scheduler left out. Then it runs one
batched forward that catches every request's draft cache up to its last token (the whole
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
    request: Request
    controller: AdaptiveK
    generator: torch.Generator | None  # the draft's draws (never the request's own generator)
    num_cached: int = 0  # leading tokens of the request whose K/V the draft cache holds
    drafts: list[int] = field(default_factory=list)  # this step's proposal; all but the last are cached
    probs: list[Tensor] = field(default_factory=list)  # [V] each: the distributions the drafts were drawn from


@dataclass
class _Drafting:
    """A request drafting this step."""

    request: Request
    state: _DraftState
    k: int


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
        self.model = draft.model.to(target.device)
        self.model.select_kernels(dispatch.resolve_attention_backend("auto", target.device), target.device)
        self.max_positions = self.model.config.max_position_embeddings
        self.kv = KVCacheManager(num_kv_blocks, DRAFT_BLOCK_SIZE, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, self.kv, target.dtype, target.device)
        self._states: dict[str, _DraftState] = {}

    def propose(self, requests: list[Request]) -> None:
        """Set ``spec_token_ids`` on each request (empty where it should not speculate)."""
        batch = [drafting for drafting in map(self._prepare, requests) if drafting is not None]
        # catch up: from what the draft has cached (at least the last token, for its logits) to the end
        step = [_DraftSequence(d.request.request_id, d.request.token_ids,
                               min(d.state.num_cached, d.request.num_tokens - 1)) for d in batch]
        for d in batch:
            d.state.num_cached = d.request.num_tokens
        drafting = batch
        while drafting:
            self._draw(self._forward(step), drafting)
            drafting = [d for d in drafting if len(d.state.drafts) < d.k]
            # the newest draft in, the next one's logits out
            step = [_DraftSequence(d.request.request_id, d.request.token_ids + d.state.drafts,
                                   d.request.num_tokens + len(d.state.drafts) - 1) for d in drafting]
        for d in batch:
            d.request.spec_token_ids = list(d.state.drafts)

    def update(self, req: Request, proposed: int, accepted: int) -> None:
        state = self._states.get(req.request_id)
        if state is not None:
            state.controller.update(proposed, accepted)

    def draft_probs(self, request_id: str) -> Tensor:
        """[k, V] the distributions the request's current drafts were drawn from (k: the drafts it
        verifies, after the scheduler's trimming)."""
        state = self._states[request_id]
        k = len(state.request.spec_token_ids)
        assert 0 < k <= len(state.probs), (request_id, k, len(state.probs))
        return torch.stack(state.probs[:k])

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self.kv.free(request_id)

    # ------------------------------------------------------------------------------ helpers
    def _prepare(self, req: Request) -> _Drafting | None:
        """Reconcile the request's draft cache and choose its k; None: it does not speculate."""
        state = self._states.get(req.request_id)
        if state is None:
            seed = req.params.seed
            state = self._states[req.request_id] = _DraftState(
                req, AdaptiveK(self.config.k),
                sampling.make_generator(None if seed is None else seed + DRAFT_SEED_OFFSET))
        self._reconcile(req, state)
        req.spec_token_ids = []
        # accepted drafts plus the bonus token stay within the request's token limit, and the
        # k − 1 cached drafts within the draft's context
        k = min(state.controller.k, req.max_total_tokens - req.num_tokens - 1, self.max_positions - req.num_tokens + 1)
        if k > 0 and self.kv.allocate_slots(req.request_id, req.num_tokens + k - 1):
            return _Drafting(req, state, k)
        return None

    def _reconcile(self, req: Request, state: _DraftState) -> None:
        """Keep the cached drafts that became the request's tokens; truncate the rest."""
        cached = state.drafts[:-1]
        new = req.token_ids[state.num_cached:state.num_cached + len(cached)]
        kept = 0
        while kept < len(new) and new[kept] == cached[kept]:
            kept += 1
        state.num_cached += kept
        state.drafts, state.probs = [], []
        if req.request_id in self.kv.requests:
            self.kv.truncate(req.request_id, state.num_cached)

    def _forward(self, sequences: list[_DraftSequence]) -> Tensor:
        """One batched draft forward: logits [len(sequences), V] of each sequence's last token."""
        chunks = [ScheduledChunk(seq, seq.num_tokens - seq.num_computed_tokens)  # type: ignore[arg-type]
                  for seq in sequences]
        logits, _ = self.runner.execute(SchedulerOutput(chunks))
        return logits

    def _draw(self, logits: Tensor, batch: list[_Drafting]) -> None:
        """Append one draft token per request, drawn from q, and q [V] itself."""
        rows = [position_rows(SamplingRow(d.request.params, d.request.prompt_token_ids, d.request.output_token_ids,
                                          d.state.generator), d.state.drafts)[-1] for d in batch]
        q = sampling.probs(logits, rows)
        tokens = q.argmax(dim=-1)  # greedy rows: q is one-hot at the argmax
        sampled = [i for i, row in enumerate(rows) if not row.greedy]
        if sampled:
            index = torch.tensor(sampled, dtype=torch.int64, device=q.device)
            tokens[index] = sampling.sample_from_probs(q[index], [rows[i].generator for i in sampled])
        for d, token, q_row in zip(batch, tokens.tolist(), q):
            d.state.drafts.append(token)
            d.state.probs.append(q_row)
