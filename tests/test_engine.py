"""LocalEngine behaviour on a tiny random model with the real default tokenizer (fp32):
streaming, batch invariance under chunked prefill and forced preemption, prefix caching,
cancellation leaving the pool clean, stop handling and bad input."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tiny_models import wait_idle

from picochat.config import EngineConfig, SamplingParams, SchedulerConfig
from picochat.engine.engine import LoadedModel, LocalEngine
from picochat.engine.protocol import now
from picochat.engine.runner import ModelRunner
from picochat.errors import ConfigError, PromptTooLongError

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_engine(loaded: LoadedModel, **sched) -> LocalEngine:
    return LocalEngine(EngineConfig(model="tiny", scheduler=SchedulerConfig(**sched)), loaded=loaded)


def prompts() -> list[list[dict]]:
    topics = ["the sea", "a very long and winding road through the mountains of the north", "cats",
              "why the sky is blue, explained to a child who asks many questions", "bread", "trains"]
    return [[{"role": "user", "content": f"Tell me about {t}."}] for t in topics]



def test_stream_and_timings(tiny_loaded):
    engine = make_engine(tiny_loaded)
    try:
        out = engine.submit(prompts()[0], GREEDY).result()
        assert out.finish_reason == "length" and len(out.token_ids) == 24
        t = out.timings
        assert t.prompt_tokens == engine.count_prompt_tokens(prompts()[0])
        assert t.ttft_s > 0 and t.queue_s >= 0 and len(t.itl) == 23 and t.decode_tok_s > 0
        m = engine.metrics()
        assert m.generation_tokens_total == 24 and m.requests_finished_total == 1
    finally:
        engine.close()


def test_arrival_given_by_the_caller_starts_the_clock(tiny_loaded):
    engine = make_engine(tiny_loaded)
    try:
        arrival = now() - 0.5  # as if the request had spent half a second in a server first
        out = engine.submit(prompts()[0], GREEDY, arrival=arrival).result()
        assert out.timings.arrival == arrival and out.timings.ttft_s >= 0.5 and out.timings.queue_s >= 0.5
    finally:
        engine.close()


def test_batch_invariance_with_chunked_prefill_and_preemption(tiny_loaded):
    sequential = make_engine(tiny_loaded, max_num_seqs=1, enable_prefix_caching=False)
    try:
        expected = [sequential.submit(p, GREEDY).result().token_ids for p in prompts()]
    finally:
        sequential.close()
    # 14 blocks of 16 tokens cannot hold six ~50-token requests at once: preemption is forced;
    # a 24-token budget splits every prompt into chunks.
    engine = make_engine(tiny_loaded, max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=14,
                         enable_prefix_caching=False)
    try:
        streams = []
        for p in prompts():
            streams.append(engine.submit(p, GREEDY))
            time.sleep(0.01)  # staggered arrivals
        got = [s.result().token_ids for s in streams]
        m = engine.metrics()
        assert m.num_preemptions_total > 0
        assert got == expected
        wait_idle(engine)
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
    finally:
        engine.close()


def test_prefix_cache_prefills_only_the_new_turn(tiny_loaded):
    plain = make_engine(tiny_loaded, enable_prefix_caching=False)
    cached = make_engine(tiny_loaded)
    try:
        turn1 = [{"role": "system", "content": "You are terse. " * 8},
                 {"role": "user", "content": "Name three rivers in Europe, please."}]
        a1 = cached.submit(turn1, GREEDY).result()
        turn2 = turn1 + [{"role": "assistant", "content": a1.text},
                         {"role": "user", "content": "And three in Asia?"}]
        b2 = plain.submit(turn2, GREEDY).result()
        a2 = cached.submit(turn2, GREEDY).result()
        assert a2.token_ids == b2.token_ids
        n_turn1 = cached.count_prompt_tokens(turn1)
        assert a2.timings.cached_tokens >= (n_turn1 // 16) * 16
        assert a2.timings.prompt_tokens - a2.timings.cached_tokens < a2.timings.prompt_tokens - n_turn1 + 16
        m = cached.metrics()
        assert m.prefix_cache_hits_total == a2.timings.cached_tokens
    finally:
        plain.close()
        cached.close()


def test_cancel_during_prefill_decode_and_preempted_leaves_pool_clean(tiny_loaded):
    engine = make_engine(tiny_loaded, max_num_seqs=4, max_num_batched_tokens=8, num_kv_blocks=10)
    try:
        long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        streams = [engine.submit(p, long) for p in prompts()]
        streams[0].cancel()  # most likely still in (chunked) prefill
        first = streams[1].get(timeout=30)  # decoding now
        assert first is not None
        streams[1].cancel()
        for s in streams[2:]:
            s.cancel()  # waiting or preempted
        reasons = [s.result().finish_reason for s in streams]
        assert all(r in ("cancelled", "length") for r in reasons) and reasons.count("cancelled") >= 4
        wait_idle(engine)
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
    finally:
        engine.close()


def test_stop_string_is_not_emitted(tiny_loaded):
    engine = make_engine(tiny_loaded)
    try:
        free = engine.submit(prompts()[2], GREEDY).result()
        stop = free.text[5:9]
        assert stop
        out = engine.submit(prompts()[2], SamplingParams(temperature=0.0, max_tokens=24, stop=(stop,))).result()
        assert out.finish_reason == "stop"
        assert out.text == free.text[:free.text.find(stop)]
    finally:
        engine.close()


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_loaded):
    engine = make_engine(tiny_loaded)
    try:
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
        alone = engine.submit(prompts()[0], params).result().token_ids
        noise = [engine.submit(p, SamplingParams(temperature=1.0, max_tokens=16)) for p in prompts()[1:]]
        together = engine.submit(prompts()[0], params).result().token_ids
        for s in noise:
            s.result()
        assert alone == together
    finally:
        engine.close()


def test_bad_input_is_rejected_with_one_line(tiny_loaded):
    engine = make_engine(tiny_loaded, num_kv_blocks=4)
    try:
        with pytest.raises(PromptTooLongError, match="context holds 512"):
            engine.submit(list(range(1000, 1600)), GREEDY)
        with pytest.raises(PromptTooLongError, match="pool holds 64"):
            engine.submit(list(range(1000, 1060)), SamplingParams(max_tokens=100))
        with pytest.raises(ConfigError, match="temperature"):
            engine.submit("hi", SamplingParams(temperature=-1))
        with pytest.raises(ConfigError, match="token ids"):
            engine.submit([1, 2, 10**9], GREEDY)
        with pytest.raises(ConfigError, match="max_num_seqs"):
            engine.reconfigure(max_num_seqs=0)
        with pytest.raises(ConfigError, match="cannot reconfigure block_size"):
            engine.reconfigure(block_size=32)
        # the engine still serves after all that
        assert engine.submit(prompts()[4], GREEDY).result().finish_reason == "length"
    finally:
        engine.close()


def test_a_kv_cache_beyond_memory_is_one_line(tiny_loaded, monkeypatch):
    def host_engine(**sched) -> LocalEngine:  # on the host also where a GPU is present
        return LocalEngine(EngineConfig(model="tiny", device="cpu", scheduler=SchedulerConfig(**sched)),
                           loaded=tiny_loaded)

    with pytest.raises(ConfigError, match=r"a KV cache of \d+ MiB does not fit the \d+ MiB of cpu: lower --kv-cache-mb"):
        host_engine(kv_cache_memory_mb=100_000_000)  # 100 TB
    # a budget the host holds in total but not free now: the allocation's failure, in one line
    empty = torch.empty

    def no_memory(*args, **kwargs):
        if len(args) == 1 and isinstance(args[0], tuple) and len(args[0]) == 4:  # the runner's KV caches
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
        return empty(*args, **kwargs)

    monkeypatch.setattr("picochat.engine.runner.torch.empty", no_memory)
    with pytest.raises(ConfigError, match=r"out of host memory for a KV cache of \d+ MiB on cpu: .*--kv-cache-mb"):
        host_engine(kv_cache_memory_mb=64)


def test_loading_runs_on_a_passing_thread(tiny_loaded, monkeypatch):
    """The engine's torch work runs on its loop thread only: loading runs on a thread that has
    ended by the time the constructor returns (``run_on_passing_thread``; the test above sees its
    errors reach the caller)."""
    threads = []
    build_runner = ModelRunner.__init__

    def spy(self, *args):
        threads.append(threading.current_thread())
        build_runner(self, *args)

    monkeypatch.setattr(ModelRunner, "__init__", spy)
    engine = make_engine(tiny_loaded)
    try:
        (loader,) = threads
        assert loader not in (threading.current_thread(), engine._thread)
        assert not loader.is_alive()
    finally:
        engine.close()


def test_many_submitters_queue_safely(tiny_loaded):
    engine = make_engine(tiny_loaded, max_num_seqs=2)
    try:
        results = []
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        threads = [threading.Thread(target=lambda p=p: results.append(engine.submit(p, params).result()))
                   for p in prompts() * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 12 and all(len(r.token_ids) == 4 for r in results)
    finally:
        engine.close()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_ngram_speculation_keeps_greedy_output(looping_loaded, k):
    from picochat.config import SpecConfig

    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = make_engine(looping_loaded, max_num_seqs=4)
    spec = LocalEngine(EngineConfig(model="tiny", scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=20),
                                    spec=SpecConfig(mode="ngram", k=k, ngram_n=2)), loaded=looping_loaded)
    try:
        expected = [plain.submit(p, params).result().token_ids for p in prompts()]
        # batched, with rows that speculate and rows still in prefill in the same steps
        streams = [spec.submit(p, params) for p in prompts()]
        results = [s.result() for s in streams]
        assert [r.token_ids for r in results] == expected
        m = spec.metrics()
        assert 0 < m.spec_decode_num_accepted_tokens_total < m.spec_decode_num_draft_tokens_total
        assert sum(r.accepted_draft_tokens for r in results) == m.spec_decode_num_accepted_tokens_total
        wait_idle(spec)
        assert spec.kv.num_free_blocks == spec.kv.num_blocks
    finally:
        plain.close()
        spec.close()


@pytest.mark.parametrize("broken", ["runner", "proposer"])
def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(looping_loaded, monkeypatch, broken):
    from picochat.config import SpecConfig

    engine = LocalEngine(EngineConfig(model="tiny", spec=SpecConfig(mode="ngram", k=2, ngram_n=2)),
                         loaded=looping_loaded)
    try:
        target = engine.runner if broken == "runner" else engine.proposer
        name = "execute" if broken == "runner" else "propose"
        working = getattr(target, name)
        failures = []

        def fails_once(work):  # the first call with something to do
            if not failures and (broken == "runner" or work):
                failures.append(work)
                raise RuntimeError("a bug")
            return working(work)

        monkeypatch.setattr(target, name, fails_once)
        failed = engine.submit(prompts()[0], GREEDY).result()
        assert failed.finish_reason == "error" and failed.error == "internal error: RuntimeError: a bug"
        served = engine.submit(prompts()[0], GREEDY).result()
        assert served.error is None and len(served.token_ids) == GREEDY.max_tokens
        wait_idle(engine)
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
    finally:
        engine.close()


def test_speculation_switches_live(looping_loaded):
    from picochat.config import SpecConfig

    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    engine = make_engine(looping_loaded)
    try:
        expected = engine.submit(prompts()[1], params).result().token_ids
        stream = engine.submit(prompts()[1], params)
        engine.reconfigure(spec=SpecConfig(mode="ngram", k=3))
        assert stream.result().token_ids == expected
        for _ in range(200):
            if engine.info.spec == "ngram":
                break
            time.sleep(0.01)
        assert engine.submit(prompts()[1], params).result().token_ids == expected
        assert engine.metrics().spec_decode_num_accepted_tokens_total > 0
        engine.reconfigure(spec=SpecConfig(mode="off"))
        assert engine.submit(prompts()[1], params).result().token_ids == expected
    finally:
        engine.close()
