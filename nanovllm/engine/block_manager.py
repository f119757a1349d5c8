"""BlockManager: KV-cache block bookkeeping (no arrays): tables, reference counts, prefix cache.

A full block is keyed by a hash chained from its parent block's hash and its own token ids.
A hit is verified, not trusted: the block must hold the same ids and descend from the same
parent *content* (a serial number that changes whenever a block is re-filled), so even a
hash collision can never hand one prompt another prompt's blocks. Freed blocks keep their
hash and stay reusable until the pool needs them, least recently freed first.

With sliding-window attention on every layer, a block wholly before the window of a sequence's
next query is never read again (the attention op guarantees it): `release_before` returns it to
the pool and leaves a hole (HOLE) in the table, so a long sequence holds only its window's
blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from nanovllm.engine.sequence import Sequence

HOLE = -1  # a block-table entry whose block went back to the pool (outside every window)


def block_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    serial: int = 0  # identity of the content; changes when the block is re-filled
    parent_serial: int = -1


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block_id
        self._cached_free = 0  # free blocks that still hold a hashed prefix (kept, not counted)
        self._serial = 0
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_cached_free_blocks(self) -> int:
        return self._cached_free

    def block_states(self) -> str:
        """One character per block: u(sed), s(hared), c(ached but free), . (free)."""
        return "".join(
            ("s" if b.ref_count > 1 else "u")
            if b.ref_count
            else ("c" if b.hash is not None else ".")
            for b in self.blocks
        )

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of seq's tokens (never its last token, which must be
        computed to give logits). Does not take references."""
        if not self.enable_prefix_caching:
            return []
        size, matched = self.block_size, []
        parent_hash, parent_serial = None, -1
        for start in range(0, seq.num_tokens - 1 - size + 1, size):
            ids = tuple(seq.token_ids[start : start + size])
            h = block_hash(parent_hash, ids)
            block_id = self.cached.get(h)
            block = self.blocks[block_id] if block_id is not None else None
            if block is None or block.token_ids != ids or block.parent_serial != parent_serial:
                break
            matched.append(block_id)
            parent_hash, parent_serial = h, block.serial
        return matched

    def record_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.query_tokens += num_query_tokens
        self.hit_tokens += num_hit_tokens

    # ---- allocation ------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_tokens: int, hits: list[int] = ()) -> bool:
        """Could seq (holding `hits` as its first blocks) cover num_tokens tokens?"""
        held = len(seq.block_table) or len(hits)
        reuse_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_needed(num_tokens) - held <= self.num_free_blocks - reuse_free

    def allocate(self, seq: Sequence, num_tokens: int, hits: list[int] = ()) -> None:
        """Grow seq's block table to cover num_tokens tokens, taking `hits` first (the caller
        has checked can_allocate)."""
        for block_id in hits:
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(self.blocks[block_id].hash)
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take_fresh())

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks are freed first so that they are evicted first: prefixes live longest.
        for block_id in reversed(seq.block_table):
            if block_id != HOLE:
                self._release(block_id)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_released_blocks = 0

    def release_before(self, seq: Sequence, position: int) -> None:
        """Return the blocks that lie wholly before `position` (no query will read them again).
        A block is kept until the next one is registered in the prefix cache, which needs its
        content serial as the parent's."""
        dead = position // self.block_size
        if self.enable_prefix_caching:
            dead = min(dead, len(seq.block_hashes) - 1)
        for i in range(seq.num_released_blocks, max(dead, 0)):
            self._release(seq.block_table[i])
            seq.block_table[i] = HOLE
        seq.num_released_blocks = max(seq.num_released_blocks, dead)

    def held_blocks(self, seq: Sequence) -> int:
        return len(seq.block_table) - seq.num_released_blocks

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Return the blocks beyond the first num_tokens tokens (rejected speculative slots)."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())
        del seq.block_hashes[keep:]

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's blocks that are full and computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        computed = min(seq.num_computed_tokens, seq.num_tokens)
        num_full = min(computed // size, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            parent_hash = seq.block_hashes[i - 1] if i else None
            parent_serial = self.blocks[seq.block_table[i - 1]].serial if i else -1
            ids = tuple(seq.token_ids[i * size : (i + 1) * size])
            h = block_hash(parent_hash, ids)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids, block.parent_serial = h, ids, parent_serial
                self.cached.setdefault(h, block.block_id)
            seq.block_hashes.append(h)

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self.free[block_id] = None
            self._cached_free += block.hash is not None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
            self._cached_free -= block.hash is not None
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        self._cached_free -= block.hash is not None
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        self._serial += 1
        block.hash, block.token_ids, block.serial, block.parent_serial = None, (), self._serial, -1
        block.ref_count = 1
        return block_id
