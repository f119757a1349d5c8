"""BlockManager: block tables, reference counts, prefix-cache hits verified by ids, LRU eviction.

No model and no scheduler: sequences are admitted by hand the way the scheduler admits a
waiting sequence (match the cached prefix, allocate the rest, pretend it was computed, cache
its full blocks). Every expected block id is worked out in the test from the allocation order.
"""

from __future__ import annotations

import pytest

from nanovllm.engine import block_manager as block_manager_module
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Request, Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4  # block size of most tests


def make_seq(token_ids: list[int], seq_id: int = 0) -> Sequence:
    params = SamplingParams(max_tokens=1)
    request = Request(f"r{seq_id}", None, list(token_ids), params)
    return Sequence(seq_id, request, 0, list(token_ids), params)


def admit(
    manager: BlockManager, token_ids: list[int], seq_id: int = 0
) -> tuple[Sequence, list[int]]:
    """Admit and 'compute' a whole sequence; returns it and the cached blocks it reused."""
    seq = make_seq(token_ids, seq_id)
    hits = manager.match_prefix(seq)
    manager.allocate(seq, seq.num_tokens, hits)
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_computed_blocks(seq)
    return seq, hits


def ids(start: int, count: int = BS) -> list[int]:
    return list(range(start, start + count))


def assert_ref_counts_match_tables(manager: BlockManager, seqs: list[Sequence]) -> None:
    holders = [0] * manager.num_blocks
    for seq in seqs:
        for block_id in seq.block_table:
            holders[block_id] += 1
    assert [b.ref_count for b in manager.blocks] == holders
    assert set(manager.free) == {i for i, n in enumerate(holders) if n == 0}


# ---- allocation and reference counts --------------------------------------------------------


def test_allocation_takes_never_used_blocks_in_order():
    manager = BlockManager(8, BS)
    seq, hits = admit(manager, ids(100, 9))  # 2 full blocks + 1 token
    assert hits == []
    assert seq.block_table == [0, 1, 2]
    assert manager.num_free_blocks == 5


def test_shared_prefix_blocks_count_one_reference_per_holder():
    manager = BlockManager(8, BS)
    a, _ = admit(manager, ids(100, 8) + [7, 7], seq_id=1)  # blocks 0, 1 full; 2 partial
    b, hits = admit(manager, ids(100, 8) + [9, 9, 9], seq_id=2)
    assert hits == [0, 1]
    assert b.block_table == [0, 1, 3]
    assert [manager.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    assert_ref_counts_match_tables(manager, [a, b])

    manager.free_seq(a)
    assert [manager.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]
    assert 0 not in manager.free and 1 not in manager.free, "a block still held was freed"
    assert_ref_counts_match_tables(manager, [b])

    manager.free_seq(b)
    assert_ref_counts_match_tables(manager, [])
    assert manager.num_free_blocks == manager.num_blocks


def test_freeing_a_sequence_twice_is_caught():
    manager = BlockManager(4, BS)
    seq, _ = admit(manager, ids(1, 5))
    table = list(seq.block_table)
    manager.free_seq(seq)
    seq.block_table.extend(table)  # a stale table freed again
    with pytest.raises(AssertionError, match="freed twice"):
        manager.free_seq(seq)


def test_can_allocate_counts_free_cached_hits_as_used():
    manager = BlockManager(3, BS)
    a, _ = admit(manager, ids(100, 8) + [5])  # all 3 blocks
    manager.free_seq(a)
    b = make_seq(ids(100, 8) + [6, 6, 6, 6, 6])  # 2 hits (free, cached) + 2 fresh blocks
    hits = manager.match_prefix(b)
    assert hits == [0, 1]
    # 4 blocks needed, 2 of them the hits: 2 fresh ones, but taking the hits leaves only 1 free.
    assert not manager.can_allocate(b, b.num_tokens, hits)
    assert manager.can_allocate(b, 12, hits)  # 3 blocks: the 2 hits + 1 fresh


# ---- prefix-cache hits ----------------------------------------------------------------------


def test_a_later_sequence_reuses_the_cached_full_blocks_of_its_prefix():
    manager = BlockManager(16, BS)
    first, _ = admit(manager, ids(100, 12) + [1], seq_id=1)
    manager.free_seq(first)
    second = make_seq(ids(100, 12) + [2, 3], seq_id=2)
    assert manager.match_prefix(second) == [0, 1, 2]


def test_the_last_prompt_token_is_never_a_hit():
    """The last token must be computed to give the logits of the next one."""
    manager = BlockManager(16, BS)
    first, _ = admit(manager, ids(100, 12), seq_id=1)  # exactly 3 full blocks
    manager.free_seq(first)
    assert manager.match_prefix(make_seq(ids(100, 12))) == [0, 1]
    assert manager.match_prefix(make_seq(ids(100, 13))) == [0, 1, 2]


def test_partial_and_uncomputed_blocks_are_never_hits():
    manager = BlockManager(16, BS)
    seq = make_seq(ids(100, 12) + [1])
    manager.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = 6  # a prefill chunk: only block 0 is full and computed
    manager.cache_computed_blocks(seq)
    assert manager.match_prefix(make_seq(ids(100, 12) + [2])) == [0]


def test_a_different_first_block_misses_even_if_the_second_matches():
    manager = BlockManager(16, BS)
    first, _ = admit(manager, ids(100, 8) + [1], seq_id=1)
    manager.free_seq(first)
    assert manager.match_prefix(make_seq([0] + ids(101, 7) + [1])) == []


def test_prefix_caching_off_never_hits():
    manager = BlockManager(16, BS, enable_prefix_caching=False)
    first, _ = admit(manager, ids(100, 8) + [1], seq_id=1)
    manager.free_seq(first)
    assert manager.match_prefix(make_seq(ids(100, 8) + [1])) == []


@pytest.fixture
def colliding_hash(monkeypatch):
    """Every block hashes to the same value: only the id and parent checks stand between a
    lookup and another prompt's blocks."""
    monkeypatch.setattr(block_manager_module, "block_hash", lambda parent, token_ids: 42)


def test_a_hash_collision_never_returns_blocks_with_other_ids(colliding_hash):
    manager = BlockManager(16, BS)
    first, _ = admit(manager, ids(100, 8) + [1], seq_id=1)  # cached[42] is its block 0
    manager.free_seq(first)
    assert manager.match_prefix(make_seq(ids(200, 8) + [1])) == []
    # Same second block, different first one.
    assert manager.match_prefix(make_seq(ids(200, 4) + ids(104, 4) + [1])) == []


def test_a_hash_collision_never_returns_a_block_under_another_parent(colliding_hash):
    manager = BlockManager(16, BS)
    first, _ = admit(manager, ids(100, 4) * 3 + [1], seq_id=1)  # three blocks with equal ids
    manager.free_seq(first)
    # Block 0 holds the right ids for positions 4..7 too, but was computed at positions 0..3:
    # returning it twice would feed the model keys rotated for the wrong positions.
    assert manager.match_prefix(make_seq(ids(100, 4) * 3 + [1])) == [0]


def test_repeated_blocks_hit_each_under_its_own_parent():
    manager = BlockManager(16, BS)
    first, _ = admit(manager, ids(100, 4) * 3 + [1], seq_id=1)
    manager.free_seq(first)
    assert manager.match_prefix(make_seq(ids(100, 4) * 3 + [2])) == [0, 1, 2]


# ---- LRU eviction of freed cached blocks ----------------------------------------------------


def evict(manager: BlockManager, num_blocks: int, seq_id: int = 99) -> Sequence:
    """Take num_blocks fresh blocks (with ids nothing else uses) and return their holder."""
    seq = make_seq(ids(10_000 + 100 * seq_id, num_blocks * BS), seq_id)
    manager.allocate(seq, seq.num_tokens)
    return seq


@pytest.fixture
def two_freed_prompts():
    """6 blocks; A (blocks 0, 1, 2) freed before B (blocks 3, 4, 5); every block full and cached.

    Free order, least recent first: A2 A1 A0 B2 B1 B0 (a sequence frees its tail first)."""
    manager = BlockManager(6, BS)
    a, _ = admit(manager, ids(100, 12), seq_id=1)
    b, _ = admit(manager, ids(200, 12), seq_id=2)
    a.num_computed_tokens = b.num_computed_tokens = 12
    manager.free_seq(a)
    manager.free_seq(b)
    assert manager.num_cached_free_blocks == 6
    return manager


def cached_prefix(manager: BlockManager, start: int) -> list[int]:
    """Blocks hit by a 13-token prompt whose first 12 ids are ids(start, 12)."""
    return manager.match_prefix(make_seq(ids(start, 12) + [0]))


def test_eviction_takes_the_tail_of_the_least_recently_freed_sequence_first(two_freed_prompts):
    manager = two_freed_prompts
    holder = evict(manager, 1)
    assert holder.block_table == [2]
    assert cached_prefix(manager, 100) == [0, 1]
    assert cached_prefix(manager, 200) == [3, 4, 5]


def test_eviction_order_is_least_recently_freed_first(two_freed_prompts):
    manager = two_freed_prompts
    holder = evict(manager, 4)
    assert holder.block_table == [2, 1, 0, 5]
    assert cached_prefix(manager, 100) == []
    assert cached_prefix(manager, 200) == [3, 4]
    assert manager.num_cached_free_blocks == 2


def test_reusing_cached_blocks_makes_them_recently_freed(two_freed_prompts):
    manager = two_freed_prompts
    again, hits = admit(manager, ids(100, 12) + [7], seq_id=3)  # A's 3 blocks + B's tail
    assert hits == [0, 1, 2]
    assert again.block_table == [0, 1, 2, 5]
    manager.free_seq(again)
    # Free order now: B1 B0 | 5 A2 A1 A0: A's blocks are the most recently freed.
    holder = evict(manager, 2)
    assert holder.block_table == [4, 3]
    assert cached_prefix(manager, 100) == [0, 1, 2]
    assert cached_prefix(manager, 200) == []


def test_an_evicted_block_forgets_its_content(two_freed_prompts):
    manager = two_freed_prompts
    holder = evict(manager, 3)  # A's blocks 2, 1, 0 now hold other ids
    assert cached_prefix(manager, 100) == []
    assert all(manager.blocks[b].hash is None for b in holder.block_table)
    # Once the new holder caches its own content, lookups for it find it, not A.
    holder.num_computed_tokens = holder.num_tokens
    manager.cache_computed_blocks(holder)
    assert manager.match_prefix(make_seq(holder.token_ids + [1])) == [2, 1, 0]
