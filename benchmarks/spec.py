"""n-gram (prompt-lookup) speculation against speculation off, on the same engine settings:
input-grounded prompts (rewrite, summarise or edit a given text or code), open-ended chat, and
adversarial prompts (drafts found at most steps but mostly wrong: what adaptive k is for).

    python benchmarks/spec.py                                # default model, bf16, eager steps
    python benchmarks/spec.py --quant int4 --runs 3 --max-tokens 128 --json
    python benchmarks/spec.py --categories adversarial      # one prompt set
    python benchmarks/spec.py --device cuda --compile      # on a GPU, over the CUDA graphs

One engine serves both, speculation switched between passes; every prompt runs greedily with
speculation off and on, alternating, ``--runs`` times after one warm-up. Per category it prints
decode tok/s (output tokens after the first / time from first to last token, summed over the
category's prompts; medians over runs), the speed-up and the draft acceptance rate, and checks
that speculation left the greedy tokens unchanged (prefix caching is off, so that is speculation's
doing alone). The decode step is eager by default
(``--compile``: the compiled step, or the CUDA graphs with ``--device cuda``, serves plain
decode and verification steps).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time

from picochat.config import EngineConfig, QuantConfig, SamplingParams, SchedulerConfig, SpecConfig
from picochat.engine.engine import LocalEngine
from picochat.evaluate import read_text


def grounded_prompts() -> list[str]:
    text = read_text(None)  # the shipped CC0 sample
    passage = " ".join(text.split()[:180])
    code = ("def mean(values):\n    total = 0\n    for v in values:\n        total = total + v\n"
            "    return total / len(values)\n\n\ndef variance(values):\n    m = mean(values)\n"
            "    total = 0\n    for v in values:\n        total = total + (v - m) ** 2\n"
            "    return total / len(values)\n")
    return [
        f"Repeat the following text word for word.\n\n{passage}",
        f"Rewrite the following text with British spelling, changing nothing else.\n\n{passage}",
        f"Add a docstring to each function below and return the whole code.\n\n{code}",
        f"Rename the variable `total` to `acc` in this code and return the whole code.\n\n{code}",
    ]


OPEN_PROMPTS = [
    "Tell me a short story about a dragon who learns to bake bread.",
    "What are five good habits for learning a new language?",
    "Explain why the sky is blue to a curious ten-year-old.",
    "Write a friendly note inviting neighbours to a garden party.",
]


# adversarial for prompt lookup: enumerations whose n-grams recur with a different continuation
# each time, so drafts are found at most steps and mostly rejected (28-35 % accepted, measured)
ADVERSARIAL_PROMPTS = [
    "Write the numbers from 1 to 150, separated by commas.",
    "Write the multiplication table of 7, from 7 x 1 up to 7 x 30, one line each.",
    "Write a table of the first twenty powers of two, one per line, as '2^n = value'.",
]


def run_prompt(engine: LocalEngine, prompt: str, max_tokens: int) -> tuple[list[int], float, float, int, int]:
    """(token ids, decode seconds, decode tokens, drafted, accepted) of one greedy request."""
    done = engine.submit([{"role": "user", "content": prompt}],
                         SamplingParams(temperature=0.0, max_tokens=max_tokens)).result()
    if done.error or done.timings is None:
        raise RuntimeError(done.error or "no timings")
    t = done.timings
    return list(done.token_ids), t.finished - t.first_token, t.output_tokens - 1, t.draft_tokens, t.accepted_tokens


def set_spec(engine: LocalEngine, spec: SpecConfig) -> None:
    """Switch speculation and wait until the engine serves with it."""
    engine.reconfigure(spec=spec)
    deadline = time.monotonic() + 60
    while engine.info.spec != spec.mode:
        if time.monotonic() > deadline:
            raise SystemExit(f"speculation did not switch to {spec.mode}: {engine.metrics().activity}")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quant", default="none")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--ngram", type=int, default=3, help="n-gram match length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true",
                        help="the fast decode step: compiled on the CPU, CUDA graphs on a GPU")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--categories", nargs="+", default=["input", "open", "adversarial"],
                        choices=["input", "open", "adversarial"], help="prompt sets to run")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    args = parser.parse_args()

    # one engine, speculation switched between passes: a second engine's idle thread would keep
    # an OpenMP team of its own and slow both (see engine.run_on_passing_thread)
    # prefix caching off: a repeated prompt would be served partly from the cache, and its
    # remaining rows computed as a shorter chunk — which with int4 takes another path (the
    # kernel below 64 rows, a dequantized bf16 matmul above) and changes greedy tokens by itself
    engine = LocalEngine(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads,
                                      quant=QuantConfig(mode=args.quant), compile=args.compile, device=args.device,
                                      scheduler=SchedulerConfig(enable_prefix_caching=False)))
    specs = {"off": SpecConfig(), "ngram": SpecConfig(mode="ngram", k=args.k, ngram_n=args.ngram)}
    while engine.decode_step == "compiling":
        time.sleep(0.5)
    categories = {name: prompts for name, prompts in (("input-grounded", grounded_prompts()),
                                                      ("open chat", OPEN_PROMPTS),
                                                      ("adversarial", ADVERSARIAL_PROMPTS))
                  if name.split()[0].split("-")[0] in args.categories}
    results: dict = {}
    for category, prompts in categories.items():
        rates: dict[str, list[float]] = {"off": [], "ngram": []}
        drafted = accepted = 0
        same = True
        for run in range(args.runs + 1):
            totals = {name: [0.0, 0.0] for name in specs}  # seconds, tokens
            outputs: dict[str, list] = {}
            for name, spec in specs.items():
                set_spec(engine, spec)
                outputs[name] = []
                for prompt in prompts:
                    ids, seconds, tokens, d, a = run_prompt(engine, prompt, args.max_tokens)
                    outputs[name].append(ids)
                    totals[name][0] += seconds
                    totals[name][1] += tokens
                    if name == "ngram" and run:
                        drafted, accepted = drafted + d, accepted + a
            same &= outputs["off"] == outputs["ngram"]
            if run:  # run 0 warms up
                for name, (seconds, tokens) in totals.items():
                    rates[name].append(tokens / seconds)
        off, on = statistics.median(rates["off"]), statistics.median(rates["ngram"])
        results[category] = {"off_tok_s": off, "ngram_tok_s": on, "speedup": on / off,
                             "acceptance_rate": accepted / drafted if drafted else None,
                             "drafted": drafted, "accepted": accepted, "same_tokens": same,
                             "samples": rates}
        rate = f"{accepted / drafted:.0%}" if drafted else "-"
        print(f"{category:15s} off {off:6.1f} tok/s  ngram {on:6.1f} tok/s  speed-up {on / off:4.2f}x  "
              f"acceptance {rate} ({accepted}/{drafted} drafts)  greedy tokens unchanged: {same}", flush=True)
    engine.close()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"command: {command}")
    if args.json:
        print(json.dumps({"command": command, "k": args.k, "ngram": args.ngram, "dtype": args.dtype,
                          "quant": args.quant, "runs": args.runs, "results": results}))


if __name__ == "__main__":
    main()
