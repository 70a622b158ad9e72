"""Continuous batching with chunked prefill and preemption by recompute.

Every step has a token budget (`max_num_batched_tokens`). Running sequences are served
first, oldest first: a decoding sequence takes one token, a sequence still in its prompt
takes the next chunk that fits. Whatever budget is left admits waiting sequences. So a long
prompt is cut into chunks that share steps with the decodes instead of stalling them.
When the KV pool cannot hold the next tokens, the newest running sequence is preempted:
its blocks and slot are returned and it re-enters the queue at the front, to be recomputed
from its prompt + outputs so far (its conv state cannot be rebuilt any other way cheaply).

With prefix caching, a sequence is admitted with the longest cached start of its tokens
(block_manager.match_prefix) and computes only the rest; the step restores its conv state
from that start's snapshot. Every block end a step computes gets a conv-state snapshot (when
the cache has none for those tokens yet). Taking them inside the step costs a few rows per
conv layer: the state at a block end is the K-1 conv inputs before it, which the step has
at hand. So any block-aligned prefix (a shared system prompt ending inside a later request's
first turn, a conversation's previous turn) can be resumed, with no extra step or chunking rule.

Sessions parked between turns keep their blocks and slot while nothing else needs them:
before a running sequence is preempted or a waiting one turned away for lack of blocks or
slots, the least recently parked session gives its cache back (its next turn recomputes).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]       # decode rows (1 token) first, then prefill chunks
    num_tokens: list[int]      # tokens fed for each sequence this step
    num_decode: int            # how many leading rows are single-token rows
    # Prefix caching: (conv slot, snapshot) to copy into the slot before the step (admitted with a
    # cached prefix), and (row, block end position, snapshot) to take during it.
    restores: list[tuple[int, int]] = field(default_factory=list)
    snapshots: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs = min(max_num_seqs, block_manager.num_conv_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: OrderedDict[Sequence, None] = OrderedDict()  # least recently parked first
        self.num_preemptions = 0
        # Prefix cache: prompt tokens looked up at a turn's admission, and those found cached.
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        bm = self.block_manager

        # 1. Running sequences, oldest first; preempt the newest when blocks run out.
        #    Those whose last token is in flight only wait to be finished: no step, no preemption.
        kept = [s for s in self.running if s.awaiting_finish]
        queue = deque(s for s in self.running if not s.awaiting_finish)
        block_size = bm.block_size
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + n
            if target > len(seq.block_table) * block_size:  # most decode steps fit the blocks it has
                while bm.extra_blocks_needed(seq, target) > bm.num_free_blocks:
                    if self.evict_parked():
                        continue
                    victim = queue.pop() if queue else seq
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                bm.grow(seq, target)
            chosen.append((seq, n))
            kept.append(seq)
            budget -= n
        kept.extend(queue)  # running but not served this step (budget spent)
        self.running = kept

        # 2. Admit waiting sequences while budget, slots and blocks allow (FIFO, no skipping),
        #    each from the longest cached start of its tokens.
        restores = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            while True:
                hit = bm.match_prefix(seq)
                n = min(seq.num_tokens - hit.num_tokens, budget)
                fits = bm.can_admit(seq, hit.num_tokens + n, hit)
                if fits or not self.evict_parked():
                    break
            if not fits:
                break
            bm.admit(seq, hit.num_tokens + n, hit)
            seq.num_computed_tokens = hit.num_tokens
            if seq.num_cached_tokens is None:  # the turn's first admission (not a recompute) is what usage reports
                seq.num_cached_tokens = hit.num_tokens
                if bm.caching:
                    self.num_prefix_queries += seq.num_prompt_tokens
                    self.num_prefix_hits += hit.num_tokens
            if hit.snapshot is not None:
                restores.append((seq.conv_slot, hit.snapshot))
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n

        decode = [(s, n) for s, n in chosen if n == 1]
        prefill = [(s, n) for s, n in chosen if n != 1]
        ordered = decode + prefill
        return ScheduledBatch([s for s, _ in ordered], [n for _, n in ordered], len(decode), restores,
                              self._plan_snapshots(ordered))

    def _plan_snapshots(self, rows: list[tuple[Sequence, int]]) -> list[tuple[int, int, int]]:
        """(row, position, snapshot id) for each block end inside a row's chunk that the cache
        has no conv-state snapshot for yet."""
        bm = self.block_manager
        if not bm.caching:
            return []
        bs, plan = bm.block_size, []
        for row, (seq, n) in enumerate(rows):
            start = seq.num_computed_tokens
            if (start + n) // bs == start // bs:  # no block ends in this chunk (most decode rows)
                continue
            for end in range((start // bs + 1) * bs, start + n + 1, bs):
                if bm.wants_snapshot(seq, end // bs - 1):
                    snapshot = bm.new_snapshot(seq, end // bs - 1)
                    if snapshot is not None:
                        plan.append((row, end, snapshot))
        return plan

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _remove(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.PARKED:
            del self.parked[seq]

    def finish(self, seq: Sequence, reason: str, cache: bool = True) -> None:
        """Retire a sequence (finished, aborted, or a session released), returning its cache
        exactly once; `cache=False`: none of its blocks is kept for prefix reuse (a failed step
        may have left them half-written)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self._remove(seq)
        self.block_manager.free(seq, cache=cache)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # -- sessions -----------------------------------------------------------------------
    def park(self, seq: Sequence, reason: str) -> None:
        """End a session's turn, keeping its blocks and slot for the next one."""
        self._remove(seq)
        self.block_manager.register(seq)  # its blocks serve other requests too
        seq.status = SequenceStatus.PARKED
        seq.finish_reason = reason
        self.parked[seq] = None

    def resume(self, seq: Sequence) -> None:
        """Start a session's next turn (its new tokens are already appended): it continues from
        its cache when it still has one, else it queues to recompute from its first token."""
        if seq.status is SequenceStatus.PARKED:
            del self.parked[seq]
            seq.status = SequenceStatus.RUNNING
            seq.num_cached_tokens = seq.num_computed_tokens  # the history, in its own cache
            self.running.append(seq)
        else:
            assert not seq.holds_cache, f"{seq} holds cache but is not parked"
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.append(seq)

    def evict_parked(self) -> bool:
        """Give the cache of the least recently parked session back; False if there is none."""
        if not self.parked:
            return False
        seq, _ = self.parked.popitem(last=False)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.FINISHED
        return True
