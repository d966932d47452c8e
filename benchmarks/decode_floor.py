"""How close a decode step comes to its matmul floor: the same engine's decode tokens/s against
its quantized linears alone (issues 6 and 9).

    python benchmarks/decode_floor.py                        # default model, int4, bf16, batch 1
    python benchmarks/decode_floor.py --quant int8 --batch 8 --rounds 8 --json

One process loads the engine (compiled step on unless ``--eager``; it waits for the build) and
alternates, ``--rounds`` times:

- engine: ``--batch`` greedy requests of ``--tokens`` tokens through ``submit`` (aggregate decode
  tokens/s as ``compare.py`` defines it);
- floor: the model's quantized linears alone on their CPU kernels (torch's packed ones or
  picochat's vnni; lm_head included), called on zero inputs of ``--batch`` rows on the engine's
  thread count, as many times as the engine ran steps — the
  time a step would take if nothing but its weight-only matmuls ran.

Medians, maxima and the ratio engine / floor are printed. On a host whose speed drifts, the ratio
is the figure to compare across runs. The last stdout line is one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time

import torch

from compare import aggregate_decode_rate, token_times  # benchmarks/ is sys.path[0] when run
from picochat.config import EngineConfig, QuantConfig, SamplingParams, SchedulerConfig
from picochat.engine.engine import LocalEngine
from picochat.model.quant_linear import QuantLinear
from picochat.model.registry import DEFAULT_MODEL


def engine_rate(engine: LocalEngine, batch: int, tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    streams = [engine.submit(list(range(100 + i, 160 + i)), params) for i in range(batch)]
    return aggregate_decode_rate([token_times(s.result().timings) for s in streams])


def floor_rate(linears: list[QuantLinear], batch: int, steps: int) -> float:
    inputs = [torch.zeros(batch, m.in_features, dtype=torch.bfloat16) for m in linears]
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            for m, x in zip(linears, inputs):
                m._packed_matmul(x)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--quant", default="int4", choices=("int8", "int4"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="do not build the compiled decode step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    engine = LocalEngine(EngineConfig(model=args.model, dtype="bfloat16", threads=args.threads,
                                      quant=QuantConfig(args.quant), compile=not args.eager,
                                      scheduler=SchedulerConfig(enable_prefix_caching=False)))
    try:
        while engine.decode_step == "compiling":
            time.sleep(0.5)
        linears = [m for m in engine.runner.model.modules() if isinstance(m, QuantLinear)]
        if not linears or any(m.backend not in ("packed", "vnni") for m in linears):
            sys.exit("decode_floor: needs the CPU quantized kernels (a CPU box, --quant int8|int4)")
        torch.set_num_threads(args.threads)
        engine_rates, floor_rates = [], []
        for _ in range(args.rounds):
            engine_rates.append(engine_rate(engine, args.batch, args.tokens))
            floor_rates.append(floor_rate(linears, args.batch, args.tokens - 1))
        step = engine.decode_step
    finally:
        engine.close()
    result = {
        "command": shlex.join(["python", *sys.argv]), "quant": args.quant, "batch": args.batch,
        "decode_step": step, "linears": len(linears),
        "engine_tok_s": engine_rates, "floor_tok_s": floor_rates,
        "engine_median": statistics.median(engine_rates), "floor_median": statistics.median(floor_rates),
        "ratio_median": statistics.median(e / f for e, f in zip(engine_rates, floor_rates)),
    }
    print(f"{args.quant}, batch {args.batch}, decode step {step}, {len(linears)} quantized linears, "
          f"{args.rounds} alternating rounds")
    for name in ("engine", "floor"):
        rates = result[f"{name}_tok_s"]
        print(f"  {name:7s} median {statistics.median(rates):7.1f} tok/s  max {max(rates):7.1f}")
    print(f"  engine / floor (median of per-round ratios): {result['ratio_median']:.2f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
