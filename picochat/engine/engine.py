"""LocalEngine: the Engine protocol in process. The engine loop runs on its own thread.

Callers (TUI, CLI, server, benchmarks) talk to it only through the protocol: ``submit`` validates
and queues a request on a thread-safe inbox and returns its Stream; the loop thread drains the
inbox, runs ``scheduler.schedule() → runner.execute() → sampler → outputs`` and pushes Deltas.
Settings changed by ``reconfigure`` are applied between steps. The engine knows nothing about
how its output is shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import queue
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from picochat.config import EngineConfig, QuantConfig, SamplingParams, SchedulerConfig, SpecConfig
from picochat.engine import sampling
from picochat.engine.cuda_graphs import CudaGraphDecode
from picochat.engine.kv_cache import KVCacheManager
from picochat.engine.outputs import OutputProcessor
from picochat.engine.protocol import (Delta, EngineInfo, MetricsSnapshot, Prompt, RequestTimings,
                                      Stream, now)
from picochat.engine.request import Request
from picochat.engine.runner import ModelRunner
from picochat.engine.scheduler import Scheduler, SchedulerOutput
from picochat.engine.spec.proposer import ProposerTarget, make_proposer
from picochat.engine.spec.rejection import verify_batch
from picochat.errors import (ConfigError, EngineClosedError, PromptTooLongError,
                             QueueFullError)
from picochat.kernels import dispatch
from picochat.model.transformer import Transformer
from picochat.progress import ProgressFn

log = logging.getLogger("picochat.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
THROUGHPUT_WINDOW_S = 2.0
RECENT_REQUESTS = 64
IDLE_BEFORE_COMPILE_S = 1.0  # the compiled step is built after this long without work


@dataclass
class LoadedModel:
    name: str
    model: Transformer
    tokenizer: object  # picochat.model.tokenizer.Tokenizer
    path: Path | None = None  # the checkpoint, for rebuilding linears on a live quant switch


def load_model(config: EngineConfig, device: torch.device, progress: ProgressFn | None = None) -> LoadedModel:
    """Resolve a card name or path, fetch if needed, and build the (quantized) transformer."""
    from picochat.model import registry
    from picochat.model.build import build_transformer

    resolved = registry.resolve_model(config.model, fetch=True, progress=progress)
    if progress:
        progress(f"Loading {resolved.path.name}", None)
    template = resolved.card.chat_template if resolved.card else None
    model, tokenizer = build_transformer(resolved.path, DTYPES[config.dtype], config.quant, device,
                                         chat_template=template, progress=progress)
    name = resolved.card.name if resolved.card else resolved.path.name
    return LoadedModel(name, model, tokenizer, resolved.path)


@contextlib.contextmanager
def fits_in_memory(device: torch.device, what: str, remedy: str):
    """An allocation of ``what`` that ``device`` cannot hold becomes a one-line ConfigError."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError, CUDA's "out of memory", the CPU allocator's
        if not any(s in str(e) for s in ("out of memory", "can't allocate memory")):
            raise
        where = "GPU" if device.type == "cuda" else "host"
        raise ConfigError(f"out of {where} memory for {what} on {device}: {remedy}") from None


def run_on_passing_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` on a thread that ends with it; its exception is raised here.

    Each thread that runs a parallel torch op keeps a team of OpenMP workers for as long as it
    lives, and once a process holds more such threads than CPUs, libgomp makes every team's
    workers sleep at each barrier instead of spinning: ~2,500 futex sleeps per 512-token prefill
    here and ~10 % of its speed, for the rest of the process. The engine's torch work therefore
    runs on the engine thread; loading, which the caller's thread would otherwise do, runs on a
    passing thread whose team ends with it.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the caller
            failure.append(e)

    thread = threading.Thread(target=run, name="picochat-load", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


class LocalEngine:
    def __init__(self, config: EngineConfig, progress: ProgressFn | None = None,
                 loaded: LoadedModel | None = None):
        self.config = config.validate()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = torch.device(
            "cuda" if config.device == "auto" and torch.cuda.is_available() else
            ("cpu" if config.device == "auto" else config.device))
        self.dtype = DTYPES[config.dtype]
        run_on_passing_thread(lambda: self._load(progress, loaded))
        # built once the loop has been idle a moment, so it never slows the requests of a start
        # that comes with work (the first token of ``picochat generate``)
        self._compile_pending = self._builds_fast_step

        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._num_waiting_submitted = 0
        self._counters = dict(prompt_tokens=0, generation_tokens=0, finished=0,
                              spec_drafts=0, spec_draft_tokens=0, spec_accepted=0)
        self._accepted_per_pos = [0] * 16
        self._steps: deque[tuple[float, float, int, int, int]] = deque()  # (t, dur, prefill, decode, tokens)
        self._recent: deque[RequestTimings] = deque(maxlen=RECENT_REQUESTS)
        # what is loaded now lives as long as the engine: out of the collector's reach, so that a
        # full collection (~100 ms with torch imported, on this 2-core host) cannot stall a step or
        # a reader (a TTFT or keystroke 20-30 ms late); garbage is collected first, not frozen
        gc.collect()
        gc.freeze()
        self._thread = threading.Thread(target=self._loop, name="picochat-engine", daemon=True)
        self._thread.start()

    def _load(self, progress: ProgressFn | None, loaded: LoadedModel | None) -> None:
        """The model, its kernels, the KV cache and the proposer (on a passing thread: see
        ``run_on_passing_thread``)."""
        from picochat.model.quantize import weight_bytes

        config = self.config
        with fits_in_memory(self.device, "the model's weights", "free memory or pick --quant int4"):
            loaded = loaded or load_model(config, self.device, progress)
            self.model = loaded.model.to(self.device)  # a no-op for load_model's; a handed-in model moves
        self._weight_bytes = weight_bytes(self.model)  # for metrics(), polled twice a second: kept, not walked
        self.model_name = loaded.name
        self.model_path = loaded.path
        self.tokenizer = loaded.tokenizer
        mcfg = self.model.config
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings,
                                 mcfg.max_position_embeddings)
        self.attention_backend = self._resolve_attention(config.attention)
        self.model.select_kernels(self.attention_backend, self.device)
        self._activity: str | None = None  # a background change in progress, for the status bar

        sched_cfg = config.scheduler
        self.kv = KVCacheManager(self._num_kv_blocks(sched_cfg), sched_cfg.block_size,
                                 sched_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.kv)
        kv_mib = self.kv.num_blocks * ModelRunner.kv_bytes_per_block(mcfg, sched_cfg.block_size, self.dtype) >> 20
        with fits_in_memory(self.device, f"a KV cache of {kv_mib} MiB", "free memory or lower --kv-cache-mb"):
            self.runner = ModelRunner(self.model, self.kv, self.dtype, self.device)
        self.outputs = OutputProcessor(self.tokenizer)
        self.proposer = make_proposer(config.spec, self._proposer_target())

    # ----------------------------------------------------------------------------- protocol
    @property
    def info(self) -> EngineInfo:
        s = self.scheduler.config
        return EngineInfo(
            model=self.model_name, dtype=self.config.dtype, quant=self.config.quant.mode,
            device=str(self.device), attention=self.attention_backend, max_model_len=self.max_model_len,
            spec=self.config.spec.mode, max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            unsupported={"model": "switching models needs a restart: picochat --model NAME"})

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(self._prompt_ids(prompt))

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
               arrival: float | None = None) -> Stream:
        if self._closed:
            raise EngineClosedError("the engine is shut down")
        params.validate()
        ids = self._prompt_ids(prompt)
        if not ids:
            raise PromptTooLongError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt is {len(ids)} tokens; the context holds {self.max_model_len} "
                f"(prompt plus at least one new token)")
        max_total = min(len(ids) + params.max_tokens, self.max_model_len)
        if max_total > self.kv.capacity_tokens:
            raise PromptTooLongError(
                f"request needs {max_total} tokens of KV cache; the pool holds {self.kv.capacity_tokens} "
                f"(raise --kv-cache-mb or lower max_tokens)")
        with self._lock:
            if self._num_waiting_submitted >= self.scheduler.config.max_waiting:
                raise QueueFullError(f"{self._num_waiting_submitted} requests are queued; try again later")
            self._num_waiting_submitted += 1
        request_id = request_id or f"req-{next(self._ids)}"
        stream = Stream(request_id, self.cancel)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                    else frozenset(self.tokenizer.stop_token_ids))
        req = Request(request_id=request_id, token_ids=list(ids), num_prompt_tokens=len(ids),
                      params=params, max_total_tokens=max_total, stream=stream,
                      timings=RequestTimings(request_id, arrival=now() if arrival is None else arrival,
                                             prompt_tokens=len(ids)),
                      stop_token_ids=stops, generator=sampling.make_generator(params.seed))
        self._inbox.put(("add", req))
        return stream

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def reconfigure(self, **changes) -> None:
        unknown = set(changes) - {"attention", "max_num_seqs", "max_num_batched_tokens", "quant", "spec", "model"}
        if unknown:
            raise ConfigError(f"cannot reconfigure {', '.join(sorted(unknown))}")
        if "model" in changes and changes["model"] != self.config.model:
            raise ConfigError(self.info.unsupported["model"])
        if "spec" in changes and changes["spec"].validate().mode == "draft":
            from picochat.model import registry
            registry.resolve_model(changes["spec"].draft_model, fetch=False)  # fails now if it is unknown
        if "attention" in changes:
            self._resolve_attention(changes["attention"])
        budgets = {k: changes.pop(k) for k in ("max_num_seqs", "max_num_batched_tokens") if k in changes}
        if budgets:  # the step budgets change live; block size and KV memory are fixed at start
            changes["scheduler"] = dataclasses.replace(self.scheduler.config, **budgets).validate()
        if "quant" in changes:
            changes["quant"].validate()
            if self.model_path is None:
                raise ConfigError("this model was built in memory; its weights cannot be re-quantized")
        self._inbox.put(("reconfigure", changes))

    def metrics(self) -> MetricsSnapshot:
        from picochat import system

        t = now()
        with self._lock:
            steps = [s for s in self._steps if s[0] >= t - THROUGHPUT_WINDOW_S]
            recent = tuple(r.copy() for r in self._recent)
            counters = dict(self._counters)
            running, waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        prefill_time = sum(s[1] for s in steps if s[2])
        decode_time = sum(s[1] for s in steps if s[3])
        stats = self.kv.stats
        return MetricsSnapshot(
            time=t, num_requests_running=running, num_requests_waiting=waiting,
            num_preemptions_total=self.scheduler.num_preemptions,
            kv_cache_usage_perc=self.kv.usage, kv_blocks_used=self.kv.num_blocks - self.kv.num_free_blocks,
            kv_blocks_total=self.kv.num_blocks,
            prefix_cache_queries_total=stats.queries, prefix_cache_hits_total=stats.hits,
            prompt_tokens_total=counters["prompt_tokens"], generation_tokens_total=counters["generation_tokens"],
            requests_finished_total=counters["finished"],
            prefill_tok_s=sum(s[2] for s in steps) / prefill_time if prefill_time else 0.0,
            decode_tok_s=sum(s[3] for s in steps) / decode_time if decode_time else 0.0,
            tokens_per_step=float(steps[-1][4]) if steps else 0.0,
            spec_decode_num_drafts_total=counters["spec_drafts"],
            spec_decode_num_draft_tokens_total=counters["spec_draft_tokens"],
            spec_decode_num_accepted_tokens_total=counters["spec_accepted"],
            spec_decode_accepted_per_pos=tuple(self._accepted_per_pos[:self.config.spec.k]),
            weight_bytes=self._weight_bytes, quant=self.config.quant.mode, activity=self._activity,
            memory=system.device_stats(), recent_requests=recent)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put(("close", None))
            self._thread.join(timeout=10)
            gc.unfreeze()  # what was frozen at load can be collected again (and at exit)

    # ------------------------------------------------------------------------------ helpers
    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(prompt, add_generation_prompt=True)  # type: ignore[arg-type]
        ids = list(prompt)  # type: ignore[arg-type]
        vocab = self.model.config.vocab_size
        if any(not isinstance(i, int) or not 0 <= i < vocab for i in ids):
            raise ConfigError(f"token ids must be integers in [0, {vocab})")
        return ids

    def _proposer_target(self) -> ProposerTarget:
        return ProposerTarget(self.model.config.vocab_size, self.dtype, self.device)

    def _start_spec_switch(self, spec: SpecConfig) -> None:
        """Build the proposer (a draft model loads for seconds) on a helper thread; the loop
        installs it between two steps."""

        def work() -> None:
            try:
                self._activity = f"preparing {spec.mode} speculation"
                self._inbox.put(("set_proposer", (spec, make_proposer(spec, self._proposer_target()))))
            except Exception as e:  # reported in the status line; the old proposer keeps serving
                log.error("speculation switch failed:\n%s", traceback.format_exc())
                self._activity = f"speculation switch failed: {e}"

        threading.Thread(target=work, name="picochat-spec", daemon=True).start()

    def _resolve_attention(self, name: str) -> str:
        try:
            return dispatch.resolve_attention_backend(name, self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _num_kv_blocks(self, cfg: SchedulerConfig) -> int:
        per_block = ModelRunner.kv_bytes_per_block(self.model.config, cfg.block_size, self.dtype)
        if cfg.num_kv_blocks is not None:
            blocks = cfg.num_kv_blocks
        else:
            budget = self._kv_budget(cfg, per_block)
            blocks = budget // per_block
            if blocks < 1:
                raise ConfigError(f"KV cache budget of {budget >> 20} MiB holds no block of {per_block} bytes")
        if self.device.type == "cuda":
            total = torch.cuda.mem_get_info(self.device)[1]
        else:
            import psutil
            total = psutil.virtual_memory().total
        if blocks * per_block > total:  # the pool's bookkeeping alone would exhaust the host
            raise ConfigError(f"a KV cache of {blocks * per_block >> 20} MiB does not fit the "
                              f"{total >> 20} MiB of {self.device}: lower --kv-cache-mb")
        return int(blocks)

    def _kv_budget(self, cfg: SchedulerConfig, per_block: int) -> int:
        """Bytes for the KV pool: the configured budget, else sized from the device's free memory."""
        if cfg.kv_cache_memory_mb is not None:
            return cfg.kv_cache_memory_mb << 20
        if self.device.type == "cuda":
            # half the free memory, at most what holds every sequence at full length twice over
            # (the rest of the pool would only keep prefixes, and a small model needs no 40 GB)
            free, _ = torch.cuda.mem_get_info(self.device)
            full = per_block * -(-self.max_model_len // cfg.block_size) * cfg.max_num_seqs
            return min(int(free * 0.5), 2 * full)
        import psutil
        budget = min(1 << 30, psutil.virtual_memory().available // 10)
        return max(budget, per_block * (self.max_model_len // cfg.block_size + 1))

    @property
    def decode_step(self) -> str:
        """How decode-only steps run: ``eager`` (compilation off or unavailable), ``compiling``,
        ``compiled`` (CPU), ``cuda graphs`` (GPU) or ``eager (compilation failed)``."""
        compiled = self.runner.compiled
        if self._compile_pending:
            return "compiling"
        if compiled is None:
            return "eager"
        if compiled.failed:
            return "eager (compilation failed)"
        if not compiled.ready:
            return "compiling"
        return "cuda graphs" if isinstance(compiled, CudaGraphDecode) else "compiled"

    @property
    def _builds_fast_step(self) -> bool:
        compile = self.config.compile
        return self.device.type == "cuda" if compile is None else compile

    def _rebuild_compiled(self) -> None:
        """The compiled step holds the modules and kernels it traced: after a change to either,
        serve eagerly and build it anew once the loop is idle."""
        self.runner.compiled = None
        self._compile_pending = self._builds_fast_step

    def _start_compile(self) -> None:
        """Build the fast decode step: compiled on a helper thread (the eager step serves
        meanwhile), or CUDA graphs captured here and now."""
        building = "compiling the decode step (serving eagerly meanwhile)"

        def done(compiled, error: str | None) -> None:
            if self._activity == building and self.runner.compiled is compiled:  # not a replaced build
                self._activity = error

        self._activity = building
        if not self.runner.compile_decode(done, self.attention_backend, self.max_model_len,
                                          self.config.scheduler.max_num_seqs):
            self._activity = None

    def _start_quant_switch(self, quant: QuantConfig) -> None:
        """Build the new linears on a helper thread while the old ones keep serving; the loop
        swaps them in between two steps."""
        from picochat.model.build import prepare_linears

        def progress(description: str, fraction: float | None) -> None:
            self._activity = description + (f" {fraction:.0%}" if fraction is not None else "")

        def work() -> None:
            try:
                progress(f"preparing {quant.mode} weights", 0.0)
                linears = prepare_linears(self.model_path, self.dtype, quant, self.device, progress)
                self._inbox.put(("swap_linears", (quant, linears)))
            except Exception as e:  # reported in the status line; the old weights keep serving
                log.error("quantization switch failed:\n%s", traceback.format_exc())
                self._activity = f"quantization switch failed: {e}"

        threading.Thread(target=work, name="picochat-quantize", daemon=True).start()

    # --------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        last_step = now()
        while True:
            idle = not self.scheduler.has_work
            if self._compile_pending and idle and now() - last_step >= IDLE_BEFORE_COMPILE_S:
                self._start_compile()
                self._compile_pending = False  # only now: decode_step reads "compiling" throughout
            wait = IDLE_BEFORE_COMPILE_S if idle and self._compile_pending else None
            if not self._drain_inbox(block=idle, timeout=wait):
                break
            if not self.scheduler.has_work:
                continue
            if self.proposer is not None:
                decoding = [r for r in self.scheduler.running if r.num_computed_tokens == r.num_tokens - 1]
                try:
                    self.proposer.propose(decoding)
                except Exception as e:  # a bug: fail the requests it drafted for, keep serving the rest
                    self._fail(decoding, e)
                    continue
            sched = self.scheduler.schedule()
            if not sched.chunks:
                self._drain_inbox(block=True, timeout=0.005)
                continue
            started = last_step = now()
            try:
                logits, rows = self.runner.execute(sched)
                self._process(sched, logits, rows, started)
            except Exception as e:  # a bug: fail this step's requests, keep serving the rest
                self._fail([chunk.request for chunk in sched.chunks], e)

    def _fail(self, requests: list[Request], e: Exception) -> None:
        log.error("engine step failed:\n%s", traceback.format_exc())
        for req in requests:
            self._finish(req, "error", error=f"internal error: {type(e).__name__}: {e}")

    def _drain_inbox(self, block: bool, timeout: float | None = None) -> bool:
        """Apply queued commands; returns False when the engine must stop."""
        try:
            item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, payload = item
            if kind == "close":
                for req in list(self._requests.values()):
                    self._finish(req, "cancelled")
                return False
            if kind == "add":
                self._requests[payload.request_id] = payload
                self.scheduler.add(payload)
                with self._lock:
                    self._num_waiting_submitted -= 1
            elif kind == "cancel":
                req = self._requests.get(payload)
                if req is not None:
                    self._finish(req, "cancelled")
            elif kind == "reconfigure":
                self._apply_changes(payload)
            elif kind == "swap_linears":
                self._swap_linears(*payload)
            elif kind == "set_proposer":
                self._set_proposer(*payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply_changes(self, changes: dict) -> None:
        if "attention" in changes:
            self.attention_backend = self._resolve_attention(changes["attention"])
            self.model.select_kernels(self.attention_backend, self.device)
            self.config = dataclasses.replace(self.config, attention=changes["attention"])
            self._rebuild_compiled()
        if "scheduler" in changes:
            self.scheduler.config = changes["scheduler"]
            self.config = dataclasses.replace(self.config, scheduler=changes["scheduler"])
        if "quant" in changes and changes["quant"] != self.config.quant:
            self._start_quant_switch(changes["quant"])
        if "spec" in changes:
            self._start_spec_switch(changes["spec"])

    def _set_proposer(self, spec: SpecConfig, proposer) -> None:
        self.proposer = proposer
        for req in self.scheduler.running:  # drafts of the old proposer are not verified
            req.spec_token_ids = []
        self.config = dataclasses.replace(self.config, spec=spec)
        self._activity = None

    def _swap_linears(self, quant: QuantConfig, linears: dict) -> None:
        from picochat.model.quantize import swap_linears, weight_bytes

        swap_linears(self.model, linears)  # the old modules are dropped here and freed
        self._weight_bytes = weight_bytes(self.model)
        self.config = dataclasses.replace(self.config, quant=quant)
        self._activity = None
        self._rebuild_compiled()

    def _process(self, sched: SchedulerOutput, logits: torch.Tensor, rows: list[int], started: float) -> None:
        tokens = self._sample(sched, logits, rows)
        t = now()
        prefill_tokens = decode_tokens = 0
        for chunk, new_tokens in zip(sched.chunks, tokens):
            req = chunk.request
            drafts = req.spec_token_ids
            if not new_tokens:  # a prefill chunk that does not reach the end of the prompt
                prefill_tokens += chunk.num_new_tokens
                req.num_computed_tokens += chunk.num_new_tokens
                self.kv.cache_full_blocks(req.request_id, req.token_ids, req.num_computed_tokens)
                continue
            if req.num_output_tokens > 0 and chunk.num_new_tokens == 1 + len(drafts):
                decode_tokens += len(new_tokens)
            else:
                prefill_tokens += chunk.num_new_tokens
            accepted = len(new_tokens) - 1 if drafts else 0
            # K/V of the rejected drafts are dropped: only the pending token and accepted drafts count
            req.num_computed_tokens += chunk.num_new_tokens - (len(drafts) - accepted)
            req.spec_token_ids = []
            if drafts:
                self._record_spec(req, len(drafts), accepted)
                self.kv.truncate(req.request_id, req.num_computed_tokens)
            if self.proposer is not None and req.num_output_tokens > 0:
                self.proposer.update(req, len(drafts), accepted)
            for i, token in enumerate(new_tokens):
                if self._append_token(req, token, t, draft=i < accepted):
                    break
            else:
                self.kv.cache_full_blocks(req.request_id, req.token_ids, req.num_computed_tokens)
        with self._lock:
            self._steps.append((t, t - started, prefill_tokens, decode_tokens, sched.num_tokens))
            while self._steps and self._steps[0][0] < t - THROUGHPUT_WINDOW_S:
                self._steps.popleft()

    def _sample(self, sched: SchedulerOutput, logits: torch.Tensor, rows: list[int]) -> list[list[int]]:
        """New tokens per chunk: [] for a non-final prefill chunk, one sampled token, or the
        accepted drafts plus one for a chunk that verified drafts."""
        starts = list(itertools.accumulate(rows, initial=0))
        plain = [i for i, c in enumerate(sched.chunks) if rows[i] and not c.request.spec_token_ids]
        spec = [i for i, c in enumerate(sched.chunks) if rows[i] and c.request.spec_token_ids]
        out: list[list[int]] = [[] for _ in sched.chunks]

        def row(i: int) -> sampling.SamplingRow:
            r = sched.chunks[i].request
            return sampling.SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator)

        if plain:
            sampled = sampling.sample(logits[[starts[i] for i in plain]], [row(i) for i in plain]).tolist()
            for i, token in zip(plain, sampled):
                out[i] = [token]
        if spec:
            index = [j for i in spec for j in range(starts[i], starts[i + 1])]
            requests = [sched.chunks[i].request for i in spec]
            verified = verify_batch(logits[index], [r.spec_token_ids for r in requests],
                                    [self.proposer.draft_probs(r.request_id) for r in requests],
                                    [row(i) for i in spec])
            for i, tokens in zip(spec, verified):
                out[i] = tokens
        return out

    def _record_spec(self, req: Request, drafted: int, accepted: int) -> None:
        req.timings.spec_steps += 1
        req.timings.draft_tokens += drafted
        req.timings.accepted_tokens += accepted
        with self._lock:
            self._counters["spec_drafts"] += 1
            self._counters["spec_draft_tokens"] += drafted
            self._counters["spec_accepted"] += accepted
            for pos in range(accepted):
                self._accepted_per_pos[pos] += 1

    def _append_token(self, req: Request, token: int, t: float, draft: bool = False) -> bool:
        """Append one token and stream it; returns True when it finished the request."""
        req.token_ids.append(token)
        timings = req.timings
        if timings.first_token is None:
            timings.first_token = t
            with self._lock:
                self._counters["prompt_tokens"] += req.num_prompt_tokens
        else:
            timings.itl.append(t - (req.last_token_time or t))
        req.last_token_time = t
        timings.output_tokens += 1
        with self._lock:
            self._counters["generation_tokens"] += 1
        text, finish = self.outputs.on_token(req, token)
        if finish is None and req.num_tokens >= req.max_total_tokens:
            finish = "length"
        if finish is None:
            req.stream._put(Delta(req.request_id, text, (token,), accepted_draft=(draft,)))
            return False
        self._finish(req, finish, text=text, token_ids=(token,), accepted_draft=(draft,))
        return True

    def _finish(self, req: Request, reason: str, text: str = "", token_ids: tuple[int, ...] = (),
                error: str | None = None, accepted_draft: tuple[bool, ...] = ()) -> None:
        if reason != "error":
            text += self.outputs.flush(req)
        self.scheduler.finish(req)
        self._requests.pop(req.request_id, None)
        if self.proposer is not None:
            self.proposer.drop(req.request_id)
        req.timings.finished = now()
        req.timings.finish_reason = reason  # type: ignore[assignment]
        snapshot = req.timings.copy()
        with self._lock:
            self._counters["finished"] += 1
            self._recent.append(snapshot)
        req.stream._put(Delta(req.request_id, text, token_ids, finish_reason=reason,  # type: ignore[arg-type]
                              timings=snapshot, error=error, accepted_draft=accepted_draft))
