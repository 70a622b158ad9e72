"""One request's state inside the engine: its tokens, cache resources and progress."""

from __future__ import annotations

import enum
import itertools
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"    # holds KV blocks and a conv-state slot
    PARKED = "parked"      # finished a turn and keeps its cache for the next one (a session)
    FINISHED = "finished"  # resources returned


_arrival_counter = itertools.count()
IN_FLIGHT = -1  # placeholder in token_ids for a sampled token not yet read back from the device


class Sequence:
    """Prompt + generated tokens of one request.

    `num_computed_tokens` counts the tokens whose K/V and conv state are in the cache. A
    step feeds `token_ids[num_computed_tokens : num_computed_tokens + n]`; when that reaches
    the end of `token_ids` the step samples the next token. Prefill, chunked prefill, decode
    and recompute after preemption are all this one rule.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: Any):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.arrival = next(_arrival_counter)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.conv_slot: int | None = None
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.keep_cache = False
        self.turn = 0
        # Set by the engine from params and max_model_len: the length at which it stops
        # ("length"), and whether sampling is a plain argmax (no per-request tensors).
        self.max_num_tokens: int = 2**62
        self.plain_greedy = False
        # Asynchronous scheduling: the newest token may still be on the device, as row
        # `in_flight_row` of the step in flight (token_ids holds IN_FLIGHT there until the
        # engine reads it); `awaiting_finish` = that token is its last (length limit), so the
        # scheduler gives it no more steps.
        self.in_flight_row: int | None = None
        self.awaiting_finish = False
        # Structured output: the request's grammar matcher (fastlfm.structured), advanced by
        # each token the engine reads back, and its lane (which compiled copy of the grammar).
        self.grammar = None
        self.grammar_lane = 0
        # Filled by the engine's output processing (the text stream, logprobs).
        self.text_stream = None
        self.logprobs: list = []
        # LFM2-VL (engine/multimodal.py): pixel tensors until encoded, then the features of
        # the prompt's `<image>` positions (sorted), one row each.
        self.image_inputs = None
        self.image_positions: list[int] = []
        self.image_embeds = None
        # Prefix caching (block_manager.py): the chain hashes of its full blocks of known tokens
        # (computed once each), how many of its blocks are registered in the cache, the conv-state
        # snapshots taken at block ends and not yet bound to their block's hash (block index ->
        # snapshot id), and per image view (first, last prompt position of its features, content
        # digest), which the hash of a block holding those positions includes.
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.pending_snapshots: dict[int, int] = {}
        self.image_keys: list[tuple[int, int, bytes]] = []
        # Prompt tokens of the current turn served from the prefix cache (None until admitted).
        self.num_cached_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """Its request is over (finished, aborted, or a session parked after its turn)."""
        return self.status is SequenceStatus.FINISHED or self.status is SequenceStatus.PARKED

    @property
    def holds_cache(self) -> bool:
        return self.conv_slot is not None

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, slot={self.conv_slot})")
