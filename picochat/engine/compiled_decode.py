"""The decode-only step compiled by ``torch.compile`` (inductor), built off the engine thread.

The eager step serves while a helper thread compiles the model's forward over ``DecodeMetadata``
for batch 1 and for any larger batch (the batch and the context width are dynamic dimensions),
writing only into a scratch KV block the scheduler never hands out. Inductor's C++ wrapper runs a
step's ~330 kernel calls without a Python call each (default model, int4, A/B in one session:
batch-1 decode +10-40 %, 8 streams +14-46 %), at the price of a longer cold build (default model
~9 min on the 2-core test host, ~45 s from a warm cache; a tiny model ~1 min). Inductor's
artifacts go to the user cache dir for later starts to reuse. Once built, the
engine thread calls the compiled step with guards evaluated only where they tell the two
graphs apart, and with recompilation forbidden: anything the graphs were not built for raises,
and that step (and every later one) runs eagerly. A failed build leaves the eager step serving.
The compiled step holds the model's modules: build a new one after swapping any of them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Callable

import torch
from torch import nn

from picochat.config import cache_dir
from picochat.kernels.reference import DecodeMetadata
from picochat.model.transformer import KVCache, Transformer

log = logging.getLogger("picochat.engine")

MIN_TABLE_WIDTH = 2  # block tables are padded to this, so their width is never the constant 1


def inductor_cache_dir() -> str:
    return str(cache_dir() / "inductor")


def _without_kv_cache_guards(entries: list) -> list[bool]:
    """Dynamo's guards to keep: all but those on the KV tensors (``caches…``). The step is
    always called with the runner's caches, made once with the runner, so their guards could
    never fail; checked at every call they were ~0.14 ms of a ~5 ms batch-1 int4 step (a tensor
    guard a cache tensor, 60 for the default model, run even with ``skip_guard_eval_unsafe``)."""
    return [not entry.name.startswith("caches") for entry in entries]


class FastDecodeStep:
    """What the compiled step and the CUDA graphs share: built once by :meth:`start`, then
    :attr:`ready` until a step they cannot serve turns them off for good (:meth:`disable`);
    ``on_done(self, None or a one-line error)`` reports the build's end."""

    kind = "fast decode step"

    def __init__(self, on_done: Callable[["FastDecodeStep", str | None], None]):
        self.on_done = on_done
        self.ready = False
        self.failed = False
        self.build_seconds: float | None = None
        self.steps_served = 0

    def disable(self, reason: str) -> None:
        log.warning("%s disabled: %s", self.kind, reason)
        self.ready, self.failed = False, True

    def _build_and_report(self, build: Callable[[], None], failure: str) -> None:
        """Run ``build``; any exception (no compiler, an op that cannot be captured, out of
        memory…) leaves the eager step serving."""
        started = time.perf_counter()
        try:
            build()
        except Exception as e:
            log.warning("%s, serving eagerly:\n%s", failure, traceback.format_exc())
            self.failed = True
            self.on_done(self, f"{failure} ({type(e).__name__}): serving eagerly")
            return
        self.build_seconds = time.perf_counter() - started
        self.ready = True
        self.on_done(self, None)


class CompiledDecode(FastDecodeStep):
    """``step(input_ids, positions, meta, caches) -> logits`` once :attr:`ready`."""

    kind = "compiled decode step"

    def __init__(self, model: Transformer, caches: list[KVCache], scratch_block: int, null_slot: int,
                 block_size: int, on_done: Callable[[FastDecodeStep, str | None], None]):
        super().__init__(on_done)  # on_done is called from the helper thread
        self.model = model
        self.caches = caches
        self.scratch_block = scratch_block
        self.null_slot = null_slot
        self.block_size = block_size
        self._fn: Callable | None = None

    def start(self) -> None:
        threading.Thread(target=self._build_and_report, args=(self._compile, "compilation failed"),
                         name="picochat-compile", daemon=True).start()

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: DecodeMetadata,
                 caches: list[KVCache]) -> torch.Tensor:
        with (torch.inference_mode(),
              torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True)):
            logits = self._fn(input_ids, positions, meta, caches)
        self.steps_served += 1
        return logits

    # ------------------------------------------------------------------------------- build
    def _compile(self) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir())
        import torch._inductor.config as inductor_config

        # round bf16 / fp16 intermediates where eager does, so greedy tokens match the eager step
        inductor_config.emulate_precision_casts = True
        # the runner's inputs always have the shapes the graphs were built for: no per-call
        # size / stride checks (8 % of a batch-1 step's samples under py-spy, most of it
        # building the checks' message strings)
        inductor_config.size_asserts = False
        model = self.model

        def step(input_ids, positions, meta, caches):  # the forward without its inference_mode
            return Transformer.forward.__wrapped__(model, input_ids, positions, meta, caches)

        # freezing makes the weights constants of the graph: float linears (packed for eager use,
        # dense when traced) are packed for oneDNN by inductor — bf16 b1 decode 48 -> 66-70 tok/s,
        # 8 streams 247 -> 343-365, the same tokens; with int4 / int8 linears the step's guards
        # and graph shrink (a b1 step 7.3 -> 5.4 ms of CPU under the profiler; int4 b1 decode,
        # processes alternating: 111/160/125/164 -> 125/179/186/178 tok/s; RSS +0.13 GB). Not
        # where a plain nn.Linear is left (fp32, or a CPU without native bf16): inductor's packed
        # fp32 kernels are not bit-identical to eager's. Set on inductor's config: in
        # torch.compile's options it was not applied
        inductor_config.freezing = not any(isinstance(m, nn.Linear) for m in model.modules())
        self._fn = torch.compile(step, fullgraph=True,
                                 options={"cpp_wrapper": True, "guard_filter_fn": _without_kv_cache_guards})
        with torch.inference_mode():  # as the runner makes its inputs and calls it
            for batch in (1, 2):  # batch 1 is its own graph (a size-1 dimension is a constant)
                self._fn(*self._example(batch))

    def _example(self, batch: int) -> tuple:
        """A decode step of ``batch`` rows that writes and reads only the scratch block."""
        bs, block, dev = self.block_size, self.scratch_block, self.caches[0].k.device
        ids = torch.zeros(batch, dtype=torch.int64, device=dev)
        positions = torch.arange(batch, dtype=torch.int64, device=dev)
        tables = torch.full((batch, MIN_TABLE_WIDTH), block, dtype=torch.int64, device=dev)
        meta = DecodeMetadata.build(block * bs + positions % bs, tables, positions + 1, bs,
                                    self.null_slot, self.model.config.sliding_window)
        dims = [(meta.context_slots, 1), (meta.bias, 3)]
        if batch > 1:
            dims += [(ids, 0), (positions, 0), (meta.slot_mapping, 0), (meta.context_slots, 0), (meta.bias, 0)]
        for tensor, dim in dims:
            torch._dynamo.mark_dynamic(tensor, dim)
        return ids, positions, meta, self.caches
