"""Prefix caching and KV-cache packing (issue 4), in one invocation on the default model:

- turn-5 TTFT: for each of ``--chats`` conversations (a system prompt, then user turns whose
  replies the engine writes, greedy, ``--reply-tokens`` each), turns 1-4 run on an engine with
  prefix caching, then turn 5's TTFT is measured on it and, with the same messages, on an engine
  without prefix caching. Medians and their ratio; the cached engine's prefill of turn 5 should
  cover only the new user message.
- KV slot use: ``--streams`` requests of different prompt lengths decode together; while all of
  them run, every ~0.2 s the tokens they hold (prompt + output so far, as their readers count)
  are divided by the slots of the KV blocks the engine reports in use. Mean and minimum.

    python benchmarks/prefix.py                      # bf16, 5 chats, 8 streams
    python benchmarks/prefix.py --dtype float32 --json

Both engines serve eagerly. The last stdout line is one JSON object with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics

from picochat.config import EngineConfig, SamplingParams, SchedulerConfig
from picochat.engine.engine import LocalEngine
from picochat.model.registry import DEFAULT_MODEL

SYSTEM = ("You are a patient, precise assistant for a small public library. Answer questions about "
          "books, opening hours, membership and events. Keep answers short, friendly and concrete; "
          "when unsure, say so and suggest asking the front desk.")
TOPICS = ["science fiction", "local history", "gardening", "chess", "cooking", "astronomy", "poetry"]
QUESTIONS = ["Which {} books would you suggest to a beginner?", "Are there any events about {} this month?",
             "Can I borrow more than three {} books at once?", "Do you have magazines on {}?",
             "What is the best way to start learning about {} on my own?"]


def chat_turns(topic: str) -> list[str]:
    return [q.format(topic) for q in QUESTIONS]


def run_turn(engine: LocalEngine, messages: list[dict], tokens: int) -> tuple[str, float, int]:
    """(reply, TTFT, prompt tokens served from the prefix cache) of one greedy turn."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    text, timings = [], None
    for delta in engine.submit(messages, params):
        text.append(delta.text)
        if delta.finished:
            if delta.error:
                raise SystemExit(f"request failed: {delta.error}")
            timings = delta.timings
    return "".join(text), timings.ttft_s, timings.cached_tokens


def turn5(cached: LocalEngine, uncached: LocalEngine, topic: str, reply_tokens: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    user_turns = chat_turns(topic)
    for question in user_turns[:4]:
        messages.append({"role": "user", "content": question})
        reply, _, _ = run_turn(cached, messages, reply_tokens)
        messages.append({"role": "assistant", "content": reply})
    messages.append({"role": "user", "content": user_turns[4]})
    _, ttft_cached, hit = run_turn(cached, messages, 1)
    _, ttft_uncached, _ = run_turn(uncached, messages, 1)
    return {"topic": topic, "prompt_tokens": cached.count_prompt_tokens(messages), "cached_tokens": hit,
            "ttft_cached_ms": ttft_cached * 1e3, "ttft_uncached_ms": ttft_uncached * 1e3}


async def kv_slot_use(engine: LocalEngine, streams: int, output_len: int) -> list[float]:
    block_size = engine.config.scheduler.block_size
    held = [0] * streams
    running = [False] * streams

    async def read(i: int, prompt: list[int]) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        held[i] = len(prompt)
        async for delta in engine.submit(prompt, params):
            held[i] += len(delta.token_ids)
            running[i] = running[i] or bool(delta.token_ids)
        running[i] = False

    prompts = [[1000 + (7 * i + j) % 9000 for j in range(96 + 29 * i)] for i in range(streams)]
    tasks = [asyncio.create_task(read(i, p)) for i, p in enumerate(prompts)]
    samples = []
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.2)
        if all(running):
            used = engine.metrics().kv_blocks_used
            if used:
                samples.append(sum(held) / (used * block_size))
    await asyncio.gather(*tasks)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chats", type=int, default=5)
    parser.add_argument("--reply-tokens", type=int, default=96)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    def engine(prefix_caching: bool) -> LocalEngine:
        return LocalEngine(EngineConfig(model=args.model, dtype=args.dtype, compile=False,
                                        scheduler=SchedulerConfig(enable_prefix_caching=prefix_caching)))

    cached, uncached = engine(True), engine(False)
    try:
        run_turn(cached, [{"role": "user", "content": "Hello"}], 4)  # warm-up, not counted
        run_turn(uncached, [{"role": "user", "content": "Hello"}], 4)
        chats = [turn5(cached, uncached, TOPICS[i % len(TOPICS)], args.reply_tokens) for i in range(args.chats)]
        samples = asyncio.run(kv_slot_use(uncached, args.streams, args.output_len))
    finally:
        cached.close()
        uncached.close()

    with_cache = statistics.median(c["ttft_cached_ms"] for c in chats)
    without = statistics.median(c["ttft_uncached_ms"] for c in chats)
    result = {"model": args.model, "dtype": args.dtype, "chats": chats,
              "median_turn5_ttft_cached_ms": with_cache, "median_turn5_ttft_uncached_ms": without,
              "turn5_ttft_ratio": with_cache / without,
              "kv_slot_use_mean": statistics.mean(samples) if samples else None,
              "kv_slot_use_min": min(samples) if samples else None, "kv_slot_use_samples": len(samples)}
    for c in chats:
        print(f"{c['topic']:>16}: turn 5 prompt {c['prompt_tokens']} tokens, {c['cached_tokens']} from the "
              f"prefix cache; TTFT {c['ttft_cached_ms']:.0f} ms cached, {c['ttft_uncached_ms']:.0f} ms without")
    print(f"turn-5 TTFT, medians of {args.chats}: {with_cache:.0f} ms with prefix caching, {without:.0f} ms "
          f"without -> {with_cache / without:.2f}")
    if samples:
        print(f"KV slots used by live tokens, {args.streams} streams: mean {statistics.mean(samples):.1%}, "
              f"min {min(samples):.1%} ({len(samples)} samples)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
