"""Structured output: decoding constrained by a JSON schema, a regex or a list of choices.

The grammar library is llguidance (`pip install "fastlfm[structured]"`), imported lazily: fastlfm
works without it until a request asks for structured output. Why llguidance rather than xgrammar
(both compared on the 65,536-token LFM2-shaped test tokenizer, one CPU thread, xgrammar 0.2.9):
- dependencies: llguidance has none (one ~3 MB abi3 wheel); xgrammar requires torch, transformers,
  triton and apache-tvm-ffi, and fastlfm never imports transformers at run time;
- special tokens: llguidance reads the `tokenizers` JSON we already hold, so it knows which added
  tokens are special and never lets them into grammar text; xgrammar built from the raw byte
  vocabulary (its way in without transformers) allowed all 499 special tokens inside a JSON string;
- speed: a mask inside a JSON string took 19 us (llguidance) vs 30 us (xgrammar), a schema compiled
  in 0.5-13 ms vs 12-20 ms; llguidance computes masks lazily (Earley parser, derivative-based
  lexer, token trie), so there is no precompilation to hide.

How the engine uses it (engine/llm_engine.py): each constrained request holds a matcher (a copy
of its grammar's compiled template, cached by `GrammarCache`). The engine launches a step's
forward first, then reads the previous step's tokens and advances the matchers while the device
runs it, fills the token bitmask of the constrained rows on the CPU (`fill_bitmask`), and
samples with the unpacked mask applied on the device (a masked argmax when every row is greedy,
else `SamplingTensors.allowed`). Steps without a constrained row take none of this. With at
least PAR_MIN_ROWS constrained rows, the matchers advance and fill their masks on llguidance's
thread pool (`LLMEngine(grammar_threads=N)`) when that has lately been faster (`PoolChoice`).

Lanes: a matcher copied from a compiled template (`deep_copy`, a shallow clone in llguidance's
Rust) shares the template's lexer, behind one mutex, so the threads filling the masks of copies
of one template take turns (measured on the 16-core GPU host, 64 "records" rows: 1.80 ms a step
in one thread, 2.2-3.7 ms with 2-16 threads). A grammar is therefore compiled once per lane
(lane 0 when first asked for; another lane on a background thread when a request is first dealt
to it, that request going to lane 0 meanwhile: `lane_matcher`), the engine deals its requests
over `grammar_threads` lanes, and a step hands the rows over ordered by lane, so that each
thread of the pool mostly works within one lane (same host: 1.50 / 1.23 / 1.13 / 0.91 ms with
2 / 4 / 8 / 16 threads).

Host cost (CPU, one thread, 65,536-token vocabulary, bench/structured.py's schemas, 64 rows):
inside free strings ("strings") a step's masks take ~0.1 ms; "records" ~2-4 ms, nearly all of it
in the strings bounded by maxLength: with fewer than 10 characters left, no token slice of
llguidance's default set (string content of 1-10, 1-30 or any number of characters) fits what
may follow, and the mask walks the whole token trie (~1-1.5 ms a row). STRING_SLICES adds
slices of 1-9 characters, so a walk only visits tokens longer than what is left (~30% less
for "records").
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["GrammarCache", "PoolChoice", "constraint_of", "advance_all", "fill_bitmask", "unpack_bitmask",
           "MAX_GRAMMAR_CHARS"]

#: Longest schema / regex / choice list (as JSON text) a request may bring: bounds compile time.
MAX_GRAMMAR_CHARS = 64 * 1024
#: Distinct grammars kept compiled.
CACHE_SIZE = 64
#: Token slices (regexes over the vocabulary that llguidance precomputes masks for) added to its
#: default set (`LLTokenizer.general_slices()`: string content of 1-10, 1-30, 1+ characters, JSON
#: whitespace): string content of at most 1..9 characters, for strings bounded by maxLength. The
#: character class is the default set's, so that the slices nest.
STRING_SLICES = [r'[^"\\\x00-\x1F\x7F]{1,%d}' % n for n in range(1, 10)]
#: Fewest constrained rows a step hands to llguidance's thread pool (`LLExecutor`); fewer go one
#: after the other. Measured on 2 shared cores, 2 threads (masks of ~1-6 us each): 4 rows 7 us
#: pooled vs 3 us in a loop, 16 rows 11 vs 10 us, 64 rows 25 vs 36 us (the pool's fixed cost is
#: ~5 us a call).
PAR_MIN_ROWS = 16


# JSON as the model writes it: no free whitespace between tokens (a model may otherwise emit
# whitespace forever), OpenAI-style separators.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError('structured output (json_schema / regex / choice) needs the llguidance package: '
                         'pip install "fastlfm[structured]"') from None
    return llguidance


def constraint_of(params: Any) -> tuple[str, str] | None:
    """(kind, text) of a SamplingParams' constraint, None without one: the cache key, so equal
    constraints share one compiled grammar (a schema's key order is kept: it orders the output)."""
    if params.json_schema is not None:
        schema = params.json_schema
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return "json_schema", text
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        return "choice", json.dumps(list(params.choice))
    return None


def _grammar(llg, kind: str, text: str) -> str:
    if kind == "json_schema":
        try:
            return llg.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"invalid json_schema: {e}") from None
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(text)
    # choice: a Lark grammar of string literals (JSON string syntax, so any text is escaped right)
    return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(text)))


class GrammarCache:
    """Compiles constraints for one tokenizer and vocabulary; keeps the last `size` compiled.

    Thread-safe: the server compiles while it prepares requests (off its event loop), the engine
    looks the same grammars up when the requests arrive.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int] | set[int],
                 size: int = CACHE_SIZE):
        if tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer; this engine has none")
        self._tokenizer, self.vocab_size = tokenizer, int(vocab_size)
        self._eos = sorted(eos_token_ids)
        self._size = size
        self._lock = threading.Lock()
        # constraint -> {lane: compiled template}; see "Lanes" above
        self._templates: OrderedDict[tuple[str, str], dict[int, Any]] = OrderedDict()
        self._ll_tokenizer = None
        self._executors: dict[int, Any] = {}
        self._compiling: set[tuple[tuple[str, str], int]] = set()  # (constraint, lane) being compiled
        self._compiler: ThreadPoolExecutor | None = None  # compiles lanes > 0 (lane_matcher)

    def executor(self, threads: int) -> Any:
        """llguidance's thread pool (`LLExecutor`) of `threads` threads (made once), None for 0 or 1."""
        if threads < 2:
            return None
        with self._lock:
            if threads not in self._executors:
                self._executors[threads] = _llguidance().LLExecutor(threads)
            return self._executors[threads]

    def _setup(self):
        llg = _llguidance()
        with self._lock:
            if self._ll_tokenizer is None:
                # The tokenizer.json text: its byte-level vocabulary and which added tokens are
                # special (those never match grammar text). n_vocab = the model's logits width:
                # ids past the tokenizer's own vocabulary are never allowed.
                self._ll_tokenizer = llg.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=self._eos or None,
                                                     slices=llg.LLTokenizer.general_slices() + STRING_SLICES)
        return llg

    def compile(self, params: Any, lane: int = 0) -> Any:
        """The compiled template (a fresh matcher) of `params`' constraint in `lane` (each lane's
        template compiled on its own); ValueError naming the parameter when it is invalid or too large."""
        constraint = constraint_of(params)
        if constraint is None:
            raise ValueError("these sampling params set no json_schema, regex or choice to compile")
        kind, text = constraint
        if len(text) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"{kind} is {len(text)} characters long; at most {MAX_GRAMMAR_CHARS} are allowed")
        key = (kind, text)
        with self._lock:
            lanes = self._templates.get(key)
            if lanes is not None:
                self._templates.move_to_end(key)
                if lane in lanes:
                    return lanes[lane]
        llg = self._setup()
        try:
            template = llg.LLMatcher(self._ll_tokenizer, _grammar(llg, kind, text), log_level=0)
        except (TypeError, RuntimeError) as e:  # documented not to raise; a safety net for a 400
            raise ValueError(f"invalid {kind}: {e}") from None
        if template.is_error():
            raise ValueError(f"invalid {kind}: {template.get_error()}")
        with self._lock:
            template = self._templates.setdefault(key, {}).setdefault(lane, template)  # a racing compile's wins
            self._templates.move_to_end(key)
            while len(self._templates) > self._size:
                self._templates.popitem(last=False)
        return template

    def matcher(self, params: Any, lane: int = 0) -> Any:
        """A new matcher for one request (its own parse state), a copy of `lane`'s template."""
        return self.compile(params, lane).deep_copy()

    def lane_matcher(self, params: Any, lane: int) -> tuple[Any, int]:
        """A new matcher for one request in `lane` if that lane's template is compiled, and the lane
        it is in. Else, while that lane compiles on a background thread, a copy of lane 0's (compiled
        here if need be): the engine's thread, which calls this, waits for one compile at most."""
        if lane:
            constraint = constraint_of(params)
            with self._lock:
                lanes = self._templates.get(constraint) if constraint is not None else None
                ready = lanes is not None and lane in lanes
                if not ready and lanes is not None and (constraint, lane) not in self._compiling:
                    self._compiling.add((constraint, lane))
                    if self._compiler is None:
                        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="fastlfm-grammar-lanes")
                    self._compiler.submit(self._compile_lane, params, lane)
            if ready:
                return self.matcher(params, lane), lane
        return self.matcher(params, 0), 0

    def _compile_lane(self, params: Any, lane: int) -> None:
        try:
            self.compile(params, lane)  # valid: its lane 0 compiled
        finally:
            with self._lock:
                self._compiling.discard((constraint_of(params), lane))


class PoolChoice:
    """Whether a step's grammar work (advancing the matchers, or filling their masks) runs one
    matcher after the other or on llguidance's pool: whichever cost less per row lately (an
    exponential average for each way), trying the other way every `explore` steps, since the cost
    moves with where the grammars are. Neither way wins everywhere: on the 16-core GPU host, 64
    rows' masks inside free strings took 0.10 ms in one thread and 0.14 ms on a pool of 8 (its
    threads' wake-ups), in strings bounded by maxLength 3.2 vs 1.1 ms."""

    def __init__(self, explore: int = 32, weight: float = 0.25):
        self.explore, self.weight = explore, weight
        self.cost: dict[bool, float | None] = {False: None, True: None}  # seconds per row: loop, pool
        self.steps = 0

    def use_pool(self) -> bool:
        self.steps += 1
        loop, pool = self.cost[False], self.cost[True]
        if loop is None or pool is None:  # each way measured once first
            return loop is not None
        faster = pool < loop
        return not faster if self.steps % self.explore == 0 else faster

    def record(self, pooled: bool, seconds: float, rows: int) -> None:
        per_row, old = seconds / max(rows, 1), self.cost[pooled]
        self.cost[pooled] = per_row if old is None else old + self.weight * (per_row - old)


def advance_all(pairs: list[tuple[Any, int]], executor: Any = None) -> list[bool | ValueError]:
    """Feed each (matcher, token) pair's sampled token to its request's matcher (distinct matchers):
    whether each grammar is complete (nothing may follow), or the ValueError of one that rejected
    its token (that request is aborted). With `executor` (an LLExecutor) and at least PAR_MIN_ROWS
    pairs, the matchers take their tokens on its threads."""
    # An errored matcher (a rejected token, a parser limit hit) stays errored and may still
    # "accept" the eos its empty mask lets through: check the state, not only the return value.
    if executor is None or len(pairs) < PAR_MIN_ROWS:
        oks = [m.consume_token(t) for m, t in pairs]
    else:
        oks = executor.consume_token_par(pairs)
    return [m.is_stopped() if ok and not m.is_error() else
            ValueError(f"the grammar rejected token {t}: {m.get_error()}") for ok, (m, t) in zip(oks, pairs)]


def fill_bitmask(rows: list[tuple[Any, int]], batch_size: int, vocab_size: int, pin: bool,
                 executor: Any = None) -> torch.Tensor:
    """(batch_size, ceil(V/32)) int32 allowed-token bits on the CPU: row i of each (matcher, i)
    pair from its grammar (distinct rows), every other row all ones (unconstrained).

    With `executor` (an LLExecutor) and at least PAR_MIN_ROWS rows, the masks are computed on its
    threads (the GIL released); else one matcher after the other. (An earlier measurement of the
    pool ~10x slower than the loop, 2.2 vs 0.2 ms for 64 JSON rows, was its default thread count
    on a 2-core machine whose cores the CPU forward's threads were also using; alone it is ~1.4x
    faster there with 2 threads, see PAR_MIN_ROWS.)"""
    words = (vocab_size + 31) // 32
    # llguidance writes every byte of a row it fills: only the other rows are set (all allowed).
    mask = torch.empty((batch_size, words), dtype=torch.int32, pin_memory=pin)
    if len(rows) < batch_size:
        filled = {i for _, i in rows}
        mask[[i for i in range(batch_size) if i not in filled]] = -1
    base, row_bytes = mask.data_ptr(), words * 4
    if executor is not None and len(rows) >= PAR_MIN_ROWS:
        executor.unsafe_compute_mask_ptr(rows, base, row_bytes, batch_size)
    else:
        for matcher, i in rows:
            matcher.unsafe_compute_mask_ptr(base + i * row_bytes, row_bytes)
    return mask


_BITS: dict[str, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool on the bitmask's device: bit j of word w allows token 32 * w + j (two kernels:
    an AND with the 32 single-bit words, a compare)."""
    key = str(bitmask.device)
    if key not in _BITS:  # 1 << j as int32 (bit 31: the negative word -2**31)
        _BITS[key] = torch.tensor([1 << j if j < 31 else -(1 << 31) for j in range(32)], dtype=torch.int32,
                                  device=bitmask.device)
    bits = (bitmask[:, :, None] & _BITS[key]) != 0
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size]
