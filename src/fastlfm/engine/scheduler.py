"""Continuous batching with chunked prefill and preemption by recompute.

Every step has a token budget (`max_num_batched_tokens`). Running sequences are served
first, oldest first: a decoding sequence takes one token, a sequence still in its prompt
takes the next chunk that fits. Whatever budget is left admits waiting sequences. So a long
prompt is cut into chunks that share steps with the decodes instead of stalling them.
When the KV pool cannot hold the next tokens, the newest running sequence is preempted:
its blocks and slot are returned and it re-enters the queue at the front, to be recomputed
from its prompt + outputs so far (its conv state cannot be rebuilt any other way cheaply).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]       # decode rows (1 token) first, then prefill chunks
    num_tokens: list[int]      # tokens fed for each sequence this step
    num_decode: int            # how many leading rows are single-token rows

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
        self.num_preemptions = 0

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
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + n
            while bm.extra_blocks_needed(seq, target) > bm.num_free_blocks:
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

        # 2. Admit waiting sequences while budget, slots and blocks allow (FIFO, no skipping).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not bm.can_admit(seq, n):
                break
            self.waiting.popleft()
            bm.admit(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n

        decode = [(s, n) for s, n in chosen if n == 1]
        prefill = [(s, n) for s, n in chosen if n != 1]
        ordered = decode + prefill
        return ScheduledBatch([s for s, _ in ordered], [n for _, n in ordered], len(decode))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished or aborted), returning its cache exactly once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
