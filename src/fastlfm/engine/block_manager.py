"""Bookkeeping for the cache pools: paged KV blocks, conv-state slots and conv-state snapshots.

The tensors themselves live in the model runner; this class only hands out ids. Attention
layers need one block per `block_size` tokens of a sequence; conv layers need one slot per
sequence whatever its length (the last K-1 conv inputs). A slot is handed out to one sequence
at a time and returned exactly once (a double free raises).

Prefix caching. A full block whose tokens are computed is registered under a chain hash
(the previous block's hash + its token ids + the content digest of any image whose features
sit at its positions), so a later sequence whose prompt starts the same way takes the block
instead of recomputing it. Blocks are reference-counted: a shared block is only ever read
(a sequence writes at positions past its cached prefix, into blocks of its own). A block whose
count drops to zero keeps its hash and stays cached, least recently freed first to be
evicted, and only when a block is needed; a block in use is never evicted.

LFM2's conv layers also need their state where the reuse starts, and it cannot be rebuilt from
the KV blocks. So the engine takes conv-state *snapshots* at block ends (a few rows per conv
layer, small next to a KV block), kept in a pool of their own under the hash of the block they
end: bounded, least recently used first to go, and dropped with their block's hash. A
sequence resumes after the longest run of cached blocks whose last block has a snapshot.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .sequence import IN_FLIGHT, Sequence


class CacheLeakError(RuntimeError):
    pass


@dataclass
class PrefixHit:
    """The cached start of a sequence: its blocks, the snapshot of the conv state at their end."""

    blocks: list[int] = field(default_factory=list)
    snapshot: int | None = None
    num_tokens: int = 0


NO_HIT = PrefixHit()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_conv_slots: int, num_snapshots: int = 0):
        """`num_snapshots` > 0 turns prefix caching on, with that many conv-state snapshots."""
        if num_blocks < 1 or block_size < 1 or num_conv_slots < 1 or num_snapshots < 0:
            raise ValueError(f"need at least one KV block and one conv slot; got num_blocks={num_blocks}, "
                             f"block_size={block_size}, num_conv_slots={num_conv_slots}, num_snapshots={num_snapshots}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_conv_slots = num_conv_slots
        self.num_snapshots = num_snapshots
        self.caching = num_snapshots > 0
        # Ids past the end are reserved for CUDA-graph padding rows (never handed out).
        self.padding_block = num_blocks
        self.padding_slot = num_conv_slots
        self._ref = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._free_blocks: deque[int] = deque(range(num_blocks))   # unused, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()     # unused, hashed: least recently freed first
        self._cached: dict[bytes, int] = {}                          # hash -> block
        self._free_slots: deque[int] = deque(range(num_conv_slots))
        self._used_slots: set[int] = set()
        self._free_snapshots: deque[int] = deque(range(num_snapshots))
        self._snapshots: OrderedDict[bytes, int] = OrderedDict()    # hash -> snapshot: least recently used first

    # -- queries --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out (cached ones with no user included)."""
        return len(self._free_blocks) + len(self._evictable)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_used_slots(self) -> int:
        return len(self._used_slots)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that `seq` can hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    # -- hashing --------------------------------------------------------------------------
    def num_hashed(self, seq: Sequence, num_tokens: int) -> int:
        """How many of `seq`'s full blocks within its first `num_tokens` tokens have their chain
        hash in `seq.block_hashes` (up to the first block holding a token still in flight), hashing
        those not hashed yet: each block is hashed once."""
        hashes, bs, tokens = seq.block_hashes, self.block_size, seq.token_ids
        num_blocks = min(num_tokens, len(tokens)) // bs
        for i in range(len(hashes), num_blocks):
            block = tokens[i * bs:(i + 1) * bs]
            if IN_FLIGHT in block:
                return i
            h = hashlib.blake2b(hashes[-1] if hashes else b"", digest_size=16)
            h.update(array("q", block).tobytes())
            for first, last, digest in seq.image_keys:  # the images whose features sit in this block
                if first < (i + 1) * bs and last >= i * bs:
                    h.update(digest)
            hashes.append(h.digest())
        return num_blocks

    # -- prefix lookup and admission ------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> PrefixHit:
        """The longest cached block-aligned start of `seq` that it can resume from: its blocks are
        cached and the conv state at their end is. The last token is never in it (its logits
        are needed)."""
        if not self.caching:
            return NO_HIT
        best, blocks, snapshot = 0, [], None
        for i in range(self.num_hashed(seq, seq.num_tokens - 1)):
            h = seq.block_hashes[i]
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
            if h in self._snapshots:
                best, snapshot = i + 1, self._snapshots[h]
        if not best:
            return NO_HIT
        return PrefixHit(blocks[:best], snapshot, best * self.block_size)

    def can_admit(self, seq: Sequence, num_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        """Whether `seq` can start with `hit` and room for its first `num_tokens` tokens."""
        reused = sum(1 for b in hit.blocks if self._ref[b] == 0)  # taken out of the free count
        need = self.blocks_for(num_tokens) - len(hit.blocks)
        return self.num_free_slots > 0 and need <= self.num_free_blocks - reused

    def admit(self, seq: Sequence, num_tokens: int, hit: PrefixHit = NO_HIT) -> None:
        """Give a waiting sequence its conv slot, the cached blocks of `hit` and new blocks for its
        first `num_tokens` tokens. (The runner restores the conv state from `hit.snapshot`.)"""
        assert seq.conv_slot is None and not seq.block_table, f"{seq} already holds cache"
        slot = self._free_slots.popleft()
        self._used_slots.add(slot)
        seq.conv_slot = slot
        for block in hit.blocks:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
        seq.block_table = list(hit.blocks)
        seq.num_registered_blocks = len(hit.blocks)
        if hit.blocks and seq.block_hashes[len(hit.blocks) - 1] in self._snapshots:  # used: most recent
            self._snapshots.move_to_end(seq.block_hashes[len(hit.blocks) - 1])
        self.grow(seq, num_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        need = self.extra_blocks_needed(seq, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: {seq} needs {need}, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._take_block())

    def _take_block(self) -> int:
        if self._free_blocks:
            block = self._free_blocks.popleft()
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
        self._ref[block] = 1
        return block

    def _uncache(self, block: int) -> None:
        h = self._hash_of[block]
        self._hash_of[block] = None
        del self._cached[h]
        snapshot = self._snapshots.pop(h, None)
        if snapshot is not None:
            self._free_snapshots.append(snapshot)

    # -- registration and snapshots -------------------------------------------------------
    def register(self, seq: Sequence) -> None:
        """Cache `seq`'s full blocks whose tokens are computed and known on the host (call after
        a step), binding the snapshots taken at their ends."""
        if not self.caching:
            return
        if min(seq.num_computed_tokens, seq.num_tokens) < (seq.num_registered_blocks + 1) * self.block_size:
            return  # no new full block (most steps: O(1))
        n = self.num_hashed(seq, seq.num_computed_tokens)
        for i in range(seq.num_registered_blocks, n):
            h, block = seq.block_hashes[i], seq.block_table[i]
            if h not in self._cached:
                self._cached[h] = block
                self._hash_of[block] = h
            # else: another block holds these tokens already; this one stays uncached
            snapshot = seq.pending_snapshots.pop(i, None)
            if snapshot is not None:
                if h in self._snapshots:
                    self._free_snapshots.append(snapshot)
                else:
                    self._snapshots[h] = snapshot
        seq.num_registered_blocks = max(seq.num_registered_blocks, n)

    def wants_snapshot(self, seq: Sequence, block_index: int) -> bool:
        """Whether a step that ends block `block_index` of `seq` should snapshot the conv state:
        not when the cache already has the snapshot of that block's tokens."""
        if not self.caching:
            return False
        known = self.num_hashed(seq, (block_index + 1) * self.block_size) > block_index
        return not known or seq.block_hashes[block_index] not in self._snapshots

    def new_snapshot(self, seq: Sequence, block_index: int) -> int | None:
        """A snapshot id for the conv state at the end of block `block_index` of `seq` (written by
        the step being scheduled; bound to the block's hash when the block is registered), or
        None when every snapshot is pending."""
        if self._free_snapshots:
            snapshot = self._free_snapshots.popleft()
        elif self._snapshots:  # the least recently used one; its blocks stay cached
            _, snapshot = self._snapshots.popitem(last=False)
        else:
            return None
        seq.pending_snapshots[block_index] = snapshot
        return snapshot

    # -- release --------------------------------------------------------------------------
    def free(self, seq: Sequence, cache: bool = True) -> None:
        """Return all of `seq`'s blocks and its slot (finish, abort or preemption); with `cache`,
        its computed full blocks are registered first and stay cached once unused."""
        if cache:
            self.register(seq)
        for block in reversed(seq.block_table):  # a prefix's tail is evicted before its head
            if self._ref[block] <= 0:
                raise CacheLeakError(f"KV block {block} of {seq.request_id!r} freed twice")
            self._release_block(block)
        seq.block_table = []
        seq.num_registered_blocks = 0
        self._free_snapshots.extend(seq.pending_snapshots.values())
        seq.pending_snapshots = {}
        if seq.conv_slot is not None:
            if seq.conv_slot not in self._used_slots:
                raise CacheLeakError(f"conv slot {seq.conv_slot} of {seq.request_id!r} freed twice")
            self._used_slots.remove(seq.conv_slot)
            self._free_slots.append(seq.conv_slot)
            seq.conv_slot = None

    def _release_block(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if self._hash_of[block] is not None:
                self._evictable[block] = None
            else:
                self._free_blocks.append(block)

    def reclaim(self, owners: Iterable[Sequence]) -> None:
        """Return every block reference, slot and pending snapshot that none of `owners` holds
        (after a step that failed part-way, when a sequence may have been dropped between taking
        cache and keeping it)."""
        owners = list(owners)
        held = Counter(b for s in owners for b in s.block_table)
        for block in range(self.num_blocks):
            while self._ref[block] > held[block]:
                self._release_block(block)
        slots = {s.conv_slot for s in owners if s.conv_slot is not None}
        for slot in self._used_slots - slots:
            self._used_slots.remove(slot)
            self._free_slots.append(slot)
        known = set(self._free_snapshots) | set(self._snapshots.values()) | \
            {x for s in owners for x in s.pending_snapshots.values()}
        self._free_snapshots.extend(x for x in range(self.num_snapshots) if x not in known)

    def check_no_leaks(self, holders: Iterable[Sequence] = ()) -> None:
        """Raise unless exactly the blocks, slots and snapshots of `holders` (sessions that keep
        their cache) are handed out, with one reference per holder: call it when no request is
        live. Every other block is free or cached with no user (evictable)."""
        holders = list(holders)
        held = Counter(b for s in holders for b in s.block_table)
        slots = {s.conv_slot for s in holders if s.conv_slot is not None}
        wrong = [b for b in range(self.num_blocks) if self._ref[b] != held[b]]
        if wrong or self._used_slots != slots:
            raise CacheLeakError(f"{len(wrong)} KV blocks with a wrong reference count (e.g. block {wrong[:1]}) and "
                                 f"{len(self._used_slots - slots)} leaked conv slots")
        unused = sorted([*self._free_blocks, *self._evictable])
        if unused != [b for b in range(self.num_blocks) if not held[b]]:
            raise CacheLeakError("the free and evictable KV blocks are not exactly the unused ones")
        if any(self._hash_of[b] is None for b in self._evictable) or any(self._hash_of[b] is not None
                                                                       for b in self._free_blocks):
            raise CacheLeakError("a free block has a hash, or an evictable block has none")
        if any(self._hash_of[b] != h for h, b in self._cached.items()) or \
                len(self._cached) != sum(h is not None for h in self._hash_of):
            raise CacheLeakError("the hash table and the blocks' hashes disagree")
        if not set(self._snapshots).issubset(self._cached):
            raise CacheLeakError("a snapshot outlived its block")
        free_slots = self.num_conv_slots - len(slots)
        if len(self._free_slots) != free_slots or len(set(self._free_slots)) != free_slots:
            raise CacheLeakError(f"{free_slots - len(set(self._free_slots))} conv slots lost")
        snapshots = [*self._free_snapshots, *self._snapshots.values(),
                     *(x for s in holders for x in s.pending_snapshots.values())]
        if sorted(snapshots) != list(range(self.num_snapshots)):
            raise CacheLeakError(f"conv-state snapshots lost or duplicated: {len(snapshots)} accounted for, "
                                 f"{len(set(snapshots))} distinct, of {self.num_snapshots}")
