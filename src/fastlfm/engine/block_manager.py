"""Bookkeeping for the two cache pools: paged KV blocks and conv-state slots.

The tensors themselves live in the model runner; this class only hands out ids. Attention
layers need one block per `block_size` tokens of a sequence; conv layers need one slot per
sequence whatever its length (the last K-1 conv inputs). Each id is handed out to one
sequence at a time and returned exactly once (a double free raises).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .sequence import Sequence


class CacheLeakError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_conv_slots: int):
        if num_blocks < 1 or block_size < 1 or num_conv_slots < 1:
            raise ValueError(f"need at least one KV block and one conv slot; got num_blocks={num_blocks}, "
                             f"block_size={block_size}, num_conv_slots={num_conv_slots}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_conv_slots = num_conv_slots
        # Ids past the end are reserved for CUDA-graph padding rows (never handed out).
        self.padding_block = num_blocks
        self.padding_slot = num_conv_slots
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._free_slots: deque[int] = deque(range(num_conv_slots))
        self._used_blocks: set[int] = set()
        self._used_slots: set[int] = set()

    # -- queries --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used_blocks)

    @property
    def num_used_slots(self) -> int:
        return len(self._used_slots)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that `seq` can hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    # -- allocation -----------------------------------------------------------------------
    def can_admit(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_free_slots > 0 and self.extra_blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def admit(self, seq: Sequence, num_tokens: int) -> None:
        """Give a waiting sequence its conv slot and the blocks for its first chunk."""
        assert seq.conv_slot is None and not seq.block_table, f"{seq} already holds cache"
        slot = self._free_slots.popleft()
        self._used_slots.add(slot)
        seq.conv_slot = slot
        self.grow(seq, num_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        need = self.extra_blocks_needed(seq, num_tokens)
        if need > len(self._free_blocks):
            raise RuntimeError(f"out of KV blocks: {seq} needs {need}, {len(self._free_blocks)} free")
        for _ in range(need):
            block = self._free_blocks.popleft()
            self._used_blocks.add(block)
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks and its slot (finish, abort or preemption)."""
        for block in seq.block_table:
            if block not in self._used_blocks:
                raise CacheLeakError(f"KV block {block} of {seq.request_id!r} freed twice")
            self._used_blocks.remove(block)
            self._free_blocks.append(block)
        seq.block_table = []
        if seq.conv_slot is not None:
            if seq.conv_slot not in self._used_slots:
                raise CacheLeakError(f"conv slot {seq.conv_slot} of {seq.request_id!r} freed twice")
            self._used_slots.remove(seq.conv_slot)
            self._free_slots.append(seq.conv_slot)
            seq.conv_slot = None

    def reclaim(self, owners: Iterable[Sequence]) -> None:
        """Return every block and slot that none of `owners` holds (after a step that failed
        part-way, when a sequence may have been dropped between taking cache and keeping it)."""
        owners = list(owners)
        blocks = {b for s in owners for b in s.block_table}
        slots = {s.conv_slot for s in owners if s.conv_slot is not None}
        for block in self._used_blocks - blocks:
            self._used_blocks.remove(block)
            self._free_blocks.append(block)
        for slot in self._used_slots - slots:
            self._used_slots.remove(slot)
            self._free_slots.append(slot)

    def check_no_leaks(self, holders: Iterable[Sequence] = ()) -> None:
        """Raise unless exactly the blocks and slots of `holders` (sessions that keep their
        cache) are handed out: call it when no request is live."""
        holders = list(holders)
        blocks = {b for s in holders for b in s.block_table}
        slots = {s.conv_slot for s in holders if s.conv_slot is not None}
        if self._used_blocks != blocks or self._used_slots != slots:
            raise CacheLeakError(f"leaked {len(self._used_blocks - blocks)} KV blocks and "
                                 f"{len(self._used_slots - slots)} conv slots")
        free_blocks, free_slots = self.num_blocks - len(blocks), self.num_conv_slots - len(slots)
        assert len(self._free_blocks) == free_blocks and len(set(self._free_blocks)) == free_blocks
        assert len(self._free_slots) == free_slots and len(set(self._free_slots)) == free_slots
