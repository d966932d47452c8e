"""The decode-only step replayed from CUDA graphs, one graph per padded batch size.

On a GPU a small model's decode step is a few hundred short kernels, and launching them one by
one from Python costs more than running them. :class:`CudaGraphDecode` captures the model's
forward over a decode step once per batch bucket (1, 2, 4, 8, … up to the scheduler's max
sequences), on static input buffers, and afterwards a step copies its ids, positions, slots,
block tables and context lengths into those buffers and replays the graph of the smallest bucket
that holds it. Rows past the real batch decode a dummy token against the scratch block (never
handed out by the scheduler), so they stay finite and touch no request's cache.

The paged decode attention kernel sizes its key splits from host data; the graphs are captured
with every context at the engine's longest length, so one graph serves any context (empty splits
exit at once). Capture runs on the engine thread while it is idle, one engine of the process at
a time; a failure leaves the eager step serving. The graphs hold the model's weights and the KV
pool: capture anew after swapping weights. Same interface as
:class:`~picochat.engine.compiled_decode.CompiledDecode`.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from picochat.engine.compiled_decode import FastDecodeStep
from picochat.kernels.reference import AttentionMetadata
from picochat.model.transformer import KVCache, Transformer

# Entering a capture synchronizes the device, which fails while another thread captures: the
# engines of one process (a benchmark's pair, each on its own thread) capture one at a time.
CAPTURE_LOCK = threading.Lock()


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, … and ``max_batch`` itself: the padded batch sizes that get a graph."""
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(min(2 * sizes[-1], max_batch))
    return sizes


class CudaGraphDecode(FastDecodeStep):
    """``step(input_ids, positions, slots, tables) -> logits [B, V]`` once :attr:`ready`; the
    inputs are host lists of the B ≤ :attr:`max_batch` decode rows."""

    kind = "CUDA graph decode step"

    def __init__(self, model: Transformer, caches: list[KVCache], scratch_block: int, block_size: int,
                 max_model_len: int, max_batch: int, on_done: Callable[[FastDecodeStep, str | None], None]):
        super().__init__(on_done)
        self.model = model
        self.caches = caches
        self.scratch_block = scratch_block
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket → (graph, logits)

    def start(self) -> None:
        """Capture every bucket now, on the calling (engine) thread, then report to on_done."""
        self._build_and_report(self._capture_all, "CUDA graph capture failed")

    def _allocate(self) -> None:
        """The static inputs the graphs read, and their pinned host staging (one copy a step)."""
        device = self.caches[0].k.device
        width = -(-self.max_model_len // self.block_size)
        b = self.max_batch
        self._ids = torch.zeros(b, dtype=torch.int64, device=device)
        self._positions = torch.zeros(b, dtype=torch.int64, device=device)
        self._slots = torch.zeros(b, dtype=torch.int64, device=device)
        self._tables = torch.zeros(b, width, dtype=torch.int32, device=device)
        self._seq_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self._query_start = torch.arange(b + 1, dtype=torch.int32, device=device)
        self._host = torch.zeros(b, 4 + width, dtype=torch.int64, pin_memory=True)

    def disable(self, reason: str) -> None:
        super().disable(reason)
        self._graphs.clear()

    def __call__(self, input_ids: list[int], positions: list[int], slots: list[int],
                 tables: list[list[int]]) -> torch.Tensor:
        n = len(input_ids)
        bucket = next(size for size in self.buckets if size >= n)
        self._stage(input_ids, positions, slots, tables)
        graph, logits = self._graphs[bucket]
        graph.replay()
        self.steps_served += 1
        return logits[:n].clone()  # the next replay overwrites the static output

    # ----------------------------------------------------------------------------- helpers
    def _stage(self, input_ids: list[int], positions: list[int], slots: list[int],
               tables: list[list[int]]) -> None:
        """Fill the static inputs: real rows first, the rest decode a dummy token in the scratch
        block (position 0, one key)."""
        host, n, width = self._host, len(input_ids), self._tables.shape[1]
        host.zero_()
        host[:, 2] = self.scratch_block * self.block_size  # slot
        host[:, 3] = 1  # context length
        host[:, 4] = self.scratch_block  # block table
        if n:
            host[:n, 0] = torch.tensor(input_ids)
            host[:n, 1] = torch.tensor(positions)
            host[:n, 2] = torch.tensor(slots)
            host[:n, 3] = host[:n, 1] + 1
            for row, table in enumerate(tables):
                if len(table) > width:
                    raise ValueError(f"a block table of {len(table)} blocks exceeds the graphs' {width}")
                host[row, 4:4 + len(table)] = torch.tensor(table)
        device = self._ids.device
        staged = host.to(device, non_blocking=True)
        self._ids.copy_(staged[:, 0])
        self._positions.copy_(staged[:, 1])
        self._slots.copy_(staged[:, 2])
        self._seq_lens.copy_(staged[:, 3])
        self._tables.copy_(staged[:, 4:])

    def _forward(self, batch: int) -> torch.Tensor:
        # host lengths only size the attention kernel's launch: the longest context, always
        meta = AttentionMetadata(
            query_start_loc=self._query_start[:batch + 1], seq_lens=self._seq_lens[:batch],
            block_tables=self._tables[:batch], slot_mapping=self._slots[:batch],
            query_lens_cpu=[1] * batch, seq_lens_cpu=[self.max_model_len] * batch, block_size=self.block_size)
        return self.model(self._ids[:batch], self._positions[:batch], meta, self.caches)

    def _capture_all(self) -> None:
        try:
            self._allocate()
            with CAPTURE_LOCK:
                self._capture_buckets()
        except Exception:
            self._graphs.clear()  # a partial capture holds memory for nothing
            raise

    @torch.inference_mode()
    def _capture_buckets(self) -> None:
        self._stage([], [], [], [])
        pool = None
        stream = torch.cuda.Stream(device=self._ids.device)
        stream.wait_stream(torch.cuda.current_stream(self._ids.device))
        for batch in reversed(self.buckets):  # largest first: the smaller ones reuse its memory pool
            with torch.cuda.stream(stream):
                for _ in range(2):  # kernels compiled and tuned, allocator warmed, outside the graph
                    self._forward(batch)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (metrics reading free memory) may call CUDA meanwhile
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                logits = self._forward(batch)
            pool = graph.pool()
            self._graphs[batch] = (graph, logits)
        torch.cuda.current_stream(self._ids.device).wait_stream(stream)
