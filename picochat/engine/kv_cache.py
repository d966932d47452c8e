"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, per-request block tables, reference
counts, and the prefix cache.

Only ids and counts live here; the K/V tensors themselves are owned by the runner. A full block is
keyed by ``hash((parent_hash, its token ids))`` once its K/V have been computed, so a later request
with the same prefix reuses it. Blocks whose reference count drops to zero stay cached in an LRU
free queue until they are needed for something else (evicted oldest first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

BlockHash = int


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found cached


@dataclass
class _RequestBlocks:
    blocks: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # hashes of the leading full blocks


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockHash, int] = {}  # hash → block id
        self.requests: dict[str, _RequestBlocks] = {}
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free, as in vLLM)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def block_table(self, request_id: str) -> list[int]:
        return self.requests[request_id].blocks if request_id in self.requests else []

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------- prefix cache
    def hash_blocks(self, token_ids: Sequence[int], num_full_blocks: int,
                    known: list[BlockHash] | None = None) -> list[BlockHash]:
        """Chained hashes of the first ``num_full_blocks`` blocks, reusing ``known`` ones."""
        hashes = list(known or [])[:num_full_blocks]
        parent = hashes[-1] if hashes else None
        bs = self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = hash((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            hashes.append(parent)
        return hashes

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Cached blocks holding a prefix of ``token_ids`` and how many tokens they cover (the
        caller records the lookup in ``stats`` once the request is admitted).

        The last token is never taken from the cache: a request must compute at least one
        token to produce logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        num_full = (len(token_ids) - 1) // self.block_size
        found: list[int] = []
        for h in self.hash_blocks(token_ids, num_full):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found, len(found) * self.block_size

    # --------------------------------------------------------------------------- allocation
    def allocate_slots(self, request_id: str, num_total_tokens: int,
                       computed_blocks: Sequence[int] = ()) -> bool:
        """Make the request's table cover ``num_total_tokens`` tokens, first adopting
        ``computed_blocks`` (prefix-cache hits, only for a request without blocks yet).
        Returns False, changing nothing, when the pool cannot supply the blocks."""
        req = self.requests.get(request_id)
        have = len(req.blocks) if req else 0
        need = self.blocks_needed(num_total_tokens) - have - len(computed_blocks)
        reusable_free = sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)
        if need > self.num_free_blocks - reusable_free:
            return False
        if req is None:
            req = self.requests[request_id] = _RequestBlocks()
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self.free_queue[block_id]
            block.ref_cnt += 1
            req.blocks.append(block_id)
            req.hashes.append(block.block_hash)  # type: ignore[arg-type]
        for _ in range(max(need, 0)):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict its cached contents
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            req.blocks.append(block_id)
        return True

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the blocks whose K/V are now fully computed from ``token_ids``."""
        if not self.enable_prefix_caching:
            return
        req = self.requests[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(req.blocks))
        if num_full <= len(req.hashes):
            return
        old = len(req.hashes)
        req.hashes = self.hash_blocks(token_ids, num_full, req.hashes)
        for block_id, h in zip(req.blocks[old:num_full], req.hashes[old:]):
            block = self.blocks[block_id]
            if block.block_hash is None and h not in self.cached:
                block.block_hash = h
                self.cached[h] = block_id

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Drop trailing blocks beyond ``num_tokens`` (speculative rollback)."""
        req = self.requests[request_id]
        keep = self.blocks_needed(num_tokens)
        for block_id in reversed(req.blocks[keep:]):
            self._release(block_id)
        del req.blocks[keep:]
        del req.hashes[min(keep, len(req.hashes)):]

    def free(self, request_id: str) -> None:
        """Release all of a request's blocks (finished, cancelled or preempted)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for block_id in reversed(req.blocks):  # tail blocks are evicted first
            self._release(block_id)

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_cnt > 0, f"block {block_id} freed twice"
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue[block_id] = None
            if block.block_hash is None:  # nothing worth keeping: reuse first
                self.free_queue.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_cnt == 0 and block.block_hash is not None:
                block.block_hash = None
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].block_hash == h}
