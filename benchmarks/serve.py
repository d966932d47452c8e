"""`picochat serve` against the in-process engine (issue 8), in one invocation:

- throughput: the same load (``--streams`` concurrent streams, ``--prompts`` requests, EOS ignored)
  through HTTP (`picochat serve` in a subprocess, read through ``RemoteEngine``, the client the
  console and ``picochat bench --url`` use) and in process (``LocalEngine``, as ``picochat bench``
  runs it), alternated A-B-B-A over ``--rounds`` pairs; medians of output tokens/s and their ratio.
- TTFT as shown against TTFT as measured, request by request (one at a time, a ~50-token chat
  prompt): the console's panel plots ``RequestTimings.ttft_s`` of the request's final delta. In
  process, that is set by the engine and compared with the time the reading thread got its first
  token. Through HTTP, the server's ``/metrics`` histogram (``picochat:time_to_first_token_seconds``,
  what a console attached with ``--url`` shows next to its own figure) is compared with the
  client's stopwatch, from the request's hand-over to its first streamed token. The server's
  figure runs from the request reaching it to its first token reaching the server's event loop,
  so the gap left is the request's way in (~2.5 ms over loopback with httpx here) and the first
  chunk's way out.

    python benchmarks/serve.py                           # bf16, 8 streams, 3 rounds
    python benchmarks/serve.py --dtype float32 --quant int8 --rounds 5 --json

Both engines serve eagerly (no compiled decode step: its background build would load the one
being measured), with the same engine flags. The last stdout line is one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from picochat.bench.loadgen import BenchConfig, run_load, summarize
from picochat.config import EngineConfig, QuantConfig, SamplingParams
from picochat.engine.engine import LocalEngine
from picochat.engine.protocol import Engine
from picochat.model.registry import DEFAULT_MODEL
from picochat.remote import RemoteEngine

CHAT = [{"role": "user", "content": "Explain in two sentences why the sky is blue, for a curious "
                                    "eight-year-old who likes to ask how things work."}]
TTFT_METRIC = "picochat:time_to_first_token_seconds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from picochat.cli import main; main()", "serve", "--port", str(port),
           "--model", args.model, "--dtype", args.dtype, "--quant", args.quant, "--no-compile"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PICOCHAT_COMPILE": "0"})


def wait_healthy(server: subprocess.Popen, url: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"picochat serve exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"picochat serve was not healthy after {timeout_s:.0f} s")


def throughput(engine: Engine, load: BenchConfig) -> float:
    results, duration = run_load(engine, load)
    failed = [r.error for r in results if r.error]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, e.g. {failed[0]}")
    return summarize(results, duration, load)["output_throughput"]


def reader_ttft(engine: Engine, params: SamplingParams) -> tuple[float, float]:
    """(TTFT the final delta reports, TTFT the reading thread saw) of one request."""
    start = time.perf_counter()
    seen = reported = None
    for delta in engine.submit(CHAT, params):
        if seen is None and (delta.token_ids or delta.text):
            seen = time.perf_counter() - start
        if delta.finished:
            if delta.error:
                raise SystemExit(f"request failed: {delta.error}")
            reported = delta.timings.ttft_s
    return reported, seen


def server_ttft_sum(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{TTFT_METRIC}_sum":
                return sample.value
    raise SystemExit(f"{url}/metrics has no {TTFT_METRIC}")


def http_ttft(remote: RemoteEngine, url: str, params: SamplingParams) -> tuple[float, float]:
    """(TTFT the server's /metrics recorded, TTFT the HTTP client measured) of one request."""
    before = server_ttft_sum(url)
    client, _ = reader_ttft(remote, params)  # the client's own: hand-over to first streamed token
    return server_ttft_sum(url) - before, client


def relative_gaps(pairs: list[tuple[float, float]]) -> list[float]:
    return [abs(shown - measured) / measured for shown, measured in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quant", default="none")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttft-requests", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    try:
        local = LocalEngine(EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads,
                                         quant=QuantConfig(mode=args.quant), compile=False))
        wait_healthy(server, url)
        remote = RemoteEngine(url)
        engines = {"in-process": local, "http": remote}
        load = BenchConfig(concurrency=args.streams, num_prompts=args.prompts,
                           input_len=(args.input_len, args.input_len),
                           output_len=(args.output_len, args.output_len))
        warm = BenchConfig(concurrency=args.streams, num_prompts=args.streams, input_len=(16, 16),
                           output_len=(8, 8))
        for engine in engines.values():
            throughput(engine, warm)
        tok_s: dict[str, list[float]] = {name: [] for name in engines}
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                tok_s[name].append(throughput(engines[name], load))
                print(f"round {r + 1}: {name} {tok_s[name][-1]:.1f} tok/s", file=sys.stderr)

        params = SamplingParams(temperature=0.0, max_tokens=8)
        local_pairs = [reader_ttft(local, params) for _ in range(args.ttft_requests)]
        http_pairs = [http_ttft(remote, url, params) for _ in range(args.ttft_requests)]
        remote.close()
        local.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    medians = {name: statistics.median(v) for name, v in tok_s.items()}
    result = {
        "model": args.model, "dtype": args.dtype, "quant": args.quant, "streams": args.streams,
        "prompts": args.prompts, "input_len": args.input_len, "output_len": args.output_len,
        "rounds": args.rounds, "output_tok_s": tok_s, "median_output_tok_s": medians,
        "http_over_in_process": medians["http"] / medians["in-process"],
        "ttft_in_process_ms": [(shown * 1e3, seen * 1e3) for shown, seen in local_pairs],
        "ttft_http_ms": [(shown * 1e3, seen * 1e3) for shown, seen in http_pairs],
        "ttft_max_gap_in_process": max(relative_gaps(local_pairs)),
        "ttft_max_gap_http": max(relative_gaps(http_pairs)),
        "ttft_median_gap_in_process": statistics.median(relative_gaps(local_pairs)),
        "ttft_median_gap_http": statistics.median(relative_gaps(http_pairs)),
    }
    print(f"output tok/s, {args.streams} streams, medians of {args.rounds}: in-process "
          f"{medians['in-process']:.1f}, http {medians['http']:.1f} -> http / in-process "
          f"{result['http_over_in_process']:.2f}")
    for label, key, pairs in (("in process: panel vs reader", "in_process", local_pairs),
                              ("http: server /metrics vs client", "http", http_pairs)):
        shown = ", ".join(f"{a * 1e3:.0f}/{b * 1e3:.0f}" for a, b in pairs)
        print(f"TTFT ms {label}: {shown}; gap median {result[f'ttft_median_gap_{key}']:.1%}, "
              f"largest {result[f'ttft_max_gap_{key}']:.1%}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
