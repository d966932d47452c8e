"""The load generator of ``picochat bench``: fires synthetic requests at any Engine (in process or
remote) with a concurrency cap or Poisson arrivals, and reports TTFT, TPOT, ITL and end-to-end
latency, throughputs and goodput with ``vllm bench serve``'s definitions and JSON key names.

Prompts are random token ids (as vLLM's random dataset) and requests ignore EOS, so each produces
exactly its output length.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from picochat.config import SamplingParams
from picochat.engine.protocol import Engine
from picochat.errors import ConfigError

TOKEN_ID_RANGE = (1000, 20000)  # ordinary tokens in any modern vocabulary, clear of special ids


@dataclass(frozen=True)
class BenchConfig:
    concurrency: int = 1
    num_prompts: int = 3
    request_rate: float = float("inf")  # Poisson arrivals per second; inf → all at once
    input_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (128, 128)
    seed: int = 0
    warmup: int = 1
    goodput: tuple[str, ...] = ()  # "ttft:500", "tpot:50", "e2el:2000" (ms)


@dataclass
class RequestResult:
    input_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prefill_tok_s: float | None = None  # engine-side, where the engine reports timings
    decode_tok_s: float | None = None
    error: str | None = None


def parse_len(text: str) -> tuple[int, int]:
    """'128' → (128, 128); '32:256' → (32, 256)."""
    try:
        lo, _, hi = text.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(f"length must be N or MIN:MAX, got {text!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise ConfigError(f"length range must satisfy 1 <= MIN <= MAX, got {text!r}")
    return lo_i, hi_i


def parse_goodput(slos: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for slo in slos:
        name, _, ms = slo.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise ConfigError(f"goodput SLO must be ttft:MS, tpot:MS or e2el:MS, got {slo!r}")
        try:
            out[name] = float(ms) / 1000.0
        except ValueError:
            raise ConfigError(f"goodput SLO needs milliseconds, got {slo!r}") from None
    return out


def make_workload(cfg: BenchConfig) -> list[tuple[list[int], int]]:
    rng = random.Random(cfg.seed)
    work = []
    for _ in range(cfg.num_prompts):
        n_in = rng.randint(*cfg.input_len)
        work.append(([rng.randrange(*TOKEN_ID_RANGE) for _ in range(n_in)], rng.randint(*cfg.output_len)))
    return work


async def run_one(engine: Engine, prompt: list[int], output_len: int) -> RequestResult:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    result = RequestResult(input_len=len(prompt))
    start = time.perf_counter()
    last = start
    try:
        async for delta in engine.submit(prompt, params):
            t = time.perf_counter()
            # servers that stream text without token ids (llama.cpp, OpenAI) still stream tokens
            if delta.token_ids or delta.text:
                if result.output_len == 0:
                    result.ttft = t - start
                else:
                    result.itl.append(t - last)
                last = t
                result.output_len += max(len(delta.token_ids), 1)
            if delta.finished:
                if delta.error:
                    result.error = delta.error
                if delta.timings is not None:
                    if delta.timings.output_tokens:  # the server's own count (usage) is exact
                        result.output_len = delta.timings.output_tokens
                    result.prefill_tok_s = delta.timings.prefill_tok_s
                    result.decode_tok_s = delta.timings.decode_tok_s
    except Exception as e:  # a failed request is reported, not fatal to the run
        result.error = f"{type(e).__name__}: {e}"
    result.latency = time.perf_counter() - start
    return result


def run_load(engine: Engine, cfg: BenchConfig, on_done=None) -> tuple[list[RequestResult], float]:
    """Run the workload; returns per-request results and the benchmark's wall duration.

    All requests are read by one asyncio loop (the streams' async side), not a thread each: with
    a thread per stream every token woke a thread that had to win the GIL from the engine's own
    thread; at 8 streams in process that cost about a fifth of the throughput."""
    return asyncio.run(_run_load(engine, cfg, on_done))


async def _run_load(engine: Engine, cfg: BenchConfig, on_done) -> tuple[list[RequestResult], float]:
    work = make_workload(cfg)
    rng = random.Random(cfg.seed + 1)
    slots = asyncio.Semaphore(cfg.concurrency)

    async def request(prompt: list[int], n_out: int) -> RequestResult:
        try:
            return await run_one(engine, prompt, n_out)
        finally:
            slots.release()
            if on_done:
                on_done()

    start = time.perf_counter()
    tasks = []
    for i, (prompt, n_out) in enumerate(work):
        await slots.acquire()
        tasks.append(asyncio.create_task(request(prompt, n_out)))
        if cfg.request_rate != float("inf") and i + 1 < len(work):
            await asyncio.sleep(rng.expovariate(cfg.request_rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float, cfg: BenchConfig) -> dict:
    ok = [r for r in results if r.error is None]
    out: dict = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "max_concurrency": cfg.concurrency, "request_rate": cfg.request_rate,
        "total_input_tokens": sum(r.input_len for r in ok),
        "total_output_tokens": sum(r.output_len for r in ok),
    }
    out["request_throughput"] = len(ok) / duration
    out["output_throughput"] = out["total_output_tokens"] / duration
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / duration
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, values in series.items():
        ms = [v * 1000 for v in values] or [0.0]
        out[f"mean_{name}_ms"] = statistics.fmean(ms)
        out[f"median_{name}_ms"] = statistics.median(ms)
        out[f"std_{name}_ms"] = statistics.pstdev(ms)
        for p in (50, 90, 99):
            out[f"p{p}_{name}_ms"] = percentile(ms, p)
    slos = parse_goodput(cfg.goodput)
    if slos:
        good = sum(1 for r in ok if all(_meets(r, k, v) for k, v in slos.items()))
        out["request_goodput"] = good / duration
    for key in ("prefill_tok_s", "decode_tok_s"):
        values = [getattr(r, key) for r in ok if getattr(r, key) is not None]
        out[f"median_{key}"] = statistics.median(values) if values else None
    return out


def _meets(r: RequestResult, slo: str, limit_s: float) -> bool:
    if slo == "ttft":
        return r.ttft <= limit_s
    if slo == "tpot":
        return r.output_len <= 1 or (r.latency - r.ttft) / (r.output_len - 1) <= limit_s
    return r.latency <= limit_s


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default)."""
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_bench(engine: Engine, cfg: BenchConfig, as_json: bool) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    err = Console(stderr=True)
    if cfg.warmup:
        warm = BenchConfig(concurrency=1, num_prompts=cfg.warmup, input_len=cfg.input_len,
                           output_len=(8, 8), seed=cfg.seed + 7)
        run_load(engine, warm)
    decode_step = wait_for_decode_step(engine, err)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("benchmark", total=cfg.num_prompts)
        results, duration = run_load(engine, cfg, on_done=lambda: bar.advance(task))
    summary = summarize(results, duration, cfg)
    info = engine.info
    summary.update(model=info.model, dtype=info.dtype, quant=info.quant, device=info.device, decode_step=decode_step)
    weight_bytes = engine.metrics().weight_bytes
    if weight_bytes and summary["median_decode_tok_s"] and not info.remote:
        from picochat.bench.roofline import roofline
        # one weight pass per decode step; a step serves every running stream at once
        steps_per_s = summary["median_decode_tok_s"]
        summary.update(roofline(weight_bytes, steps_per_s, "cuda" if info.device.startswith("cuda") else "cpu"))
    print_table(summary, err if as_json else Console())
    if as_json:
        print(json.dumps(summary))
    return summary


def wait_for_decode_step(engine: Engine, console) -> str | None:
    """Measure the decode step users get once it is built: a local engine builds its fast step
    (CUDA graphs: seconds; torch.compile on a CPU: minutes cold) once idle, i.e. after the warm-up,
    and serves eagerly meanwhile. None for an engine that does not say (a remote server)."""
    step = getattr(engine, "decode_step", None)
    if step == "compiling":
        with console.status("waiting for the fast decode step (--no-compile measures the eager one)…"):
            while engine.decode_step == "compiling":
                time.sleep(0.2)
        step = engine.decode_step
    return step


def print_table(s: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"picochat bench — {s['model']} ({s['dtype']}, quant {s['quant']}, {s['device']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("completed / failed", f"{s['completed']} / {s['failed']}"),
            *([("decode step", s["decode_step"])] if s.get("decode_step") else []),
            ("duration (s)", f"{s['duration']:.2f}"),
            ("request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("output throughput (tok/s)", f"{s['output_throughput']:.1f}"),
            ("total token throughput (tok/s)", f"{s['total_token_throughput']:.1f}")]
    if s.get("median_prefill_tok_s") is not None:
        rows.append(("median prefill (tok/s, engine)", f"{s['median_prefill_tok_s']:.1f}"))
    if s.get("median_decode_tok_s") is not None:
        rows.append(("median decode (tok/s, per request)", f"{s['median_decode_tok_s']:.1f}"))
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        rows.append((f"{label} mean / p50 / p90 / p99 (ms)",
                     " / ".join(f"{s[f'{k}_{name}_ms']:.1f}" for k in ("mean", "p50", "p90", "p99"))))
    if "achieved_weight_gbs" in s:
        rows.append(("weight reads (GB/s, share of measured)",
                     f"{s['achieved_weight_gbs']:.1f} / {s['measured_bandwidth_gbs']:.1f} = "
                     f"{s['bandwidth_share']:.0%}"))
    if "request_goodput" in s:
        rows.append(("goodput (req/s)", f"{s['request_goodput']:.2f}"))
    for row in rows:
        table.add_row(*row)
    console.print(table)
