"""KV-cache block accounting with prefix caching: which block holds what, who holds it, which is free.

Plain Python over ints: the tensors live in `kv_cache.py`; this file only hands out block ids.

Prefix caching: once a block is full of computed tokens it gets a key — (key hash of the previous
block, its token ids) — chained from a root salted by the adapter, so a key names the whole prefix up
to and including that block. A later sequence whose prompt starts with the same full blocks takes
those blocks (reference count + 1) instead of recomputing them. A freed block keeps its key and stays
reusable until the allocator needs it back: free blocks form one LRU queue, and blocks without a key
go to its front because nobody can reuse them.
"""

from __future__ import annotations

from collections import OrderedDict

from services.inference.engine.sequence import Sequence

BlockKey = tuple[int, tuple[int, ...]]
"""(hash of the previous block's key or of the root, this block's token ids)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._keys: list[BlockKey | None] = [None] * num_blocks
        # Insertion order is eviction order: the front is reused first.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[BlockKey, int] = {}
        # seq_id -> how many leading blocks of its table already carry a key.
        self._num_keyed: dict[int, int] = {}
        self.prefix_hits = 0
        """Blocks served from the prefix cache since start-up."""

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _root(self, seq: Sequence) -> int:
        return hash(("openlora-kv-root", seq.adapter_key))

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks that hold this sequence's leading full blocks; takes nothing.

        At most `(num_tokens - 1) // block_size` blocks: the last token is always computed, since its
        logits are what the next step samples from.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = self._root(seq)
        tokens = seq.token_ids
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            key: BlockKey = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
            parent = hash(key)
        return hits

    def can_allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether `allocate(seq, hits, num_tokens)` would succeed."""
        fresh = self.blocks_for(num_tokens) - len(hits)
        revived = sum(1 for b in hits if self._ref_counts[b] == 0)
        return fresh + revived <= len(self._free)

    def allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Give a sequence with no blocks the prefix hits plus fresh blocks for `num_tokens` tokens.

        Sets `num_computed_tokens` to the tokens the hits cover. Changes nothing and returns False
        when the free blocks do not suffice.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.request_id} already holds blocks")
        if hits and len(hits) * self.block_size >= num_tokens:
            raise ValueError("prefix hits must leave at least one token to compute")
        if not self.can_allocate(seq, hits, num_tokens):
            return False
        for block in hits:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        seq.block_table = list(hits)
        self._num_keyed[seq.seq_id] = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.took_prompt_tokens()
        self.prefix_hits += len(hits)
        self._grow(seq, num_tokens)
        return True

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Add fresh blocks so the sequence's table covers `num_tokens`; False (and no change) if short."""
        if not self.can_grow(seq, num_tokens):
            return False
        self._grow(seq, num_tokens)
        return True

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._keys[block]
        if key is not None:
            # Evicting a reusable prefix block: forget it, unless a twin block owns the key.
            if self._cached.get(key) == block:
                del self._cached[key]
            self._keys[block] = None
        self._ref_counts[block] = 1
        return block

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Key every block the sequence has completely computed so later prompts can reuse it."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        done = self._num_keyed.get(seq.seq_id, 0)
        if done >= num_full:
            return
        tokens = seq.token_ids
        bs = self.block_size
        parent = self._root(seq) if done == 0 else hash(self._keys[seq.block_table[done - 1]])
        for i in range(done, num_full):
            block = seq.block_table[i]
            key: BlockKey = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            self._keys[block] = key
            # Two sequences may compute the same prefix in one step; the first block keeps the key.
            self._cached.setdefault(key, block)
            parent = hash(key)
        self._num_keyed[seq.seq_id] = num_full

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence; it will have to recompute from scratch if resumed."""
        # Tail blocks first, so they are evicted before the prefix blocks others are likelier to share.
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed more often than taken")
            if self._ref_counts[block] == 0:
                self._free[block] = None
                if self._keys[block] is None:
                    self._free.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._num_keyed.pop(seq.seq_id, None)

    def check_consistency(self) -> None:
        """Raise if the free queue and the reference counts disagree (for tests and debug builds)."""
        for block in range(self.num_blocks):
            in_free = block in self._free
            if in_free != (self._ref_counts[block] == 0):
                raise AssertionError(f"block {block}: ref {self._ref_counts[block]}, in free queue {in_free}")
        for key, block in self._cached.items():
            if self._keys[block] != key:
                raise AssertionError(f"cached block {block} lost its key")
