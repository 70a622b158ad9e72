"""LLMEngine: the synchronous core (add requests, step, collect outputs).

Every generation API of fastlfm runs here: `LLM` (generate, chat, stream, Conversation),
`model.generate()`, the CLI and the server. `iter_outputs` drives the steps for synchronous
callers; `AsyncLLMEngine` drives them from a thread for the server.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Sequence as Seq

import torch

from .. import cpu_gemv
from ..cpu_linear import HugePageMove, prepare_for_cpu, prepared_for_cpu
from ..sampling import SamplingParams, eos_token_ids
from ..structured import (PAR_MIN_ROWS, GrammarCache, PoolChoice, advance_all as grammar_advance_all,
                          fill_bitmask, unpack_bitmask)
from ..tokenizer import TextStream
from . import multimodal
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import IN_FLIGHT, Sequence, SequenceStatus


# CPU default cache pool (KV blocks + conv-state snapshots), zero-filled at start: 256 MiB is ~21k tokens
# of LFM2-350M's / 1.2B's bf16 KV.
CPU_CACHE_BYTES = 256 * 2**20


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


FINISH_REASONS = ("eos", "stop", "length", "abort")


@dataclass
class RequestOutput:
    """What one step added to one request.

    finish_reason: "eos" (an eos id or one of the request's stop_token_ids, kept as the last
    token, left out of the text), "stop" (a stop string: the text ends before it), "length"
    (max_new_tokens or max_model_len), "abort" (aborted, or failed: then `error` says why).
    `new_text` is final (never taken back); `text`, the whole text so far, is joined when read.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_tokens: int                  # prompt + generated tokens known when this output was made
    all_token_ids: list[int] = field(repr=False)  # the sequence's list, shared: final up to num_tokens
    logprobs: list[TokenLogprob] | None = None
    text_stream: TextStream | None = field(default=None, repr=False)
    num_chars: int = 0               # characters of the text released when this output was made
    error: BaseException | None = None
    num_cached_tokens: int = 0       # prompt tokens served from the prefix cache (or a session's own cache)

    @property
    def text(self) -> str:
        return self.text_stream.text[:self.num_chars] if self.text_stream is not None else ""

    @property
    def token_ids(self) -> list[int]:
        """All generated tokens so far. Sliced on access: a step makes one output per running
        request, and copying every history every step would cost more than the step."""
        return self.all_token_ids[self.num_prompt_tokens:self.num_tokens]

    @property
    def num_generated_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def merged(self, later: "RequestOutput") -> "RequestOutput":
        """This output and a later one of the same request as one output (what both added)."""
        return merge_outputs([self, later])


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one (what they all added): one copy of each part, so
    holding n outputs back and merging them once costs O(n), not O(n^2) of pairwise merges."""
    last = outputs[-1]
    if len(outputs) == 1:
        return last
    first = outputs[0]
    lp = None if first.logprobs is None else [x for o in outputs for x in (o.logprobs or ())]
    return replace(last, new_token_ids=[t for o in outputs for t in o.new_token_ids],
                   new_text="".join(o.new_text for o in outputs), logprobs=lp)


@dataclass
class StepInFlight:
    """A launched step whose sampled ids are still on their way to the host."""

    entries: list[tuple[Sequence, int, int]]  # (sequence, index of its new token in token_ids, its turn)
    token_ids: torch.Tensor                # (rows,) on the device: input of the next step
    host: list[torch.Tensor]               # ids [, logprobs, top ids, top logprobs] being copied
    event: torch.cuda.Event | None         # recorded after the copies (CUDA)
    fetched: list[list] | None = None      # the host lists, once read
    # Structured output: row -> whether its grammar is complete after its token (or the grammar's
    # error), once the grammars have taken this step's tokens (LLMEngine._feed_grammars).
    grammar_results: dict[int, bool | Exception] | None = None

    def fetch(self) -> list[list]:
        if self.fetched is None:
            if self.event is not None:
                self.event.synchronize()  # waits for this step's copies only, not for later steps
            self.fetched = [t.tolist() for t in self.host]
        return self.fetched


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    conv_slots_used: int
    conv_slots_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int = 0
    num_parked_sessions: int = 0
    prefix_cache_queries: int = 0    # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0       # of those, tokens found cached
    kv_blocks_cached: int = 0        # blocks registered in the prefix cache (in use or evictable)


class LLMEngine:
    """Continuous-batching engine over one model (CPU eager path or CUDA with graphs + Triton).

    Sizing: `max_num_batched_tokens` is the per-step token budget (prefill chunk size);
    `num_kv_blocks` defaults to what `gpu_memory_utilization` leaves on CUDA, or on CPU enough for
    `max_num_seqs` full-length sequences within CPU_CACHE_BYTES (at least one; more sequences than
    fit run by preemption); `block_size` tokens per KV block.
    `compile` (default: on CUDA) runs the decode step through torch.compile before its CUDA
    graphs are captured; inductor's on-disk caches make a second start of the same model fast.
    `lazy_graphs` (CUDA): each decode batch size is compiled and captured as a CUDA graph when a
    step first needs it, so the first request is answered after batch 1 alone; with False every
    size is captured at start (a server: no client waits on a compile mid-run).
    `prefill_graph_tokens` (CUDA): a step that prefills (a prompt chunk, or chunks beside decodes)
    with up to this many tokens replays a CUDA graph (model_runner.py) instead of launching every
    kernel from the host; 0 turns them off. With `lazy_graphs` False all of them are captured at start.
    `enforce_eager` (CUDA: no torch.compile, no CUDA graphs; CPU: batch-1 decode steps run the
    forward each time instead of replaying the step recorded once, engine/cpu_graph.py, which needs
    fastlfm's CPU kernels).
    `pack_cpu_weights` (CPU, float models): "auto" (default) swaps the projections for CPU kernel
    modules and, per (dtype, weight shape), pre-packs them for oneDNN where a batch-1 product timed
    at load (once per process) is faster than torch's plain F.linear on this host; True packs
    every shape, False keeps the model's own nn.Linear layers (fastlfm.cpu_linear.prepare_for_cpu;
    the `FASTLFM_CPU_PACK` environment variable, packed / plain, overrides "auto"). The model is
    changed in place, and its train() / save_pretrained() change it back.

    Asynchronous scheduling (`async_scheduling`, on by default on CUDA): a step is launched
    before the previous step's sampled ids reach the host. They feed the new step on the
    device, and the host reads and processes them while the GPU runs, so Python scheduling
    and output handling overlap the forward. A sequence that stops on eos or a stop string
    costs one discarded row in the following step. Requests with repetition/presence/
    frequency penalties need their full history on the host, so while one is live the
    engine runs synchronously. Requests under a grammar (structured output) need their last
    token before their next one is sampled, not before the forward: when a step holds one, its
    forward is launched first, the grammars take the tokens of the step in flight and their token
    masks are filled while the device runs it, then the step samples; the rest of the processing
    (text, stops, outputs) follows as usual.

    Failures: an exception inside `step()` (a bug, CUDA OOM, KeyboardInterrupt) aborts the
    requests that step had taken on, frees their cache and re-raises; `failed_outputs` lists
    them (with the error) and the engine keeps working. An error found in one request's
    output processing aborts that request alone (`RequestOutput.error`).

    LFM2-VL: requests may carry images (`add_request(..., image_inputs=...)`, see
    engine/multimodal.py); `processor` (an `Lfm2VlProcessor`, loaded by `from_pretrained`)
    is kept for callers that build such requests (the server); `max_vision_views` caps the
    image views one vision-tower call encodes.

    Prefix caching (`enable_prefix_caching`, on by default): full KV blocks are shared between
    requests whose tokens (and images) start the same way, and kept after use until their room
    is needed; the conv state where a reused prefix ends comes from one of `num_conv_snapshots`
    snapshots (default: a quarter of `num_kv_blocks`, at least `max_num_seqs`); see
    engine/block_manager.py. Outputs report `num_cached_tokens`.

    Structured output: `grammar_threads` threads of llguidance's pool advance the grammars and fill
    their token masks when a step has at least `structured.PAR_MIN_ROWS` constrained rows and the
    pool has lately been the faster way (`structured.PoolChoice`), the requests dealt over as many
    lanes (see fastlfm.structured); 0 or 1: one row after the other.
    Default: half the CPUs (at most 16) on CUDA, 0 on the CPU (whose cores run the forward). On the
    CPU, greedy steps fill no mask for a row whose grammar accepts its argmax (`grammar_argmax_first`).
    """

    def __init__(self, model, tokenizer=None, *, max_num_seqs: int = 256, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, block_size: int | None = None,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.85,
                 enforce_eager: bool = False, compile: bool | None = None, async_scheduling: bool | None = None,
                 processor=None, max_vision_views: int = 32, pack_cpu_weights: bool | str = "auto",
                 lazy_graphs: bool = True, enable_prefix_caching: bool = True, num_conv_snapshots: int | None = None,
                 grammar_threads: int | None = None, prefill_graph_tokens: int = 4096):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.processor = processor
        self.generation_config = getattr(model, "generation_config", None)
        self.device, self.dtype = model.device, model.dtype  # what the cache pool and any captured steps were made for
        on_cuda = self.device.type == "cuda"
        self.max_model_len = int(max_model_len or min(self.config.max_position_embeddings, 32768 if on_cuda else 4096))
        self.max_num_seqs = max_num_seqs
        block_size = block_size or (64 if on_cuda else 16)
        self.max_num_batched_tokens = max_num_batched_tokens or (16384 if on_cuda else 2048)
        blocks_per_seq = -(-self.max_model_len // block_size)
        if num_kv_blocks is None:
            num_kv_blocks = self._blocks_from_memory(block_size, gpu_memory_utilization, enable_prefix_caching) \
                if on_cuda else self._cpu_blocks(block_size, blocks_per_seq, enable_prefix_caching)
        if num_kv_blocks < blocks_per_seq:
            raise ValueError(f"num_kv_blocks={num_kv_blocks} cannot hold one sequence of max_model_len="
                             f"{self.max_model_len} ({blocks_per_seq} blocks of {block_size}); lower max_model_len")
        if not enable_prefix_caching:
            num_conv_snapshots = 0
        elif num_conv_snapshots is None:
            num_conv_snapshots = max(num_kv_blocks // 4, max_num_seqs)
        elif num_conv_snapshots < 1:
            raise ValueError(f"num_conv_snapshots must be >= 1 with prefix caching, got {num_conv_snapshots} "
                             "(enable_prefix_caching=False turns the cache off)")
        self.block_manager = BlockManager(num_kv_blocks, block_size, max_num_seqs, num_conv_snapshots)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, self.max_num_batched_tokens)
        self.compiled = on_cuda and not enforce_eager and (on_cuda if compile is None else bool(compile))
        # CPU: projections pre-packed for oneDNN (a quantized model is kept as it is); the model's
        # train() / save_pretrained() unpack them, and the next step packs them again.
        if not (isinstance(prefill_graph_tokens, int) and prefill_graph_tokens >= 0):
            raise ValueError(f"prefill_graph_tokens must be an int >= 0 (0: no prefill graphs), got {prefill_graph_tokens!r}")
        if pack_cpu_weights not in (True, False, "auto"):
            raise ValueError(f'pack_cpu_weights must be True, False or "auto", got {pack_cpu_weights!r}')
        if pack_cpu_weights != "auto":
            pack_cpu_weights = bool(pack_cpu_weights)
        self.packs_for_cpu = not on_cuda and pack_cpu_weights is not False
        self.cpu_pack: bool | str = pack_cpu_weights
        if self.packs_for_cpu:
            prepare_for_cpu(model, pack=self.cpu_pack)
        # The float weights move onto huge pages once decoding begins (off the first token's path);
        # None: not begun for the weights as prepared now.
        self.huge_page_move: HugePageMove | None = None
        self.async_scheduling = on_cuda if async_scheduling is None else bool(async_scheduling)
        self.runner = ModelRunner(model, block_size=block_size, num_blocks=num_kv_blocks, num_conv_slots=max_num_seqs,
                                  max_model_len=self.max_model_len, max_num_seqs=max_num_seqs,
                                  use_cuda_graphs=on_cuda and not enforce_eager, use_triton=on_cuda,
                                  compile=self.compiled, max_vision_views=max_vision_views, lazy_graphs=lazy_graphs,
                                  num_conv_snapshots=num_conv_snapshots,
                                  prefill_graph_tokens=min(prefill_graph_tokens, self.max_num_batched_tokens),
                                  cpu_graphs=not on_cuda and not enforce_eager and cpu_gemv.available(),
                                  in_flight_ids=self.async_scheduling)
        self.eos_token_ids = eos_token_ids(self.generation_config, self.config.eos_token_id,
                                           tokenizer.eos_token_id if tokenizer is not None else None)
        self.in_flight: StepInFlight | None = None
        self.num_history_requests = 0  # live requests whose sampling needs their token history
        self.num_grammar_requests = 0  # live requests under a grammar (structured output)
        self._grammars = None  # fastlfm.structured.GrammarCache, made by the first constrained request
        # Threads that advance the grammars and fill their masks in a step with many constrained rows
        # (llguidance's pool, the GIL released).
        if grammar_threads is None:
            grammar_threads = min(16, (os.cpu_count() or 1) // 2) if on_cuda else 0
        self.grammar_threads = int(grammar_threads)
        # Greedy steps: a row whose grammar accepts its argmax gets no mask (_grammar_mask); CPU engines only.
        self.grammar_argmax_first = not on_cuda
        self._grammar_lanes = itertools.count()  # requests under a grammar, dealt round-robin over lanes
        self._grammar_pool = None  # its executor, made at the first step that may use it (_on_pool_or_not)
        # pool or loop, by the time each took lately: for the masks, for the advances
        self._pool_choices = {"masks": PoolChoice(), "advance": PoolChoice()}
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.failed_outputs: list[RequestOutput] = []  # the requests the last failed step aborted
        # Aborts and session releases that arrive while the engine is busy (a generator closed
        # or a chat collected mid-step) wait here and are applied before the next step.
        self._deferred: deque[tuple[str, Any]] = deque()
        self._busy = False
        self._kept: dict[str, deque[RequestOutput]] = {}  # outputs awaiting their iter_outputs consumer
        self._ready: set[str] = set()  # request ids whose kept outputs are not empty

    @classmethod
    def from_pretrained(cls, model: str, *, device=None, dtype="auto", quantization: str | None = None,
                        **engine_kwargs) -> "LLMEngine":
        """An engine over a checkpoint (hub id, folder or GGUF file) with its tokenizer (and LFM2-VL
        processor); `quantization` ("int8" / "int4") for the CPU kernels."""
        from ..gguf import is_gguf_file, load_gguf
        from ..models import load_model

        if is_gguf_file(model):
            lm, tok = load_gguf(model, dtype=dtype, device=device, quantization=quantization)
            return cls(lm, tok, **engine_kwargs)
        # the class by model_type (LFM2, MoE, VL)
        lm = load_model(model, dtype=dtype, device=device, quantization=quantization)
        tok, processor = load_tokenizer(model, lm.config)
        if processor is not None:
            engine_kwargs.setdefault("processor", processor)
        return cls(lm, tok, **engine_kwargs)

    def _bytes_per_block(self, block_size: int, prefix_caching: bool) -> float:
        """Cache memory per KV block: K and V of every attention layer, and with prefix caching a quarter
        of a conv-state snapshot (one per four blocks: the default num_conv_snapshots)."""
        cfg = self.config
        n_attn = sum(cfg.is_attention_layer(i) for i in range(cfg.num_hidden_layers))
        per_block = 2 * n_attn * block_size * cfg.num_key_value_heads * cfg.head_dim * self.model.dtype.itemsize
        if prefix_caching:
            n_conv = cfg.num_hidden_layers - n_attn
            per_block += n_conv * (cfg.conv_L_cache - 1) * cfg.hidden_size * self.model.dtype.itemsize / 4
        return per_block

    def _cpu_blocks(self, block_size: int, blocks_per_seq: int, prefix_caching: bool) -> int:
        """CPU: enough blocks for `max_num_seqs` full-length sequences, within CPU_CACHE_BYTES (at least
        one full-length sequence). The pool is zero-filled at start: a pool sized for 64 sequences of
        4k tokens was 3 GiB for LFM2-350M, and 4 s of a cold start."""
        budget = int(CPU_CACHE_BYTES // self._bytes_per_block(block_size, prefix_caching))
        return max(blocks_per_seq, min(self.max_num_seqs * blocks_per_seq, budget))

    def _blocks_from_memory(self, block_size: int, utilization: float, prefix_caching: bool) -> int:
        cfg = self.config
        per_block = self._bytes_per_block(block_size, prefix_caching)
        free, total = torch.cuda.mem_get_info(self.device)
        # Leave room for activations of a full token budget (MLP intermediates dominate) + logits.
        activations = self.max_num_batched_tokens * (cfg.hidden_size * 12 + 2 * cfg.intermediate_size) * 2 \
            + self.max_num_seqs * cfg.vocab_size * 4 * 2
        budget = free - (1 - utilization) * total - activations
        return max(int(budget // per_block), 1)

    # -- requests -----------------------------------------------------------------------
    def add_request(self, prompt: list[int] | str, params=None, request_id: str | None = None, *,
                    image_inputs: Mapping[str, Any] | None = None, keep_cache: bool = False,
                    continue_from: Sequence | None = None, detokenize: bool = True) -> Sequence:
        """Queue one request and return its Sequence.

        LFM2-VL: `image_inputs` holds the processor's pixel_values, pixel_attention_mask and
        spatial_shapes for the `<image>` runs of `prompt` (ids expanded by the processor); extra
        keys of a processor output are ignored.
        Sessions: with `keep_cache` the sequence keeps its cache when the request finishes;
        `continue_from=` that sequence appends `prompt` to it as the next turn and continues
        from its cache (or recomputes, if the cache was evicted meanwhile); `release` ends it.
        `detokenize=False`: token ids only (no text stream, so no stop strings)."""
        self._apply_deferred()
        params = params if params is not None else SamplingParams.from_generation_config(self.generation_config)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a fastlfm.sampling.SamplingParams, got {type(params).__name__}")
        params = params.validate(self.config.vocab_size)
        if params.seed is None:  # fix the request's random stream now: stable across steps and preemption
            params = replace(params, seed=int(torch.randint(0, 2**62, ()).item()))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass prompt token ids instead of text")
            prompt = self.tokenizer.encode(prompt)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt is empty: at least one token is needed")
        history = len(continue_from.token_ids) if continue_from is not None else 0
        if history + len(prompt) > self.max_model_len:
            what = f"the session's {history} cached tokens + {len(prompt)} new ones" if continue_from is not None \
                else f"prompt has {len(prompt)} tokens"
            raise ValueError(f"{what}: more than max_model_len={self.max_model_len}")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        images, image_positions = multimodal.check_image_inputs(self.config, prompt, image_inputs)
        if images is not None and continue_from is not None:
            raise ValueError("a session's later turns cannot bring images (start a new session)")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text_stream = self._text_stream(params, detokenize)
        grammar, lane = None, 0
        if params.constrained:  # the lane it gets, or lane 0 while that one compiles
            lane = next(self._grammar_lanes) % max(1, self.grammar_threads)
            grammar, lane = self.grammars.lane_matcher(params, lane)
        if continue_from is None:
            seq = Sequence(request_id, prompt, params)
            seq.keep_cache = keep_cache
            seq.image_inputs, seq.image_positions = images, image_positions
            if images is not None and self.block_manager.caching:
                seq.image_keys = multimodal.image_keys(self.config, images, image_positions)
        else:
            seq = continue_from
            if not (seq.keep_cache and seq.is_finished):
                raise ValueError(f"{seq} cannot continue: only a session (keep_cache) whose last turn ended can")
            seq.request_id, seq.params = request_id, params
            seq.token_ids.extend(prompt)
            seq.num_prompt_tokens = len(seq.token_ids)
            seq.turn += 1
            seq.finish_reason, seq.logprobs, seq.num_cached_tokens = None, [], None
            seq.in_flight_row, seq.awaiting_finish = None, False
        seq.max_num_tokens = min(seq.num_prompt_tokens + _max_new(params), self.max_model_len)
        seq.plain_greedy = _is_plain_greedy(params)
        seq.text_stream = text_stream
        seq.grammar, seq.grammar_lane = grammar, lane
        self.requests[request_id] = seq
        self.num_history_requests += _needs_history(params)
        self.num_grammar_requests += grammar is not None
        if continue_from is None:
            self.scheduler.add(seq)
        else:
            self.scheduler.resume(seq)
        self.prompt_tokens_total += len(prompt)
        return seq

    @property
    def grammars(self):
        """The compiled grammars of structured output (`fastlfm.structured.GrammarCache`); the
        server compiles a request's grammar here before adding it, off its event loop."""
        if self._grammars is None:
            self._grammars = GrammarCache(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        return self._grammars

    def _text_stream(self, params: SamplingParams, detokenize: bool) -> TextStream | None:
        if detokenize and self.tokenizer is not None:
            return TextStream(self.tokenizer, params.stop_strings, params.skip_special_tokens,
                              params.keep_special_token_ids)
        if params.stop_strings:
            raise ValueError("stop strings need the text: " + (
                "this engine has no tokenizer" if self.tokenizer is None else "the request was made without it"))
        return None

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a live request (its cache is freed, a session's too); None if it is not live.
        Called while a step runs (from a finalizer), it takes effect before the next step."""
        if self._busy:
            self._deferred.append(("abort", request_id))
            return None
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return self._output(seq, [], [])

    def release(self, seq: Sequence) -> None:
        """End a session: its cache goes back now (after the running step, if one runs), or when
        its live turn finishes."""
        if self._busy:
            self._deferred.append(("release", seq))
            return
        seq.keep_cache = False
        if seq.status is SequenceStatus.PARKED:
            self.scheduler.finish(seq, seq.finish_reason)

    def drop_uncomputed(self, seq: Sequence, n: int) -> bool:
        """Drop the last `n` tokens of a session between turns if none of them is in its cache
        yet (a reply's eos that the chat template writes its own way); False, changing nothing,
        if one is (asynchronous scheduling may already have fed it)."""
        if not (seq.keep_cache and seq.is_finished) or seq.num_computed_tokens > len(seq.token_ids) - n \
                or n > len(seq.token_ids) - 1:
            return False
        del seq.token_ids[len(seq.token_ids) - n:]
        del seq.block_hashes[len(seq.token_ids) // self.block_manager.block_size:]
        return True

    def release_later(self, seq: Sequence) -> None:
        """`release`, from any thread or a garbage-collection finalizer: applied by the engine's
        owner before its next step or request."""
        self._deferred.append(("release", seq))

    def _apply_deferred(self) -> None:
        while self._deferred:
            kind, what = self._deferred.popleft()
            if kind == "abort":
                self.abort(what)
            else:
                self.release(what)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight is not None

    def _finish(self, seq: Sequence, reason: str, cache: bool = True) -> None:
        self.requests.pop(seq.request_id, None)
        self.num_history_requests -= _needs_history(seq.params)
        if seq.grammar is not None:
            self.num_grammar_requests -= 1
            seq.grammar = None
        seq.in_flight_row = None
        multimodal.release(seq)
        while seq.token_ids and seq.token_ids[-1] == IN_FLIGHT:  # a token it will never get
            seq.token_ids.pop()
        if seq.keep_cache and reason != "abort":
            self.scheduler.park(seq, reason)
        else:
            seq.keep_cache = False  # an aborted session is over: its cache may be half-updated
            self.scheduler.finish(seq, reason, cache=cache)

    # -- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one forward + sampling; return the outputs of requests that
        progressed. With asynchronous scheduling those are the tokens of the previous step,
        read while this one runs; `has_unfinished()` stays true until the last is read."""
        self._apply_deferred()
        if self.packs_for_cpu and not prepared_for_cpu(self.model):
            prepare_for_cpu(self.model, pack=self.cpu_pack)
            self.runner.drop_graphs()  # recorded with the weights that were swapped out
            self.huge_page_move = None  # (a pending move copied the old weights)
        elif self.huge_page_move is not None and self.huge_page_move.finish():
            self.runner.drop_graphs()  # (same)
        self._busy = True
        try:
            return self._step()
        except BaseException as e:
            self._recover(e)
            raise
        finally:
            self._busy = False

    def _step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        if self.in_flight is not None and (not self.async_scheduling or self.num_history_requests):
            outputs += self._process(self._take_in_flight())
        batch = self.scheduler.schedule()
        if self.packs_for_cpu and self.huge_page_move is None and batch.num_decode:
            self.huge_page_move = HugePageMove(self.model)
        launched = None
        if not batch.is_empty:
            rows, logits, greedy_ids = self._forward(batch)
            seqs = [batch.seqs[i] for i in rows]
            if self.in_flight is not None and self.num_grammar_requests and any(s.grammar is not None for s in seqs):
                # A grammar's mask depends on the token in flight: the grammars take that step's tokens
                # now, while the device runs this forward (the rest of their processing comes after).
                self._feed_grammars(self.in_flight)
            launched = self._launch(seqs, logits, greedy_ids) if seqs else None
        if self.in_flight is not None:
            outputs += self._process(self._take_in_flight())
        self.in_flight = launched
        if launched is not None and not self.async_scheduling:
            outputs += self._process(self._take_in_flight())
        for seq in batch.seqs:  # the blocks this step filled, now that their tokens are known
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.register(seq)
        return outputs

    def _recover(self, error: BaseException) -> None:
        """A step failed part-way: the requests it had taken on (running ones, and any whose
        token is in flight) may be half-updated, so they are aborted and their cache freed,
        sessions' included; requests still waiting never ran and stay queued."""
        self.in_flight = None
        failed = list(self.scheduler.running) + [
            s for s in self.scheduler.waiting if s.in_flight_row is not None or IN_FLIGHT in s.token_ids[-1:]]
        self.failed_outputs = []
        for seq in failed:
            seq.keep_cache = False
            self._finish(seq, "abort", cache=False)
            self.failed_outputs.append(self._output(seq, [], [], error=error))
        # Cache taken by a sequence that the failure left in no queue goes back too.
        self.block_manager.reclaim([*self.scheduler.running, *self.scheduler.waiting, *self.scheduler.parked])

    def _take_in_flight(self) -> StepInFlight:
        step, self.in_flight = self.in_flight, None
        return step

    def _forward(self, batch) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """Launch the batch's forward: the rows that sample, their logits and (graph step) greedy ids."""
        prev = self.in_flight.token_ids if self.in_flight is not None else None
        rows, logits, greedy_ids = self.runner.execute(batch, prev)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            if seq.image_embeds is not None:  # prompt done: its image features move to host memory
                multimodal.after_step(seq)
        return rows, logits, greedy_ids

    def _launch(self, seqs: list[Sequence], logits: torch.Tensor, greedy_ids: torch.Tensor | None) -> StepInFlight:
        """Sample one token per row and start copying them to the host."""
        token_ids, extra = self._sample(logits, seqs, greedy_ids)
        entries = []
        for j, seq in enumerate(seqs):
            entries.append((seq, len(seq.token_ids), seq.turn))
            seq.token_ids.append(IN_FLIGHT)
            seq.in_flight_row = j
            seq.awaiting_finish = len(seq.token_ids) >= seq.max_num_tokens
        host = [token_ids] + extra
        event = None
        if token_ids.device.type == "cuda":
            pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in host]
            for dst, src in zip(pinned, host):
                dst.copy_(src, non_blocking=True)
            host, event = pinned, torch.cuda.Event()
            event.record()
        else:  # a copy: ids of a graph step live in its static buffer, which the next step overwrites
            host = [t.clone() for t in host]
        return StepInFlight(entries, token_ids, host, event)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One token per row on device, no host sync: ids, plus [logprobs, top ids, top
        logprobs] when a row asks for logprobs. `greedy_ids`: the argmax, if the step computed it."""
        from ..sampling import SamplingTensors, argmax_rows, sample

        if all(s.plain_greedy for s in seqs):
            ids = greedy_ids if greedy_ids is not None else argmax_rows(logits)
            allowed = self._grammar_mask(seqs, logits, ids) if self.num_grammar_requests else None
            if allowed is None:
                return ids, []
            return argmax_rows(torch.where(allowed, logits, float("-inf"))), []  # greedy under grammars
        allowed = self._grammar_mask(seqs, logits) if self.num_grammar_requests else None
        params = [s.params for s in seqs]
        needs_history = any(_needs_history(p) for p in params)
        tensors = SamplingTensors.from_requests(
            params,
            [s.token_ids[: s.num_prompt_tokens] for s in seqs] if needs_history else None,
            [s.output_token_ids for s in seqs] if needs_history else None,
            logits.shape[-1], logits.device, steps=[s.num_output_tokens for s in seqs])
        tensors.allowed = allowed
        out = sample(logits.float(), tensors)
        if out.logprobs is None:
            return out.token_ids, []
        extra = [out.logprobs]
        if out.top_token_ids is not None:
            extra += [out.top_token_ids, out.top_logprobs]
        return out.token_ids, extra

    def _grammar_mask(self, seqs: list[Sequence], logits: torch.Tensor, greedy_ids: torch.Tensor | None = None
                      ) -> torch.Tensor | None:
        """(rows, V) bool on the device: what each row's grammar allows next (all for rows without
        one), from bits filled on the CPU while the forward runs; None if no row has a grammar.

        `greedy_ids` (all rows greedy; `grammar_argmax_first`): the rows' argmax. A row whose grammar
        accepts it needs no mask (the masked argmax is that token; a check costs ~5 us, a mask up to
        ~1 ms inside a bounded JSON string, and a trained model's argmax mostly follows the grammar),
        so only the other rows' masks are filled. Off on CUDA: the argmax must reach the host first,
        and waiting for it in the step serialises the host's work with the device's (BENCHMARKS.md,
        issue 18: 0.74x at batch 64, even with masks filled while the device computed it)."""
        # A grammar that is complete or failed gets no mask: its request ends with the step in flight.
        # ordered by lane: the pool's threads then mostly work within one lane (fastlfm.structured)
        rows = [(s.grammar, j) for j, s in sorted(enumerate(seqs), key=lambda js: js[1].grammar_lane)
                if s.grammar is not None and not s.grammar.is_stopped() and not s.grammar.is_error()]
        if not rows:
            return None
        on_cuda = logits.device.type == "cuda"
        if greedy_ids is not None and self.grammar_argmax_first:  # the rows left out: all allowed
            ids = greedy_ids.tolist()
            rows = [(m, j) for m, j in rows if m.validate_tokens([ids[j]]) != 1]
        bits = self._on_pool_or_not("masks", len(rows), lambda executor: fill_bitmask(
            rows, len(seqs), self.config.vocab_size, pin=on_cuda, executor=executor))
        return unpack_bitmask(bits.to(logits.device, non_blocking=on_cuda), logits.shape[-1])

    def _on_pool_or_not(self, work: str, rows: int, run):
        """run(executor): on llguidance's pool, or with None (one row after the other), as the
        work's PoolChoice says; its time recorded. Below PAR_MIN_ROWS rows: never the pool."""
        if self.grammar_threads < 2 or rows < PAR_MIN_ROWS:
            return run(None)
        if self._grammar_pool is None:
            self._grammar_pool = self.grammars.executor(self.grammar_threads)
        choice = self._pool_choices[work]
        pooled = choice.use_pool()
        t = time.perf_counter()
        result = run(self._grammar_pool if pooled else None)
        choice.record(pooled, time.perf_counter() - t, rows)
        return result

    def _feed_grammars(self, step: StepInFlight) -> dict[int, bool | Exception]:
        """The grammars of the step's constrained rows take their tokens (once per step)."""
        if step.grammar_results is None:
            results = step.grammar_results = {}
            if self.num_grammar_requests:
                token_ids = step.fetch()[0]
                rows = sorted((j for j, (seq, _, turn) in enumerate(step.entries)
                               if seq.grammar is not None and not seq.is_finished and seq.turn == turn),
                              key=lambda j: step.entries[j][0].grammar_lane)  # by lane, as for the masks
                pairs = [(step.entries[j][0].grammar, token_ids[j]) for j in rows]
                # a rejected token is that row's ValueError: that request alone fails
                results.update(zip(rows, self._on_pool_or_not(
                    "advance", len(pairs), lambda executor: grammar_advance_all(pairs, executor))))
        return step.grammar_results

    def _process(self, step: StepInFlight) -> list[RequestOutput]:
        """Read a step's sampled ids back, append them, check stops, build the outputs."""
        host = step.fetch()
        token_ids = host[0]
        grammar_results = self._feed_grammars(step)
        outputs = []
        for j, (seq, index, turn) in enumerate(step.entries):
            if seq.is_finished or seq.turn != turn:  # aborted or stopped already: a discarded row
                continue
            tok = token_ids[j]
            seq.token_ids[index] = tok
            if seq.in_flight_row is not None and len(seq.token_ids) == index + 1:
                seq.in_flight_row = None
            new_lp = []
            n = seq.params.logprobs
            if n is not None and len(host) > 1:
                top = list(zip(host[2][j][:n], host[3][j][:n])) if len(host) > 3 else []
                new_lp = [TokenLogprob(tok, host[1][j], top)]
                seq.logprobs.extend(new_lp)
            try:
                reason, new_text = self._advance(seq, tok, index, grammar_results.get(j))
            except Exception as e:  # this request's own output failed (its text, say): it alone ends
                self._finish(seq, "abort")
                outputs.append(self._output(seq, [tok], new_lp, upto=index + 1, error=e))
                continue
            if reason is not None:
                self._finish(seq, reason)  # drops the in-flight placeholders after `index`
            outputs.append(self._output(seq, [tok], new_lp, new_text, upto=index + 1))
        self.generation_tokens_total += len(outputs)  # one token each
        return outputs

    def _advance(self, seq: Sequence, tok: int, index: int, grammar: bool | Exception | None = None
                 ) -> tuple[str | None, str]:
        """The finish reason (or None) after `tok`, and the text it releases. `grammar`: whether the
        request's grammar is complete after `tok` (its error, if it rejected it)."""
        if isinstance(grammar, Exception):
            raise grammar
        p = seq.params
        reason = None
        is_eos = tok in self.eos_token_ids or tok in p.stop_token_ids
        if grammar:  # nothing may follow
            reason = "eos" if is_eos else "stop"
        elif not p.ignore_eos and is_eos:
            reason = "eos"
        elif index + 1 >= seq.max_num_tokens:
            reason = "length"
        stream = seq.text_stream
        if stream is None:
            return reason, ""
        new_text = stream.add(tok) if reason != "eos" else ""  # an eos is not part of the text
        if stream.stopped:
            return "stop", new_text
        if reason is not None:
            new_text += stream.finish()
        return reason, new_text

    def _output(self, seq: Sequence, new_ids: list[int], new_lp: list, new_text: str = "",
                upto: int | None = None, error: BaseException | None = None) -> RequestOutput:
        """`upto`: the tokens known on the host (later ones may still be in flight)."""
        stream = seq.text_stream
        # Positional, in the fields' order: a step makes one per running request, and keywords
        # cost the dataclass's __init__ twice the time (2.3 vs 1.0 us).
        return RequestOutput(
            seq.request_id, list(new_ids), new_text, seq.is_finished, seq.finish_reason, seq.num_prompt_tokens,
            len(seq.token_ids) if upto is None else upto, seq.token_ids,
            list(new_lp) if seq.params.logprobs is not None else None,
            stream, stream.num_chars if stream is not None else 0, error, seq.num_cached_tokens or 0)

    # -- synchronous API ----------------------------------------------------------------
    def iter_outputs(self, seqs: Seq[Sequence]) -> "OutputStream":
        """An iterator over the outputs of the requests of `seqs`, stepping the engine until they
        have all finished. Outputs are kept from now on, also those made while another stream
        steps the engine, so several streams can be consumed in turns. An output with an
        `error` (its request failed) is raised; closing the stream early (break, an exception,
        garbage collection) aborts its unfinished requests."""
        return OutputStream(self, seqs)

    def _keep(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            kept = self._kept.get(out.request_id)
            if kept is not None:
                kept.append(out)
                self._ready.add(out.request_id)

    def generate(self, prompts: Seq[list[int] | str], params=None,
                 image_inputs: Seq[Mapping[str, Any] | None] | None = None) -> list[RequestOutput]:
        """Run a list of prompts to completion; one final output per prompt, in order.
        `image_inputs`: one processor output (or None for a text prompt) per prompt."""
        if isinstance(params, (list, tuple)) and len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        if image_inputs is not None and len(image_inputs) != len(prompts):
            raise ValueError(f"got {len(image_inputs)} image inputs for {len(prompts)} prompts")
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        images = list(image_inputs) if image_inputs is not None else [None] * len(prompts)
        seqs: list[Sequence] = []
        try:
            for p, sp, im in zip(prompts, plist, images):
                seqs.append(self.add_request(p, sp, image_inputs=im))
        except BaseException:
            for s in seqs:
                self.abort(s.request_id)
            raise
        finals: dict[str, RequestOutput] = {}
        for out in self.iter_outputs(seqs):
            if out.finished:
                finals[out.request_id] = out
        for s in seqs:
            out = finals[s.request_id]
            out.new_token_ids, out.new_text = out.token_ids, out.text
            if out.logprobs is not None:
                out.logprobs = list(s.logprobs)
        return [finals[s.request_id] for s in seqs]

    def stats(self) -> EngineStats:
        bm = self.block_manager
        sched = self.scheduler
        return EngineStats(len(sched.running), len(sched.waiting), bm.num_used_blocks,
                           bm.num_blocks, bm.num_used_slots, bm.num_conv_slots, self.prompt_tokens_total,
                           self.generation_tokens_total, sched.num_preemptions, len(sched.parked),
                           sched.num_prefix_queries, sched.num_prefix_hits, bm.num_cached_blocks)

    def check_no_leaks(self) -> None:
        """Raise unless the only cache handed out is that of parked sessions."""
        self._apply_deferred()
        self.block_manager.check_no_leaks(self.scheduler.parked)


def load_tokenizer(model: str, config) -> tuple[Any, Any]:
    """The tokenizer of a checkpoint (hub id, folder or GGUF file; None for a weights-only folder:
    token ids in, token ids out) and, for LFM2-VL (`config`), its processor (else None)."""
    from ..gguf import is_gguf_file, load_gguf_tokenizer
    from ..loading import resolve_model_dir
    from ..tokenizer import Tokenizer

    if is_gguf_file(model):
        return load_gguf_tokenizer(model), None
    folder = resolve_model_dir(model)
    try:
        tok = Tokenizer.from_pretrained(folder)
    except (FileNotFoundError, OSError, ValueError):
        return None, None
    if multimodal.image_token_id(config) is None:
        return tok, None
    from ..models.lfm2_vl_processing import Lfm2VlProcessor

    return tok, Lfm2VlProcessor.from_pretrained(folder, tok)


class OutputStream:
    """`LLMEngine.iter_outputs`: the outputs of some requests as the engine steps."""

    def __init__(self, engine: LLMEngine, seqs: Seq[Sequence]):
        self.engine = engine
        self.mine = [s.request_id for s in seqs]
        self.live = set(self.mine)
        for rid in self.mine:
            engine._kept.setdefault(rid, deque())
        self._current: deque[RequestOutput] = deque()

    def __iter__(self) -> "OutputStream":
        return self

    def __next__(self) -> RequestOutput:
        engine = self.engine
        try:
            while not self._current:
                if not self.live:
                    raise StopIteration
                ready = [rid for rid in engine._ready if rid in self.live]
                if not ready:
                    if not engine.has_unfinished():
                        raise RuntimeError(f"requests {sorted(self.live)} are not in the engine (aborted elsewhere?)")
                    try:
                        outputs = engine.step()
                    except BaseException:
                        engine._keep(engine.failed_outputs)  # for the other streams of the failed step
                        raise
                    engine._keep(outputs)
                    continue
                for rid in ready:
                    engine._ready.discard(rid)
                    self._current.extend(engine._kept[rid])
                    engine._kept[rid].clear()
            out = self._current.popleft()
            if out.finished:
                self.live.discard(out.request_id)
            if out.error is not None:
                raise out.error
            return out
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop: forget the kept outputs and abort the requests that have not finished."""
        engine, live = self.engine, self.live
        if not self.mine:
            return
        for rid in self.mine:
            engine._kept.pop(rid, None)
            engine._ready.discard(rid)
        self.mine, self.live = [], set()
        for rid in live:
            engine.abort(rid)

    def __del__(self) -> None:
        self.close()


def _max_new(p) -> int:
    return 2**62 if p.max_new_tokens is None else int(p.max_new_tokens)


def _needs_history(p) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def _is_plain_greedy(p) -> bool:
    """The token is the argmax (of the logits a grammar allows, if the request has one)."""
    return not p.sampling and p.logprobs is None and not p.logit_bias and not _needs_history(p)
