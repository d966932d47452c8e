"""Draft-model speculation: the DraftModelProposer on tiny random models with the real default
tokenizer. Greedy output is unchanged token for token (draft == target, or a perturbed draft that
is right only part of the time); the draft cache rolls back to exactly what a fresh draft would
compute; the draft's pool empties when requests end; sampled output follows the target's
distribution (chi-square on a vocabulary-8 model)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections import Counter

import pytest
import torch

from tiny_models import wait_idle

from picochat.config import EngineConfig, SamplingParams, SchedulerConfig, SpecConfig
from picochat.engine import engine as engine_module
from picochat.engine import sampling
from picochat.engine.engine import LoadedModel, LocalEngine
from picochat.engine.kv_cache import KVCacheManager
from picochat.engine.request import Request
from picochat.engine.runner import ModelRunner
from picochat.engine.scheduler import ScheduledChunk, SchedulerOutput
from picochat.engine.spec.draft import DraftModelProposer
from picochat.engine.spec.proposer import ProposerTarget, make_proposer
from picochat.errors import ConfigError
from picochat.model.config import ModelConfig
from picochat.model.tokenizer import Tokenizer
from picochat.model.transformer import Transformer

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
CPU = torch.device("cpu")


def perturbed(loaded: LoadedModel, noise: float) -> LoadedModel:
    """A copy with noise added to every weight: a draft that agrees with ``loaded`` part of the time."""
    model = copy.deepcopy(loaded.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.device) * noise)
    return LoadedModel("tiny-draft", model, loaded.tokenizer)


@pytest.fixture(scope="module")
def looping(looping_loaded) -> LoadedModel:
    return looping_loaded


@pytest.fixture(scope="module")
def varied(tiny_loaded) -> LoadedModel:
    return tiny_loaded


def spec_engine(monkeypatch, target: LoadedModel, draft: LoadedModel, k: int, **sched) -> LocalEngine:
    """An engine in spec mode 'draft' whose draft model "tiny-draft" loads as ``draft``."""
    def load_model(config: EngineConfig, device: torch.device, progress=None) -> LoadedModel:
        assert config.model == "tiny-draft" and config.dtype == "float32", config
        return draft

    monkeypatch.setattr(engine_module, "load_model", load_model)
    return LocalEngine(EngineConfig(model="tiny", scheduler=SchedulerConfig(**sched),
                                    spec=SpecConfig(mode="draft", k=k, draft_model="tiny-draft")), loaded=target)


def prompts() -> list[list[dict]]:
    topics = ["the sea", "a very long and winding road through the mountains of the north", "cats",
              "why the sky is blue, explained to a child who asks many questions", "bread", "trains"]
    return [[{"role": "user", "content": f"Tell me about {t}."}] for t in topics]


@pytest.fixture(scope="module")
def expected(looping) -> list[list[int]]:
    """The looping model's greedy outputs without speculation."""
    engine = LocalEngine(EngineConfig(model="tiny", scheduler=SchedulerConfig(max_num_seqs=4)), loaded=looping)
    try:
        return [s.result().token_ids for s in [engine.submit(p, GREEDY) for p in prompts()]]
    finally:
        engine.close()



def assert_pools_empty(engine: LocalEngine) -> None:
    wait_idle(engine)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    draft_kv = engine.proposer.kv
    assert draft_kv.num_free_blocks == draft_kv.num_blocks and not draft_kv.requests


# ------------------------------------------------------------------------------ greedy, in the engine

@pytest.mark.parametrize("k", [1, 3, 5])
def test_self_draft_keeps_greedy_output_and_accepts_nearly_everything(monkeypatch, looping, expected, k):
    # batched, with rows that speculate and rows still in (chunked) prefill in the same steps
    engine = spec_engine(monkeypatch, looping, looping, k, max_num_seqs=4, max_num_batched_tokens=20)
    try:
        assert isinstance(engine.proposer, DraftModelProposer)
        results = [s.result() for s in [engine.submit(p, GREEDY) for p in prompts()]]
        assert [r.token_ids for r in results] == expected
        m = engine.metrics()
        # nearly every step after the first token speculated k drafts, giving k + 1 tokens
        assert m.spec_decode_num_draft_tokens_total >= 0.8 * len(prompts()) * (GREEDY.max_tokens - 1) * k / (k + 1)
        assert m.spec_decode_num_accepted_tokens_total >= 0.95 * m.spec_decode_num_draft_tokens_total
        assert sum(r.accepted_draft_tokens for r in results) == m.spec_decode_num_accepted_tokens_total
        assert_pools_empty(engine)
    finally:
        engine.close()


def test_different_draft_keeps_greedy_output_through_preemption(monkeypatch, looping, expected):
    draft = perturbed(looping, 0.02)
    # 14 target blocks of 16 tokens cannot hold six ~90-token requests at once: preemption is forced
    engine = spec_engine(monkeypatch, looping, draft, 3, max_num_seqs=6, max_num_batched_tokens=24,
                         num_kv_blocks=14)
    try:
        results = [s.result() for s in [engine.submit(p, GREEDY) for p in prompts()]]
        assert [r.token_ids for r in results] == expected
        m = engine.metrics()
        assert m.num_preemptions_total > 0
        # the draft was partly right: both the accept and the rollback paths ran
        assert 0.1 * m.spec_decode_num_draft_tokens_total < m.spec_decode_num_accepted_tokens_total
        assert m.spec_decode_num_accepted_tokens_total < 0.9 * m.spec_decode_num_draft_tokens_total
        assert_pools_empty(engine)
    finally:
        engine.close()


def test_cancel_leaves_the_draft_pool_empty(monkeypatch, looping):
    engine = spec_engine(monkeypatch, looping, looping, 4, max_num_seqs=4, max_num_batched_tokens=16)
    try:
        long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        streams = [engine.submit(p, long) for p in prompts()]
        for _ in range(3):
            assert streams[1].get(timeout=60) is not None  # decoding, with drafts, now
        assert engine.proposer.kv.num_free_blocks < engine.proposer.kv.num_blocks
        for s in streams:
            s.cancel()
        reasons = [s.result().finish_reason for s in streams]
        assert all(r in ("cancelled", "length") for r in reasons) and "cancelled" in reasons
        assert_pools_empty(engine)
    finally:
        engine.close()


def test_draft_with_another_vocabulary_is_a_config_error(monkeypatch, tokenizer):
    small = small_model(tokenizer, seed=0)
    monkeypatch.setattr(engine_module, "load_model", lambda config, device, progress=None: small)
    spec = SpecConfig(mode="draft", draft_model="tiny-draft")
    with pytest.raises(ConfigError, match="vocabulary of 8 tokens; the target's has 49152"):
        make_proposer(spec, ProposerTarget(49152, torch.float32, CPU))


# ------------------------------------------------------------------------------ the proposer itself

def request(request_id: str, token_ids: list[int], params: SamplingParams = GREEDY, num_prompt: int | None = None,
            max_total: int = 500) -> Request:
    return Request(request_id=request_id, token_ids=list(token_ids), num_prompt_tokens=num_prompt or len(token_ids),
                   params=params, max_total_tokens=max_total, stream=None, timings=None,  # type: ignore[arg-type]
                   stop_token_ids=frozenset())


def proposer(draft: LoadedModel, k: int, num_kv_blocks: int = 64) -> DraftModelProposer:
    return DraftModelProposer(SpecConfig(mode="draft", k=k, draft_model="tiny-draft"), draft,
                              ProposerTarget(draft.model.config.vocab_size, torch.float32, CPU), num_kv_blocks)


def test_rolled_back_cache_drafts_like_a_fresh_one(varied):
    """After partial acceptance, a rejected first draft and a step that was never verified, the
    cached draft proposes from exactly the distributions a draft computing everything afresh gets."""
    prompt = list(range(1000, 1037))
    params = SamplingParams(temperature=1.0, repetition_penalty=1.3, max_tokens=100)  # unseeded: global RNG
    kept = proposer(varied, 4)
    req = request("a", prompt, params)
    for step in range(6):
        torch.manual_seed(step)
        kept.propose([req])
        drafts = list(req.spec_token_ids)
        assert drafts
        fresh = proposer(varied, len(drafts))
        twin = request("a", req.token_ids, params, num_prompt=len(prompt))
        torch.manual_seed(step)
        fresh.propose([twin])
        assert twin.spec_token_ids == drafts
        torch.testing.assert_close(kept.draft_probs("a"), fresh.draft_probs("a"))
        if step == 3:
            continue  # not verified this step (say, preempted): the same tokens are proposed for again
        accepted = step % (len(drafts) + 1)  # then a token the draft did not propose
        req.token_ids += drafts[:accepted] + [7 + step]
        kept.update(req, len(drafts), accepted)
    kept.drop("a")
    assert kept.kv.num_free_blocks == kept.kv.num_blocks and not kept.kv.requests


def test_full_draft_pool_skips_speculation_until_blocks_free(varied):
    p = proposer(varied, 3, num_kv_blocks=5)  # 80 tokens
    a, b = request("a", list(range(1000, 1040))), request("b", list(range(2000, 2040)))
    p.propose([a, b])  # a takes 3 blocks for 40 + 2 tokens; b would need 3 of the 2 left
    assert len(a.spec_token_ids) == 3 and b.spec_token_ids == []
    p.drop("a")
    p.propose([b])
    assert len(b.spec_token_ids) == 3
    p.drop("b")
    assert p.kv.num_free_blocks == p.kv.num_blocks


def test_k_is_capped_by_the_request_token_limit(varied):
    p = proposer(varied, 5)
    req = request("a", list(range(1000, 1010)), max_total=13)
    p.propose([req])
    assert len(req.spec_token_ids) == 2  # two drafts plus the bonus token reach the limit of 13
    assert p.draft_probs("a").shape == (2, 49152)
    req.spec_token_ids = req.spec_token_ids[:1]  # the scheduler trimmed the proposal to its budget
    assert p.draft_probs("a").shape == (1, 49152)


# ------------------------------------------------------------------------------ sampled distribution

SMALL_VOCAB = 8
NUM_SAMPLES = 2000
NEW_TOKENS = 4
PROMPT = [1, 5, 3]


def small_model(tokenizer: Tokenizer, seed: int) -> LoadedModel:
    """One layer, the first SMALL_VOCAB token ids; different seeds give clearly different distributions."""
    cfg = ModelConfig(architecture="llama", vocab_size=SMALL_VOCAB, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.6)
    return LoadedModel("small", model.eval(), tokenizer)


def next_token_probs(loaded: LoadedModel, params: SamplingParams) -> list[torch.Tensor]:
    """Non-speculative sampling's distributions: entry n, of shape [V] * (n + 1), holds
    P(token n + 1 | tokens 1..n) for every n-token output."""
    histories = [list(h) for n in range(NEW_TOKENS) for h in itertools.product(range(SMALL_VOCAB), repeat=n)]
    kv = KVCacheManager(len(histories), 16, enable_prefix_caching=False)
    runner = ModelRunner(loaded.model, kv, torch.float32, CPU)
    chunks = []
    for i, h in enumerate(histories):
        kv.allocate_slots(str(i), len(PROMPT) + len(h))
        chunks.append(ScheduledChunk(request(str(i), PROMPT + h, num_prompt=len(PROMPT)), len(PROMPT) + len(h)))
    logits, _ = runner.execute(SchedulerOutput(chunks))
    probs = sampling.probs(logits, [sampling.SamplingRow(params, PROMPT, h, None) for h in histories]).double()
    sizes = [SMALL_VOCAB ** n for n in range(NEW_TOKENS)]
    return [rows.reshape(*[SMALL_VOCAB] * (n + 1)) for n, rows in enumerate(probs.split(sizes))]


def joint(conditionals: list[torch.Tensor]) -> torch.Tensor:
    """[V] * NEW_TOKENS: the probability of every output."""
    out = torch.ones((), dtype=torch.float64)
    for probs in conditionals:
        out = out.unsqueeze(-1) * probs
    return out


def chi_square(observed: Counter, expected_probs: dict, total: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expected under 5 are pooled. Observing a
    cell of probability 0 rejects outright: the statistic is infinite."""
    if any(expected_probs.get(cell, 0.0) == 0.0 for cell in observed):
        return math.inf, len(expected_probs) - 1
    cells = sorted(expected_probs, key=expected_probs.get, reverse=True)
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for cell in cells:
        expected = expected_probs[cell] * total
        if expected >= 5:
            stat += (observed[cell] - expected) ** 2 / expected
            df += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + observed[cell], pooled_exp + expected
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    return stat, df


def critical_value(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (z: the normal's), by Wilson–Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def marginals(joint: torch.Tensor) -> dict[str, dict]:
    """What the test compares: each position's token, and the first two tokens together."""
    out = {}
    for n in range(NEW_TOKENS):
        position = joint.sum(dim=[d for d in range(NEW_TOKENS) if d != n])
        out[f"token {n + 1}"] = {(t,): p for t, p in enumerate(position.tolist())}
    pair = joint.sum(dim=[2, 3])
    out["tokens 1-2"] = {(a, b): pair[a, b].item() for a in range(SMALL_VOCAB) for b in range(SMALL_VOCAB)}
    return out


def observed_cells(outputs: list[tuple[int, ...]]) -> dict[str, Counter]:
    out = {f"token {n + 1}": Counter((o[n],) for o in outputs) for n in range(NEW_TOKENS)}
    out["tokens 1-2"] = Counter(o[:2] for o in outputs)
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True),
    SamplingParams(temperature=0.8, top_k=6, repetition_penalty=1.5, presence_penalty=0.3,
                   max_tokens=NEW_TOKENS, ignore_eos=True),
], ids=["plain", "masks-and-penalties"])
def test_sampled_output_follows_the_target_distribution(monkeypatch, tokenizer, params):
    target, draft = small_model(tokenizer, seed=0), small_model(tokenizer, seed=5)
    engine = spec_engine(monkeypatch, target, draft, 3, max_num_seqs=256, max_num_batched_tokens=2048,
                         num_kv_blocks=512, max_waiting=NUM_SAMPLES)
    try:
        streams = [engine.submit(PROMPT, dataclasses.replace(params, seed=i)) for i in range(NUM_SAMPLES)]
        outputs = [tuple(s.result().token_ids) for s in streams]
        m = engine.metrics()
        assert 0 < m.spec_decode_num_accepted_tokens_total < m.spec_decode_num_draft_tokens_total
        assert_pools_empty(engine)
    finally:
        engine.close()
    assert all(len(o) == NEW_TOKENS for o in outputs)
    observed = observed_cells(outputs)
    # fresh copies on the host: the engine may have moved its models to a GPU and set their kernels
    target_probs = next_token_probs(small_model(tokenizer, seed=0), params)
    for name, probs in marginals(joint(target_probs)).items():
        stat, df = chi_square(observed[name], probs, NUM_SAMPLES)
        assert stat < critical_value(df), (name, stat, df)
    # and the test can tell: accepting every draft (the first token from the target, the second from
    # the draft) gives a distribution it rejects
    draft_second = next_token_probs(small_model(tokenizer, seed=5), params)[1]
    accept_all = {(a, b): (target_probs[0][a] * draft_second[a, b]).item()
                  for a in range(SMALL_VOCAB) for b in range(SMALL_VOCAB)}
    stat, df = chi_square(observed["tokens 1-2"], accept_all, NUM_SAMPLES)
    assert stat > critical_value(df), (stat, df)
