"""The ``picochat`` command: the console (default), ``chat``, ``generate``, ``bench``, ``serve``,
``eval`` and ``models``. Commands build an EngineConfig from shared flags and talk to the engine
only through the Engine protocol. Every user mistake ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer

from picochat.config import EngineConfig, QuantConfig, SamplingParams, SchedulerConfig, SpecConfig
from picochat.errors import PicochatError

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="picochat: chat with a local LLM engine and watch it work.")
models_app = typer.Typer(help="List and fetch models.", pretty_exceptions_enable=False)
eval_app = typer.Typer(help="Quality harness.", pretty_exceptions_enable=False)
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")

# ------------------------------------------------------------------ shared engine and sampling flags

ENGINE_OPTIONS = {
    "model": (str, typer.Option("--model", "-m", help="Model card name, GGUF file or HF directory."),
              "smollm2-135m-instruct"),
    "dtype": (str, typer.Option("--dtype", help="float32 | bfloat16 | float16."), "float32"),
    "quant": (str, typer.Option("--quant", help="Weight quantization: none | int8 | int4."), "none"),
    "quant_group": (int, typer.Option("--quant-group", help="int4 group size: 32 | 64 | 128."), 32),
    "attention": (str, typer.Option("--attention", help="auto | triton | sdpa | reference."), "auto"),
    "threads": (Optional[int], typer.Option("--threads", help="torch CPU threads (default: all cores)."), None),
    "compile": (Optional[bool], typer.Option("--compile/--no-compile",
                help="Build the fast decode step in the background: torch.compile on a CPU, CUDA graphs on "
                     "a GPU (default: on for serve, bench and generate unless PICOCHAT_COMPILE=0; "
                     "in the console CUDA graphs only)."), None),
    "max_model_len": (Optional[int], typer.Option("--max-model-len", help="Context length cap."), None),
    "max_num_seqs": (int, typer.Option("--max-num-seqs", help="Sequences per step."), 16),
    "max_num_batched_tokens": (int, typer.Option("--max-batched-tokens", help="Token budget per step."), 512),
    "block_size": (int, typer.Option("--block-size", help="Tokens per KV block."), 16),
    "kv_cache_mb": (Optional[int], typer.Option("--kv-cache-mb", help="KV cache memory budget in MiB."), None),
    "no_prefix_cache": (bool, typer.Option("--no-prefix-cache", help="Disable prefix caching."), False),
    "spec": (str, typer.Option("--spec", help="Speculative decoding: off | ngram | draft."), "off"),
    "spec_k": (int, typer.Option("--spec-k", help="Draft tokens per step."), 4),
    "draft_model": (Optional[str], typer.Option("--draft-model", help="Draft model for --spec draft."), None),
}

SAMPLING_OPTIONS = {
    "temperature": (float, typer.Option("--temperature", "-t", help="0 = greedy."), 0.0),
    "top_p": (float, typer.Option("--top-p"), 1.0),
    "top_k": (int, typer.Option("--top-k", help="-1 = off."), -1),
    "min_p": (float, typer.Option("--min-p"), 0.0),
    "repetition_penalty": (float, typer.Option("--repetition-penalty"), 1.0),
    "presence_penalty": (float, typer.Option("--presence-penalty"), 0.0),
    "frequency_penalty": (float, typer.Option("--frequency-penalty"), 0.0),
    "seed": (Optional[int], typer.Option("--seed"), None),
    "max_tokens": (int, typer.Option("--max-tokens", "-n", help="Tokens to generate at most."), 256),
    "stop": (Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable)."), None),
}


def with_options(*groups: dict):
    """Append the parameters of ``groups`` to a command's signature; the command receives them in
    ``**opts``. One definition of each flag serves every command."""

    def decorate(func):
        sig = inspect.signature(func, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        for group in groups:
            for name, (type_, option, default) in group.items():
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                                default=default, annotation=Annotated[type_, option]))

        @wraps(func)
        def wrapper(*args, **kwargs):
            return func(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def engine_config(opts: dict) -> EngineConfig:
    compile_flag = {} if opts["compile"] is None else {"compile": opts["compile"]}
    return EngineConfig(
        model=opts["model"], dtype=opts["dtype"], threads=opts["threads"],
        attention=opts["attention"],
        max_model_len=opts["max_model_len"],
        scheduler=SchedulerConfig(max_num_seqs=opts["max_num_seqs"],
                                  max_num_batched_tokens=opts["max_num_batched_tokens"],
                                  block_size=opts["block_size"], kv_cache_memory_mb=opts["kv_cache_mb"],
                                  enable_prefix_caching=not opts["no_prefix_cache"]),
        quant=QuantConfig(mode=opts["quant"], group_size=opts["quant_group"]),
        spec=SpecConfig(mode=opts["spec"], k=opts["spec_k"], draft_model=opts["draft_model"]),
        **compile_flag,
    ).validate()


def sampling_params(opts: dict) -> SamplingParams:
    return SamplingParams(**{k: opts[k] for k in SAMPLING_OPTIONS if k != "stop"},
                          stop=tuple(opts["stop"] or ())).validate()


def start_engine(config: EngineConfig, quiet: bool = False):
    """Load the model, with a progress line on stderr where it is a terminal."""
    from picochat.engine.engine import LocalEngine

    if quiet or not sys.stderr.isatty():  # no carriage-return progress in a log or a pipe
        return LocalEngine(config)

    def progress(description: str, fraction: float | None) -> None:
        pct = f" {fraction * 100:5.1f}%" if fraction is not None else ""
        print(f"\r\033[K{description}{pct}", end="", file=sys.stderr, flush=True)

    try:
        return LocalEngine(config, progress=progress)
    finally:  # cleared before the first token, or before the one-line error of a failed load
        print("\r\033[K", end="", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- commands

@app.callback(invoke_without_command=True)
@with_options(ENGINE_OPTIONS)
def console(ctx: typer.Context,
            url: Annotated[Optional[str], typer.Option("--url", help="Attach to an OpenAI-compatible server.")] = None,
            api_key: Annotated[Optional[str], typer.Option("--api-key", help="API key for --url.")] = None,
            **opts) -> None:
    """Open the console (the default command)."""
    if ctx.invoked_subcommand is None:
        _run_console({"url": url, "api_key": api_key, **opts}, resume=False, plain=False)


@app.command()
@with_options(ENGINE_OPTIONS, SAMPLING_OPTIONS)
def chat(resume: Annotated[bool, typer.Option("--resume", help="Reopen the last transcript.")] = False,
         plain: Annotated[bool, typer.Option("--plain", help="Line REPL for dumb terminals and pipes.")] = False,
         system: Annotated[Optional[str], typer.Option("--system", help="System prompt (--plain).")] = None,
         url: Annotated[Optional[str], typer.Option("--url", help="Attach to an OpenAI-compatible server.")] = None,
         api_key: Annotated[Optional[str], typer.Option("--api-key", help="API key for --url.")] = None,
         **opts) -> None:
    """Chat in the console, or in a plain line REPL."""
    _run_console({"url": url, "api_key": api_key, **opts}, resume=resume, plain=plain, system=system)


def _run_console(opts: dict, resume: bool, plain: bool, system: str | None = None) -> None:
    """The Textual console, or with ``plain`` the line REPL (which takes the sampling flags)."""
    if opts.get("url"):
        from picochat.remote import RemoteEngine

        def factory(progress=None):
            return RemoteEngine(opts["url"], api_key=opts.get("api_key"))
    else:
        # the console builds only CUDA graphs (seconds) unless asked: torch.compile beside it on a
        # 2-core box delayed the first reply by 15-20 s for the minutes the build takes
        config = dataclasses.replace(engine_config(opts), compile=opts["compile"])

        def factory(progress=None):  # in a process of its own: the UI's Python never holds up a step
            from picochat.engine.process import EngineProcess
            return EngineProcess(config, progress=progress)
    if plain:
        from picochat.tui.plain import run_plain
        engine = factory()
        try:
            raise typer.Exit(run_plain(engine, system_prompt=system, params=sampling_params(opts)))
        finally:
            engine.close()
    from picochat.tui.app import run
    run(factory, resume=resume)


@app.command()
@with_options(ENGINE_OPTIONS, SAMPLING_OPTIONS)
def generate(prompt: Annotated[Optional[str], typer.Argument(help="The user message.")] = None,
             system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
             messages: Annotated[Optional[Path], typer.Option("--messages", help="JSON list of {role, content}.")] = None,
             raw: Annotated[bool, typer.Option("--raw", help="Send PROMPT as raw text, no chat template.")] = False,
             as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
             **opts) -> None:
    """Generate a reply, streamed to stdout."""
    from picochat.generate import build_prompt, run_generate

    chat_prompt = build_prompt(prompt, system, messages, raw)
    params = sampling_params(opts)
    engine = start_engine(engine_config(opts), quiet=as_json)
    try:
        raise typer.Exit(run_generate(engine, chat_prompt, params, as_json))
    finally:
        engine.close()


@app.command()
@with_options(ENGINE_OPTIONS)
def bench(url: Annotated[Optional[str], typer.Option("--url", help="Benchmark an OpenAI-compatible server.")] = None,
          api_key: Annotated[Optional[str], typer.Option("--api-key")] = None,
          served_model: Annotated[Optional[str], typer.Option("--served-model", help="Model name for --url.")] = None,
          concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Requests in flight at most.")] = 1,
          num_prompts: Annotated[int, typer.Option("--num-prompts", help="Requests in all.")] = 3,
          request_rate: Annotated[float, typer.Option("--request-rate", help="Poisson arrivals per second (inf = all at once).")] = float("inf"),
          input_len: Annotated[str, typer.Option("--input-len", help="Prompt tokens: N or MIN:MAX.")] = "128",
          output_len: Annotated[str, typer.Option("--output-len", help="Output tokens: N or MIN:MAX.")] = "128",
          seed: Annotated[int, typer.Option("--seed")] = 0,
          warmup: Annotated[int, typer.Option("--warmup", help="Unmeasured warm-up requests.")] = 1,
          goodput: Annotated[Optional[list[str]], typer.Option("--goodput", help="SLO such as ttft:500 or tpot:50 (ms).")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Last stdout line: one JSON object.")] = False,
          **opts) -> None:
    """Measure TTFT, TPOT, ITL, latency and throughput (vLLM bench serve's definitions)."""
    from picochat.bench.loadgen import BenchConfig, parse_len, run_bench

    cfg = BenchConfig(concurrency=concurrency, num_prompts=num_prompts, request_rate=request_rate,
                      input_len=parse_len(input_len), output_len=parse_len(output_len), seed=seed,
                      warmup=warmup, goodput=tuple(goodput or ()))
    if url:
        from picochat.remote import RemoteEngine
        engine = RemoteEngine(url, api_key=api_key, model=served_model)
    else:
        engine = start_engine(engine_config(opts), quiet=as_json)
    try:
        run_bench(engine, cfg, as_json=as_json)
    finally:
        engine.close()


@app.command()
@with_options(ENGINE_OPTIONS)
def serve(host: Annotated[str, typer.Option("--host", help="Bind address (loopback by default).")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port")] = 8000,
          api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require this bearer key.")] = None,
          **opts) -> None:
    """Serve the engine over an OpenAI-compatible HTTP API with Prometheus /metrics."""
    from picochat.engine.engine import LocalEngine
    from picochat.server.app import serve as serve_http

    config = engine_config(opts)
    serve_http(lambda: LocalEngine(config), host=host, port=port, api_key=api_key, model_name=config.model)


@models_app.command("list")
def models_list() -> None:
    """Known model cards and whether each is cached."""
    from rich.console import Console
    from rich.table import Table

    from picochat.model import registry

    table = Table("name", "params", "arch", "cached", "draft", "description")
    for card in registry.list_cards():
        table.add_row(card.name, str(card.params or ""), card.architecture or "",
                      "yes" if registry.is_cached(card) else "no", card.draft_model or "", card.description or "")
    Console().print(table)


@models_app.command("fetch")
def models_fetch(name: Annotated[str, typer.Argument(help="Model card name.")]) -> None:
    """Download a model into the cache."""
    from rich.progress import Progress

    from picochat.model import registry

    card = registry.get_card(name)
    with Progress() as bar:
        task = bar.add_task(f"fetching {name}", total=1.0)

        def progress(description: str, fraction: float | None) -> None:
            bar.update(task, description=description, completed=fraction or 0.0)

        path = registry.fetch(card, progress=progress)
    print(path)


@eval_app.command("ppl")
@with_options(ENGINE_OPTIONS)
def eval_ppl(text: Annotated[Optional[Path], typer.Option("--text", help="UTF-8 text file (default: the shipped sample).")] = None,
             window: Annotated[int, typer.Option("--window", help="Tokens per window.")] = 512,
             stride: Annotated[Optional[int], typer.Option("--stride", help="Tokens between window starts (default: half a window).")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
             **opts) -> None:
    """Perplexity of the model over a text, with a sliding window."""
    from picochat.evaluate import load_for_eval, perplexity, read_text

    config = engine_config(opts)
    content = read_text(text)
    model, tokenizer = load_for_eval(config)
    token_ids = tokenizer.encode(content)
    stride = window // 2 if stride is None else stride
    ppl = perplexity(model, token_ids, window=window, stride=stride)
    if as_json:
        print(json.dumps({"perplexity": ppl, "tokens": len(token_ids), "window": window, "stride": stride,
                          "model": config.model, "dtype": config.dtype, "quant": config.quant.mode,
                          "quant_group": config.quant.group_size}))
    else:
        print(f"perplexity {ppl:.4f} over {len(token_ids)} tokens (window {window}, stride {stride})")


def main() -> None:
    try:
        app()
    except PicochatError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
