"""Property tests of the block pool and the scheduler, without a model: random arrivals, lengths,
cancellations, speculative drafts with random acceptance (KV rollback) and a tiny pool forcing
preemption. Invariants after every step: refcounts equal the number of tables holding a block,
no block is both free and held, budgets are respected, the prefix cache maps only to blocks that
carry that hash, and every request finishes exactly once with all its tokens."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from picochat.config import SamplingParams, SchedulerConfig
from picochat.engine.kv_cache import KVCacheManager
from picochat.engine.protocol import RequestTimings
from picochat.engine.request import Request, RequestStatus
from picochat.engine.scheduler import Scheduler

BLOCK = 4


def check_pool(kv: KVCacheManager) -> None:
    held = Counter(b for req in kv.requests.values() for b in req.blocks)
    for block in kv.blocks:
        assert block.ref_cnt == held.get(block.block_id, 0), block
        assert (block.ref_cnt == 0) == (block.block_id in kv.free_queue), block
    for h, block_id in kv.cached.items():
        assert kv.blocks[block_id].block_hash == h
    for req in kv.requests.values():
        assert len(set(req.blocks)) == len(req.blocks)  # no block twice in one table


def make_request(i: int, prompt_len: int, max_tokens: int, shared_prefix: list[int]) -> Request:
    prompt = (shared_prefix + [1000 + 7 * i + j for j in range(prompt_len)])[:max(prompt_len, 1)]
    return Request(request_id=f"r{i}", token_ids=prompt, num_prompt_tokens=len(prompt),
                   params=SamplingParams(max_tokens=max_tokens), max_total_tokens=len(prompt) + max_tokens,
                   stream=None, timings=RequestTimings(f"r{i}", 0.0), stop_token_ids=frozenset())  # type: ignore[arg-type]


requests_strategy = st.lists(
    st.tuples(st.integers(1, 30),  # prompt length
              st.integers(1, 12),  # max tokens
              st.integers(0, 6),  # arrival step
              st.one_of(st.none(), st.integers(0, 20)),  # cancel at step
              st.booleans()),  # shares the common prefix
    min_size=1, max_size=10)


@settings(max_examples=150, deadline=None)
@given(reqs=requests_strategy, num_blocks=st.integers(11, 24), max_seqs=st.integers(1, 5),
       budget=st.integers(1, 24), prefix_caching=st.booleans(),
       spec_k=st.integers(0, 3), accept_seed=st.integers(0, 2**16))
def test_pool_and_scheduler_invariants(reqs, num_blocks, max_seqs, budget, prefix_caching, spec_k, accept_seed):
    kv = KVCacheManager(num_blocks, BLOCK, prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv)
    shared = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    pending = [(arrive, cancel, make_request(i, plen, mtok, shared if share else []))
               for i, (plen, mtok, arrive, cancel, share) in enumerate(reqs)]
    finished: Counter[str] = Counter()
    rng = accept_seed
    for step in range(400):
        for arrive, _, req in pending:
            if arrive == step:
                sched.add(req)
        for arrive, cancel, req in pending:
            if cancel == step and arrive <= step and req.status is not RequestStatus.FINISHED:
                sched.finish(req)
                finished[req.request_id] += 1
        for req in sched.running:  # drafts for decoding requests, capped like the proposer caps them
            if spec_k and req.num_computed_tokens == req.num_tokens - 1:
                k = min(spec_k, req.max_total_tokens - req.num_tokens - 1)
                req.spec_token_ids = [42] * max(k, 0)
        out = sched.schedule()
        assert out.num_tokens <= budget and len(out.chunks) <= max_seqs
        for chunk in out.chunks:
            req = chunk.request
            table = kv.block_table(req.request_id)
            assert len(table) * BLOCK >= req.num_computed_tokens + chunk.num_new_tokens
            drafts = req.spec_token_ids
            if not chunk.samples:
                req.num_computed_tokens += chunk.num_new_tokens
                kv.cache_full_blocks(req.request_id, req.token_ids, req.num_computed_tokens)
                continue
            rng = (rng * 1103515245 + 12345) % 2**31
            accepted = rng % (len(drafts) + 1)
            req.num_computed_tokens += chunk.num_new_tokens - (len(drafts) - accepted)
            req.spec_token_ids = []
            if drafts:
                kv.truncate(req.request_id, req.num_computed_tokens)
            new = [2000 + req.num_tokens + j for j in range(accepted + 1)]
            room = req.max_total_tokens - req.num_tokens
            req.token_ids.extend(new[:room])
            if req.num_tokens >= req.max_total_tokens:
                sched.finish(req)
                finished[req.request_id] += 1
            else:
                kv.cache_full_blocks(req.request_id, req.token_ids, req.num_computed_tokens)
        check_pool(kv)
        if step > 6 and not sched.has_work:
            break
    assert all(n == 1 for n in finished.values())
    assert set(finished) == {req.request_id for _, _, req in pending}
    for arrive, cancel, req in pending:
        if cancel is None or cancel < arrive:
            assert req.num_tokens == req.max_total_tokens  # nothing lost to preemption
    assert kv.num_free_blocks == kv.num_blocks and not kv.requests


def test_prefix_cache_reuses_blocks_and_evicts_lru():
    kv = KVCacheManager(num_blocks=6, block_size=BLOCK)
    tokens = list(range(100, 113))  # 3 full blocks + 1 token
    assert kv.allocate_slots("a", len(tokens))
    kv.cache_full_blocks("a", tokens, len(tokens))
    kv.free("a")
    blocks, cached = kv.get_computed_blocks(tokens)
    assert cached == 12 and len(blocks) == 3
    assert kv.allocate_slots("b", len(tokens), blocks)
    assert kv.block_table("b")[:3] == blocks
    check_pool(kv)
    kv.free("b")
    # a different request needing every block evicts the cached ones
    assert kv.allocate_slots("c", 6 * BLOCK)
    assert not kv.cached
    check_pool(kv)
