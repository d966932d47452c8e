"""picochat against HF transformers and llama.cpp on one machine: the same model file, the same
token ids, the same thread count, each system in a process of its own, all loaded together and
taking turns (one pass of every metric each), medians of ``--runs`` measured passes after one
warm-up pass, and the ratios printed next to each goal.

    python benchmarks/compare.py                          # every installed system, the default model
    python benchmarks/compare.py --picochat-configs bf16,int4 --runs 5 --threads 2 --json
    python benchmarks/compare.py --quick --runs 1         # tiny sizes: a smoke test of every path

Each pass measures, with one definition for every system (token times are when a token id is
available to the caller):
- chat: a ~50-token chat prompt, then ``--decode-tokens`` tokens (EOS ignored). TTFT = first token −
  hand-over of the prompt ids; decode tok/s = (n − 1) / (last token − first token).
- prefill: a ``--prefill-tokens`` prompt, one token. prefill tok/s = prompt tokens / (first token −
  start of the prompt's forward pass), i.e. queueing is excluded.
- streams: ``--streams`` prompts of different lengths at once, ``--decode-tokens`` each. Aggregate
  decode tok/s = tokens produced after every stream has its first token, divided by the time from
  that moment to the last stream's last token (prefill excluded; all systems here prefill the
  streams together, so this is N·(n − 1) / decode time).

picochat runs in its process through ``LocalEngine`` and the Engine protocol (prefix caching off, so
repeated passes prefill again); HF transformers loads the GGUF dequantized into ``--hf-dtype`` and
runs greedy ``generate``; llama.cpp (llama-cpp-python, a benchmark-only install) uses the GGUF's
own blocks, and its streams go through the low-level batch API with one sequence id per stream.
The last stdout line is one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from picochat.config import EngineConfig, QuantConfig, SamplingParams, SchedulerConfig
from picochat.engine.engine import DTYPES, LocalEngine
from picochat.engine.protocol import RequestTimings
from picochat.evaluate import read_text
from picochat.model.registry import DEFAULT_MODEL, resolve_model
from picochat.model.tokenizer import Tokenizer

PICOCHAT_CONFIGS = {  # name → (activation dtype, weight quantization)
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),  # a GGUF's Q4_0/Q4_1 blocks used directly
}
METRICS = {  # key → (label, unit, higher is better)
    "decode_tok_s": ("decode, batch 1", "tok/s", True),
    "prefill_tok_s": ("prefill, {prefill}-token prompt", "tok/s", True),
    "agg_decode_tok_s": ("aggregate decode, {streams} streams", "tok/s", True),
    "ttft_s": ("TTFT, {chat}-token chat prompt", "ms", False),
}
# (peer, metric) → (the picochat config it is held against, the issue that sets the goal, the
# ratio picochat / peer it asks for; for TTFT the ratio is peer / picochat, shorter is better)
GOALS = {
    ("llamacpp", "decode_tok_s"): ("int4", "#9", 1.6),
    ("llamacpp", "prefill_tok_s"): ("int4", "#9", 4.0),
    ("llamacpp", "agg_decode_tok_s"): ("int4", "#9", 2.0),
    ("llamacpp", "ttft_s"): ("int4", "#9", 1.0),
    ("hf", "decode_tok_s"): ("bf16", "#2", 1.5),
    ("hf", "prefill_tok_s"): ("bf16", "#2", 1.0),
    ("hf", "agg_decode_tok_s"): ("bf16", "#4", 1.5),
}
CHAT_MESSAGE = ("The lighthouse keeper kept a logbook of every ship that passed the point. "
                "Write a short story about the night the lamp went out.")
STREAM_LEN_STEP = 4  # stream i's prompt is i·STEP tokens shorter than the first (HF pads them left)


@dataclass(frozen=True)
class Workload:
    chat: list[int]  # a chat prompt rendered with the model's template
    prefill: list[int]
    streams: list[list[int]]  # one prompt per concurrent stream, of different lengths
    decode_tokens: int


def make_workload(tokenizer: Tokenizer, args: argparse.Namespace) -> Workload:
    """Every prompt is token ids from picochat's tokenizer; each system is fed these ids."""
    text_ids = tokenizer.encode(read_text(None))  # the shipped sample text
    stream_len = args.stream_prompt_tokens
    needed = args.prefill_tokens + args.streams * stream_len
    if len(text_ids) < needed:
        text_ids = text_ids * (needed // len(text_ids) + 1)
    tail = text_ids[args.prefill_tokens:]
    streams = [tail[i * stream_len:][:max(stream_len - i * STREAM_LEN_STEP, 4)] for i in range(args.streams)]
    chat = tokenizer.encode_chat([{"role": "user", "content": CHAT_MESSAGE}])
    return Workload(chat, text_ids[:args.prefill_tokens], streams, args.decode_tokens)


# ------------------------------------------------------------------------------------ definitions

def decode_rate(token_times: list[float]) -> float | None:
    """(n − 1) / (last token − first token)."""
    span = token_times[-1] - token_times[0] if token_times else 0.0
    return (len(token_times) - 1) / span if span > 0 else None


def aggregate_decode_rate(token_times: list[list[float]]) -> float | None:
    """Tokens produced after every stream has its first token / time from then to the last token."""
    start = max(times[0] for times in token_times)
    end = max(times[-1] for times in token_times)
    tokens = sum(1 for times in token_times for t in times if t > start + 1e-6)  # same step → same time
    return tokens / (end - start) if end > start else None


# ---------------------------------------------------------------------------------------- systems

class Picochat:
    """picochat in process, through the Engine protocol only."""

    def __init__(self, model: Path, config: str, threads: int, work: Workload, compile: bool, device: str):
        dtype, quant = PICOCHAT_CONFIGS[config]
        budget = max(512, len(work.prefill), sum(map(len, work.streams)))  # each phase in one step
        scheduler = SchedulerConfig(max_num_seqs=max(16, len(work.streams)), max_num_batched_tokens=budget,
                                    enable_prefix_caching=False)
        self.name = f"picochat {config}"
        self.engine = LocalEngine(EngineConfig(model=str(model), dtype=dtype, threads=threads, device=device,
                                               quant=QuantConfig(quant), scheduler=scheduler, compile=compile))
        started = time.perf_counter()
        while self.engine.decode_step == "compiling":  # measure the step users get once it is built
            time.sleep(0.5)
        print(f"{self.name}: decode step {self.engine.decode_step}"
              f" (waited {time.perf_counter() - started:.0f} s)", file=sys.stderr)
        self.name += f" ({self.engine.decode_step})"

    def _params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def _timings(self, ids: list[int], max_tokens: int) -> RequestTimings:
        done = self.engine.submit(ids, self._params(max_tokens)).result()
        if done.error or done.timings is None:
            raise RuntimeError(f"{self.name}: {done.error}")
        return done.timings

    def chat(self, ids: list[int], n: int) -> tuple[float | None, float | None]:
        t = self._timings(ids, n)
        return t.ttft_s, t.decode_tok_s

    def prefill(self, ids: list[int]) -> float | None:
        return self._timings(ids, 1).prefill_tok_s

    def streams(self, prompts: list[list[int]], n: int) -> list[list[float]]:
        streams = [self.engine.submit(ids, self._params(n)) for ids in prompts]  # all queued at once
        return [token_times(stream.result().timings) for stream in streams]

    def close(self) -> None:
        self.engine.close()


def token_times(t: RequestTimings | None) -> list[float]:
    """When each output token was produced: the first token, then the inter-token gaps."""
    if t is None or t.first_token is None:
        raise RuntimeError("a picochat stream finished without timings")
    times = [t.first_token]
    for gap in t.itl:
        times.append(times[-1] + gap)
    return times


class HFTransformers:
    """HF transformers: the GGUF dequantized into ``dtype``, greedy ``generate``."""

    def __init__(self, model: Path, dtype: str, threads: int, device: str):
        from transformers import AutoModelForCausalLM, GgufConfig
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        self.name = f"HF transformers {dtype}"
        if model.is_file():  # a GGUF, dequantized into plain Linears of ``dtype``
            source = model.parent
            extra = {"gguf_file": model.name, "quantization_config": GgufConfig(dequantize=True)}
        else:
            source, extra = model, {}
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **extra).eval()
        self.device = torch.device(device)
        self.model.to(self.device)
        eos = self.model.generation_config.eos_token_id
        self.pad_id = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)

    def _generate(self, prompts: list[list[int]], n: int) -> tuple[float, list[float]]:
        """Left-padded greedy generation of exactly ``n`` tokens; returns (start, per-step token times)."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        device = self.device

        class StepClock(StoppingCriteria):  # called once per step, right after the step's tokens are chosen
            def __init__(self):
                self.times: list[float] = []

            def __call__(self, input_ids, scores, **kwargs):
                if device.type == "cuda":  # the step's tokens exist once its kernels have run
                    torch.cuda.synchronize(device)
                self.times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)

        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        clock = StepClock()
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, pad_token_id=self.pad_id,
                                stopping_criteria=StoppingCriteriaList([clock]))
        return start, clock.times

    def chat(self, ids: list[int], n: int) -> tuple[float | None, float | None]:
        start, times = self._generate([ids], n)
        return times[0] - start, decode_rate(times)

    def prefill(self, ids: list[int]) -> float | None:
        with torch.inference_mode():
            start = time.perf_counter()  # one forward filling the cache, logits of the last position only
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
            out.logits[0, -1].argmax().item()
            return len(ids) / (time.perf_counter() - start)

    def streams(self, prompts: list[list[int]], n: int) -> list[list[float]]:
        _, times = self._generate(prompts, n)
        return [times] * len(prompts)

    def close(self) -> None:
        del self.model


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: the GGUF's own blocks, one ``llama_decode``
    per step over every sequence, greedy by argmax over the logits."""

    def __init__(self, model: Path, threads: int, work: Workload):
        import llama_cpp

        self.lib = llama_cpp
        self.name = "llama.cpp"
        single = max(len(work.prefill), len(work.chat) + work.decode_tokens)
        # loads the model and a one-sequence context (for chat and prefill); verbose=False quiets both
        self.llama = llama_cpp.Llama(model_path=str(model), n_ctx=single + 16, n_batch=single, n_ubatch=single,
                                     n_threads=threads, n_threads_batch=threads, verbose=False)
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llama.context_params)  # same settings,
        params.n_seq_max = len(work.streams)  # but one KV sequence per stream
        per_stream = -(-(max(map(len, work.streams)) + work.decode_tokens) // 256) * 256  # llama.cpp pads to 256
        params.n_ctx = len(work.streams) * per_stream
        params.n_batch = params.n_ubatch = sum(map(len, work.streams))
        self.streams_ctx = llama_cpp.llama_init_from_model(self.llama.model, params)
        if not self.streams_ctx:
            raise RuntimeError("llama.cpp could not create a context for the streams")
        self.n_vocab = self.llama.n_vocab()

    def _generate(self, ctx, prompts: list[list[int]], n: int) -> tuple[float, list[list[float]]]:
        """Every prompt in one batch, then ``n − 1`` steps of one token per sequence; returns (start,
        per-sequence token times)."""
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        batch = lib.llama_batch_init(sum(map(len, prompts)), 0, 1)
        try:
            rows = [(seq, pos, token) for seq, ids in enumerate(prompts) for pos, token in enumerate(ids)]
            times: list[list[float]] = [[] for _ in prompts]
            for step in range(n):
                last = {seq: i for i, (seq, _, _) in enumerate(rows)}  # the row each sequence samples from
                batch.n_tokens = len(rows)
                for i, (seq, pos, token) in enumerate(rows):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = last[seq] == i
                if step == 0:  # the prompt ids are handed over
                    start = time.perf_counter()
                if lib.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                rows = []
                for seq, i in last.items():
                    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))
                    rows.append((seq, batch.pos[i] + 1, int(logits.argmax())))
                t = time.perf_counter()
                for seq in last:
                    times[seq].append(t)
            return start, times
        finally:
            lib.llama_batch_free(batch)

    def chat(self, ids: list[int], n: int) -> tuple[float | None, float | None]:
        start, (times,) = self._generate(self.llama.ctx, [ids], n)
        return times[0] - start, decode_rate(times)

    def prefill(self, ids: list[int]) -> float | None:
        start, (times,) = self._generate(self.llama.ctx, [ids], 1)
        return len(ids) / (times[0] - start)

    def streams(self, prompts: list[list[int]], n: int) -> list[list[float]]:
        return self._generate(self.streams_ctx, prompts, n)[1]

    def close(self) -> None:
        self.lib.llama_free(self.streams_ctx)
        self.llama.close()


# ------------------------------------------------------------------------------------- measuring

def one_pass(system: SystemProcess, work: Workload) -> dict[str, float | None]:
    """Every metric once: the chat request, the long prefill, the concurrent streams."""
    ttft, decode = system.call("chat", work.chat, work.decode_tokens)
    return {"decode_tok_s": decode, "ttft_s": ttft, "prefill_tok_s": system.call("prefill", work.prefill),
            "agg_decode_tok_s": aggregate_decode_rate(system.call("streams", work.streams, work.decode_tokens))}


def systems(args: argparse.Namespace, model: Path, notes: dict[str, str]) -> list[tuple[str, str | None]]:
    """(key, peer kind or None) of every requested system that can run here."""
    wanted = args.systems.split(",")
    out: list[tuple[str, str | None]] = []
    if "picochat" in wanted:
        out += [(f"picochat:{config}", None) for config in args.picochat_configs.split(",")]
    if "hf" in wanted:
        if find_spec("transformers") and find_spec("accelerate"):
            out.append((f"hf:{args.hf_dtype}", "hf"))
        else:
            notes["hf"] = "skipped: transformers and accelerate are not both installed"
    if "llamacpp" in wanted:
        if not find_spec("llama_cpp"):
            notes["llamacpp"] = "skipped: llama-cpp-python is not installed (pip install llama-cpp-python)"
        elif not model.is_file():
            notes["llamacpp"] = "skipped: llama.cpp needs a GGUF file"
        else:
            out.append(("llamacpp", "llamacpp"))
    return out


def make_system(key: str, args: argparse.Namespace, model: Path, work: Workload):
    kind, _, config = key.partition(":")
    if kind == "picochat":
        return Picochat(model, config, args.threads, work, not args.eager, args.device)
    if kind == "hf":
        return HFTransformers(model, config, args.threads, args.device)
    return LlamaCpp(model, args.threads, work)


class SystemProcess:
    """One system loaded in a process of its own and driven from here, a call at a time: the
    systems stay loaded together and their passes alternate, so a drift of the host's speed (up
    to ~25 % for a minute on the 2-core VM) falls on each alike; and no process holds two
    systems' OpenMP teams (which would slow both: see picochat.engine.engine.run_on_passing_thread)."""

    def __init__(self, key: str, args: argparse.Namespace, model: Path, work: Workload):
        import multiprocessing

        self.key = key
        self.conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=serve_system, args=(child, key, args, model, work), daemon=True)
        self.process.start()
        child.close()

    def ready(self) -> str:
        """The system's name once it has loaded (and built its compiled step)."""
        return self._reply()

    def call(self, method: str, *params):
        self.conn.send((method, params))
        return self._reply()

    def _reply(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.key}: its process died (exit code {self.process.exitcode})") from None
        if status == "error":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        try:
            self.conn.send(("close", ()))
        except OSError:
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def serve_system(conn, key: str, args: argparse.Namespace, model: Path, work: Workload) -> None:
    """A SystemProcess's child: load the system, then answer calls until ``close``."""
    try:
        system = make_system(key, args, model, work)
        conn.send(("ok", system.name))
    except Exception as e:  # noqa: BLE001 -- reported by the parent as this system's failure
        traceback.print_exc()
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        while True:
            method, params = conn.recv()
            if method == "close":
                break
            try:
                conn.send(("ok", getattr(system, method)(*params)))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        system.close()


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def comparisons(results: dict[str, dict[str, list[float]]], peers: dict[str, str]) -> list[dict]:
    """Every picochat config against every peer, metric by metric; ratio > 1 means picochat is better."""
    rows = []
    for peer_key, peer in peers.items():
        for key in (k for k in results if k.startswith("picochat:")):
            config = key.partition(":")[2]
            for metric, (_, _, higher_better) in METRICS.items():
                ours, theirs = median(results[key][metric]), median(results[peer_key][metric])
                ratio = None
                if ours and theirs:
                    ratio = ours / theirs if higher_better else theirs / ours
                goal_config, issue, wanted = GOALS.get((peer, metric), (None, None, None))
                goal = f">= {wanted:.2f}x ({issue})" if goal_config == config else None
                rows.append({"peer": peer_key, "picochat": config, "metric": metric, "picochat_value": ours,
                             "peer_value": theirs, "ratio": ratio, "goal": goal,
                             "met": None if goal is None or ratio is None else ratio >= wanted})
    return rows


# ---------------------------------------------------------------------------------------- report

def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.1f}" if metric == "ttft_s" else f"{value:.1f}"


def print_tables(report: dict, console) -> None:
    from rich.table import Table

    w = report["workload"]
    sizes = {"prefill": w["prefill_tokens"], "streams": w["streams"], "chat": w["chat_tokens"]}
    names = report["names"]
    for peer in dict.fromkeys(row["peer"] for row in report["comparisons"]):
        table = Table(title=f"picochat vs {names[peer]} — medians of {report['runs']} runs, "
                            f"{report['threads']} threads (ratio > 1: picochat better)")
        for column in ("metric", "picochat", "picochat figure", names[peer], "ratio", "goal"):
            table.add_column(column, justify="left" if column in ("metric", "picochat", "goal") else "right")
        for row in (r for r in report["comparisons"] if r["peer"] == peer):
            label, unit, _ = METRICS[row["metric"]]
            goal = row["goal"] or ""
            if row["met"] is not None:
                goal += " [green]met[/]" if row["met"] else " [red]not met[/]"
            table.add_row(f"{label.format(**sizes)} ({unit})", row["picochat"],
                          fmt(row["metric"], row["picochat_value"]), fmt(row["metric"], row["peer_value"]),
                          "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x", goal)
        console.print(table)
    if not report["comparisons"]:  # picochat alone, or no peer ran: its own figures
        table = Table(title="figures (no peer to compare with)")
        table.add_column("system")
        for label, unit, _ in METRICS.values():
            table.add_column(f"{label.format(**sizes)} ({unit})", justify="right")
        for key, figures in report["systems"].items():
            table.add_row(names[key], *(fmt(m, figures[m]) for m in METRICS))
        console.print(table)
    for key, note in report["notes"].items():
        console.print(f"[yellow]{key}: {note}[/]")
    console.print(f"command: {report['command']}")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "llama-cpp-python", "picochat"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="card name or GGUF file (default: %(default)s)")
    parser.add_argument("--systems", default="picochat,hf,llamacpp", help="comma list of picochat, hf, llamacpp")
    parser.add_argument("--picochat-configs", default="bf16,int8,int4",
                        help=f"comma list of {', '.join(PICOCHAT_CONFIGS)} (default: %(default)s)")
    parser.add_argument("--hf-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--runs", type=int, default=3, help="measured passes per system, after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where picochat and HF run (llama.cpp, as installed here, runs on the CPU)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-prompt-tokens", type=int, default=64, help="the longest stream's prompt")
    parser.add_argument("--eager", action="store_true",
                        help="picochat without its compiled decode step (default: wait until it is built)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every path")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    args = parser.parse_args(argv)
    if args.quick:
        args.decode_tokens, args.prefill_tokens, args.stream_prompt_tokens = 8, 32, 16
    unknown = set(args.systems.split(",")) - {"picochat", "hf", "llamacpp"}
    unknown |= set(args.picochat_configs.split(",")) - set(PICOCHAT_CONFIGS)
    if unknown:
        parser.error(f"unknown system or config: {', '.join(sorted(unknown))}")
    if min(args.runs, args.threads, args.decode_tokens - 1, args.prefill_tokens, args.streams) < 1:
        parser.error("--runs, --threads, --prefill-tokens and --streams must be >= 1, --decode-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    log = Console(stderr=True)
    resolved = resolve_model(args.model, fetch=True)
    model, template = resolved.path, resolved.card.chat_template if resolved.card else None
    tokenizer = Tokenizer.from_gguf(model, template) if model.is_file() else Tokenizer.from_hf_dir(model, template)
    work = make_workload(tokenizer, args)
    notes: dict[str, str] = {}
    results: dict[str, dict[str, list[float]]] = {}
    names: dict[str, str] = {}
    peers: dict[str, str] = {}

    running: dict[str, SystemProcess] = {}
    keys = systems(args, model, notes)
    log.print(f"loading {', '.join(key for key, _ in keys)}, each in a process of its own")
    for key, _ in keys:
        running[key] = SystemProcess(key, args, model, work)
    for key, peer in keys:
        try:
            names[key] = running[key].ready()
            results[key] = {metric: [] for metric in METRICS}
            if peer:
                peers[key] = peer
        except RuntimeError as e:
            notes[key] = f"failed: {e}"
            running.pop(key).close()
    log.print(f"measuring: {args.runs} passes after a warm-up, the systems taking turns")
    try:
        for run in range(args.runs + 1):  # pass 0 warms caches, allocators and lazy initialisation up
            for key in list(running):
                try:
                    figures = one_pass(running[key], work)
                except RuntimeError as e:  # one broken system must not lose the others' figures
                    notes[key] = f"failed: {e}"
                    running.pop(key).close()
                    del results[key]
                    peers.pop(key, None)
                    continue
                for metric, value in figures.items():
                    if run and value is not None:
                        results[key][metric].append(value)
    finally:
        for system in running.values():
            system.close()
    report = {
        "command": shlex.join(["python", *sys.argv]), "model": str(model), "threads": args.threads,
        "device": args.device,
        "runs": args.runs, "versions": versions(),
        "workload": {"chat_tokens": len(work.chat), "prefill_tokens": len(work.prefill),
                     "streams": len(work.streams), "stream_prompt_tokens": [len(p) for p in work.streams],
                     "decode_tokens": work.decode_tokens},
        "names": names,
        "systems": {key: {**{m: median(v) for m, v in samples.items()}, "samples": samples}
                    for key, samples in results.items()},
        "comparisons": comparisons(results, peers),
        "notes": notes,
    }
    print_tables(report, log if args.json else Console())
    if args.json:
        print(json.dumps(report))
    return 1 if any(note.startswith("failed") for note in notes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
