"""The model runner: owns the model and its paged K/V tensors, turns a SchedulerOutput into one
flat varlen batch (input ids, positions, slot mapping, block tables) and runs the model once.

It returns logits only for the rows that sample: the last token of each chunk that reaches the
end of its request's tokens, and — for requests with draft tokens — every verified position.
A step with no prefill (plain decode rows and draft verifications) goes through the decode
attention as rows of one token each, and so through the compiled step or the CUDA graphs.
"""

from __future__ import annotations

from typing import Callable

import torch

from picochat.engine.compiled_decode import MIN_TABLE_WIDTH, CompiledDecode, FastDecodeStep
from picochat.engine.cuda_graphs import CudaGraphDecode
from picochat.kernels.reference import AttentionMetadata, DecodeMetadata
from picochat.model.transformer import KVCache, Transformer
from picochat.engine.kv_cache import KVCacheManager
from picochat.engine.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVCacheManager, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.kv = kv
        self.device = device
        cfg = model.config
        # two blocks past the manager's: the scratch block a compiled step is built against, and
        # the null block whose first slot stays zero (decode steps read it for unseen positions)
        self.scratch_block = kv.num_blocks
        self.null_slot = (kv.num_blocks + 1) * kv.block_size
        shape = (kv.num_blocks + 2, kv.block_size, cfg.num_kv_heads, cfg.head_dim)
        # uninitialised: attention reads only slots written earlier (positions < seq_len)
        self.caches = [KVCache(torch.empty(shape, dtype=dtype, device=device),
                               torch.empty(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]
        for cache in self.caches:
            cache.k[-1].zero_()
            cache.v[-1].zero_()
        self.compiled: FastDecodeStep | None = None  # serves decode-only steps once ready

    def compile_decode(self, on_done: Callable[[FastDecodeStep, str | None], None], attention_backend: str,
                       max_model_len: int, max_batch: int) -> bool:
        """Start building the fast decode step (replacing any earlier one): CUDA graphs over the
        Triton kernels on a GPU, the compiled step over the CPU decode attention; False where
        neither applies."""
        if self.device.type == "cuda" and attention_backend == "triton":
            self.compiled = CudaGraphDecode(self.model, self.caches, self.scratch_block, self.kv.block_size,
                                            max_model_len, max_batch, on_done)
        elif self.model.kernels.decode_attention is not None:
            self.compiled = CompiledDecode(self.model, self.caches, self.scratch_block, self.null_slot,
                                           self.kv.block_size, on_done)
        else:
            self.compiled = None
            return False
        self.compiled.start()
        return True

    @staticmethod
    def kv_bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype) -> int:
        return model_cfg.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size

    @torch.inference_mode()  # the step's inputs are inference tensors, as the compiled step expects
    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns (logits [R, V] fp32, rows per chunk: how many logits rows each
        chunk owns — 0 for a prefill chunk that does not sample, 1 + drafts for one that does)."""
        if all(c.samples and c.num_new_tokens == 1 + len(c.request.spec_token_ids) for c in sched.chunks):
            rows_per_chunk = [c.num_new_tokens for c in sched.chunks]
            rows = self._decode_rows(sched)
            compiled = self.compiled
            if isinstance(compiled, CudaGraphDecode) and compiled.ready and len(rows[0]) <= compiled.max_batch:
                try:
                    return compiled(*rows), rows_per_chunk
                except Exception as e:  # a step the graphs cannot hold: eager from now on
                    compiled.disable(f"{type(e).__name__}: {e}")
            if self.model.kernels.decode_attention is not None:
                return self._execute_decode(*rows), rows_per_chunk
        bs = self.kv.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_indices: list[int] = []
        rows_per_chunk: list[int] = []
        for chunk in sched.chunks:
            req = chunk.request
            start, n = req.num_computed_tokens, chunk.num_new_tokens
            tokens = req.token_ids + req.spec_token_ids if req.spec_token_ids else req.token_ids
            table = self.kv.block_table(req.request_id)
            offset = len(input_ids)
            input_ids.extend(tokens[start:start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(table)
            if chunk.samples:
                rows = 1 + len(req.spec_token_ids)
                logits_indices.extend(range(offset + n - rows, offset + n))
                rows_per_chunk.append(rows)
            else:
                rows_per_chunk.append(0)
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_tables=block_tables.to(self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, block_size=bs)
        logits = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            torch.tensor(positions, dtype=torch.int64, device=self.device),
            meta, self.caches,
            torch.tensor(logits_indices, dtype=torch.int64, device=self.device))
        return logits, rows_per_chunk

    def _decode_rows(self, sched: SchedulerOutput) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        """(input ids, positions, slots, block tables) of a step of decode rows only: the next
        token of each request at its last position, and for a request with k draft tokens, one row
        per draft as well (its verification expanded into k + 1 decode rows that share the block
        table, each seeing one position more: every layer writes the step's K/V before attending,
        so a draft's row sees the drafts before it)."""
        bs = self.kv.block_size
        input_ids, positions, slots, tables = [], [], [], []
        for chunk in sched.chunks:
            req = chunk.request
            start = req.num_computed_tokens
            table = self.kv.block_table(req.request_id)
            tokens = [*req.token_ids[start:], *req.spec_token_ids]
            for pos, token in zip(range(start, start + chunk.num_new_tokens), tokens):
                input_ids.append(token)
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
                tables.append(table)
        return input_ids, positions, slots, tables

    def _execute_decode(self, input_ids: list[int], positions: list[int], slots: list[int],
                        tables: list[list[int]]) -> torch.Tensor:
        """A step of decode rows over ``DecodeMetadata`` (the CPU decode attention), compiled once built."""
        width = max(MIN_TABLE_WIDTH, *(len(t) for t in tables))
        dev = self.device
        positions_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        meta = DecodeMetadata.build(
            torch.tensor(slots, dtype=torch.int64, device=dev),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=dev),
            positions_t + 1, self.kv.block_size, self.null_slot, self.model.config.sliding_window)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        compiled = self.compiled
        if isinstance(compiled, CompiledDecode) and compiled.ready:
            try:
                return compiled(ids, positions_t, meta, self.caches)
            except Exception as e:  # a shape or state the graphs were not built for
                compiled.disable(f"{type(e).__name__}: {e}")
        return self.model(ids, positions_t, meta, self.caches)
