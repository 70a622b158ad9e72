"""generate(): the transformers-style decoding loop over an LFM2 model and its `Lfm2Cache`.

Batching uses **left padding** with the hybrid's exact padding rules (spec §4.3):

* Every row's last prompt token sits in the same column, so one (B, 1) forward per step
  decodes all rows and the cache stays a plain rectangle (`Lfm2Cache`).
* Attention layers mask pad keys; positions restart at 0 on each row's first real token.
* Conv layers are not attention: a pad token inside their 3-tap window would leak into
  the next real tokens. The model zeroes the conv input at pad positions (in_proj has no
  bias, so the gated conv input v is 0 there), and a run of zeros is exactly the zero
  initial state the causal conv assumes for an unpadded row. So left padding is exact,
  not approximate: padded rows give the same logits as one-at-a-time runs.

Packing (several sequences back to back in one row, no padding) is what the engine does
instead: it wastes no compute on pads and lets requests join and leave between steps, but
needs per-sequence KV pages and conv-state slots. For one call over a fixed set of prompts
the padding waste is bounded by the spread of prompt lengths, and left padding keeps the
ordinary forward and cache, so this simple API uses it.

Finished rows stop producing (they are fed the pad token); once a quarter of the batch is
done they are dropped with `Lfm2Cache.reorder`, so long tails do not pay for short rows.

Text: stop strings are matched on the detokenized text, across token boundaries; the text
ends right before the first occurrence, and streamed text never shows a stop string or a
prefix of one that may still complete (the longest such suffix is held back).
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from .sampling import SamplingParams, SamplingTensors, sample

__all__ = [
    "generate", "GenerationMixin", "GenerationResult", "GenerationOutput", "StopStringTracker",
    "TextStreamer", "TextIteratorStreamer", "resolve_params",
]

# HF-style keyword names accepted by generate() besides SamplingParams' own field names.
_HF_ALIASES = {"eos_token_id": "stop_token_ids", "stop": "stop_strings", "max_tokens": "max_new_tokens"}
# transformers keywords that change nothing here (we always cache, pad with the model's pad id
# and return a GenerationOutput).
_HF_NO_OPS = {"use_cache", "return_dict_in_generate", "pad_token_id", "bos_token_id"}
# transformers keywords for features generate() does not have: refused rather than ignored.
_HF_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "output_scores": False, "output_logits": False}


@dataclass
class GenerationResult:
    """One generated sequence: new tokens only.

    `token_ids` include the token that ended generation (eos, or the one completing a stop
    string); `text` excludes the eos and everything from the stop string on.
    finish_reason: "eos", "stop" (a stop string) or "length".
    """

    text: str | None
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None

    @property
    def prompt_token_count(self) -> int:
        return self.num_prompt_tokens


@dataclass
class GenerationOutput:
    """What generate() returns: one result per input row, in input order."""

    results: list[GenerationResult]

    @property
    def token_ids(self) -> list[list[int]]:
        return [r.token_ids for r in self.results]

    @property
    def text(self) -> list[str | None]:
        return [r.text for r in self.results]

    @property
    def finish_reason(self) -> list[str]:
        return [r.finish_reason for r in self.results]

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> GenerationResult:
        return self.results[i]

    def sequences(self, pad_token_id: int = 0) -> torch.Tensor:
        """New tokens as a (B, longest) tensor, right-padded (HF pads finished rows too)."""
        width = max((len(t) for t in self.token_ids), default=0)
        return torch.tensor([t + [pad_token_id] * (width - len(t)) for t in self.token_ids], dtype=torch.long)


# ----------------------------------------------------------------------------- stop strings
class StopStringTracker:
    """The text of one generated sequence, built token by token and cut at the first stop
    string. `add` returns only text that no stop string can remove any more."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = (), skip_special_tokens: bool = True):
        from .tokenizer import IncrementalDetokenizer

        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stop_strings = [s for s in stop_strings if s]
        self.stopped = False
        self._held = ""
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """Text released so far (the final text once `stopped` or after `finish`)."""
        return "".join(self._parts)

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._release(self._held + self.detokenizer.add(token_id), final=False)

    def finish(self) -> str:
        """End of generation: release what was held back (no stop string completed it)."""
        if self.stopped:
            return ""
        return self._release(self._held + self.detokenizer.flush(), final=True)

    def _release(self, pending: str, final: bool) -> str:
        # Any stop string occurrence starts inside `pending`: released text never ends in a
        # prefix of a stop string, so none can straddle the release point.
        cut = min((i for i in (pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = pending[:cut], ""
        elif final:
            out, self._held = pending, ""
        else:
            keep = self._longest_partial_match(pending)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if out:
            self._parts.append(out)
        return out

    def _longest_partial_match(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


# ----------------------------------------------------------------------------- streamers
class TextStreamer:
    """Prints text to stdout as it is generated (transformers' TextStreamer pattern).

    Works with generate(streamer=...) for a single row. `skip_prompt` hides the prompt;
    `skip_special_tokens` applies to the generated text.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, skip_special_tokens: bool = True,
                 file: TextIO | None = None):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.file = file

    def _write(self, text: str) -> None:
        out = self.file or sys.stdout
        out.write(text)
        out.flush()

    def on_prompt(self, token_ids: list[int]) -> None:
        if not self.skip_prompt:
            self._write(self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens))

    def on_text(self, text: str) -> None:
        if text:
            self._write(text)

    def on_end(self) -> None:
        self._write("\n")


class TextIteratorStreamer(TextStreamer):
    """Text deltas as an iterator, for running generate() in another thread:

        streamer = TextIteratorStreamer(tok)
        Thread(target=model.generate, kwargs=dict(input_ids=ids, streamer=streamer)).start()
        for delta in streamer: ...

    An exception in the generating thread is re-raised in the consumer.
    """

    _END = object()

    def __init__(self, tokenizer: Any = None, skip_prompt: bool = True, skip_special_tokens: bool = True,
                 timeout: float | None = None):
        super().__init__(tokenizer, skip_prompt, skip_special_tokens)
        self.timeout = timeout
        self._queue: queue.Queue = queue.Queue()

    def on_prompt(self, token_ids: list[int]) -> None:
        if not self.skip_prompt:
            self._queue.put(self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens))

    def on_text(self, text: str) -> None:
        if text:
            self._queue.put(text)

    def on_end(self) -> None:
        self._queue.put(self._END)

    def on_error(self, error: BaseException) -> None:
        self._queue.put(error)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


# ----------------------------------------------------------------------------- parameters
def resolve_params(
    params: SamplingParams | Sequence[SamplingParams] | None,
    defaults: dict[str, Any] | None,
    batch_size: int,
    vocab_size: int | None = None,
    **kwargs: Any,
) -> list[SamplingParams]:
    """One validated SamplingParams per row from `params` and HF-style keyword overrides.

    `defaults` is a generation_config.json dict; a `generation_config=` keyword (a dict or a
    transformers GenerationConfig) replaces it.
    """
    for k in _HF_NO_OPS & set(kwargs):
        kwargs.pop(k)
    for k, neutral in _HF_UNSUPPORTED.items():
        if k in kwargs and kwargs.pop(k) not in (None, neutral):
            raise ValueError(f"{k} is not supported by fastlfm's generate() (only {k}={neutral!r})")
    if "generation_config" in kwargs:
        gc = kwargs.pop("generation_config")
        defaults = gc.to_dict() if hasattr(gc, "to_dict") else dict(gc or {})
    overrides = {_HF_ALIASES.get(k, k): v for k, v in kwargs.items()}
    for key in ("stop_strings", "stop_token_ids"):
        if key in overrides:
            v = overrides[key]
            overrides[key] = [] if v is None else [v] if isinstance(v, (int, str)) else list(v)
    if params is None:
        rows = [SamplingParams.from_generation_config(defaults, **overrides)] * batch_size
    else:
        rows = [params] * batch_size if isinstance(params, SamplingParams) else list(params)
        if len(rows) != batch_size:
            raise ValueError(f"got {len(rows)} SamplingParams for a batch of {batch_size} prompts")
        if overrides:
            known = set(SamplingParams.__dataclass_fields__)
            bad = sorted(set(overrides) - known)
            if bad:
                raise ValueError(f"unknown sampling parameter(s): {', '.join(bad)}")
            rows = [p.merged(**overrides) for p in rows]
    for p in rows:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(p).__name__}")
        p.validate(vocab_size)
    return rows


def _as_batch(input_ids: Any, attention_mask: Any, pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor | None, list[list[int]]]:
    """Left-padded (B, T) ids, a mask or None when nothing is padded, and each row's real ids."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.to(device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (batch, length>0), got {tuple(input_ids.shape)}")
        rows_host = ids.tolist()
        if attention_mask is None:
            return ids, None, rows_host
        mask = torch.as_tensor(attention_mask, device=device).reshape(ids.shape).long()
        m = mask.tolist()
        real = []
        for i, row in enumerate(m):
            n = sum(row)
            if n == 0 or row != [0] * (len(row) - n) + [1] * n:
                raise ValueError(f"attention_mask row {i} is not left padding (zeros, then ones, at least one "
                                 f"one); pad on the left (tokenizer padding_side='left')")
            real.append(rows_host[i][len(row) - n:])
        return ids, (mask if not bool(mask.all()) else None), real
    rows = [input_ids] if input_ids and isinstance(input_ids[0], int) else [list(r) for r in input_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("input_ids must hold at least one token per prompt")
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    if all(len(r) == width for r in rows):
        return ids, None, rows
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask, rows


def _find_tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return tok
    if "_fastlfm_tokenizer" in getattr(model, "__dict__", {}):
        return model.__dict__["_fastlfm_tokenizer"]
    tok = None
    name = getattr(model, "name_or_path", None)
    if name is not None:
        try:
            from .loading import resolve_model_dir
            from .tokenizer import Tokenizer

            tok = Tokenizer.from_pretrained(resolve_model_dir(name, local_files_only=True))
        except Exception:  # no tokenizer files next to the weights: text is simply not available
            tok = None
    model.__dict__["_fastlfm_tokenizer"] = tok
    return tok


# ----------------------------------------------------------------------------- CPU weight layout
def match_cpu_weight_layout(model: Any, batch_size: int) -> None:
    """Store fp32 Linear weights on CPU in the layout MKL multiplies fastest for this batch.

    Decoding one sequence is a matrix-vector product per Linear. MKL streams a weight kept
    input-major ((in, out) contiguous: y = sum_k x_k W[:, k] as contiguous AXPYs) about
    1.2x faster than the (out, in) layout nn.Linear uses, but for several rows (small GEMMs)
    the standard layout is ~10% faster (bench/cpu.py; BENCHMARKS.md). So a batch of one
    switches the storage to input-major and a larger batch switches it back.

    Only the storage changes: every `.weight` keeps its (out, in) shape, values, name and
    Parameter object (tied weights stay tied), `state_dict()`/saving are unaffected, and
    F.linear on the transposed view computes the same product. A switch copies the weights
    once; repeated calls with the same kind of batch cost nothing.
    """
    if model.device.type != "cpu":
        return
    target = "input-major" if batch_size == 1 else "standard"
    if model.__dict__.get("_fastlfm_cpu_layout", "standard") == target:
        return
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
                w = module.weight
                if target == "input-major" and w.is_contiguous():
                    w.data = w.data.t().contiguous().t()
                elif target == "standard" and not w.is_contiguous():
                    w.data = w.data.contiguous()
    model.__dict__["_fastlfm_cpu_layout"] = target


# ----------------------------------------------------------------------------- the loop
class _Run:
    """One generate() call as an iterator over steps; each step yields (row, text delta)
    pairs for the streamed rows. `results` is filled when the iterator is exhausted."""

    def __init__(self, model, input_ids, attention_mask, params, overrides: dict[str, Any], tokenizer,
                 stream_rows: set[int], skip_special_tokens: bool = True, past_key_values=None,
                 history_ids: list[list[int]] | None = None, stream_skip_special: bool | None = None,
                 model_inputs: dict[str, Any] | None = None):
        self.model = model
        # Extra prefill inputs (LFM2-VL image tensors); decode steps need none.
        self.model_inputs = {k: v.to(model.device) if torch.is_tensor(v) else v
                             for k, v in (model_inputs or {}).items() if v is not None}
        cfg = model.config
        self.device = model.device
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.pad_id = pad_id
        self.ids, self.mask, self.prompts = _as_batch(input_ids, attention_mask, pad_id, self.device)
        B = self.ids.shape[0]
        self.params = resolve_params(params, getattr(model, "generation_config", None), B, cfg.vocab_size,
                                     **overrides)
        self.cache = past_key_values
        if self.cache is not None and self.cache.seq_len > 0 and self.mask is not None:
            raise ValueError("continuing from past_key_values needs unpadded rows of equal length")
        self.history = history_ids
        self.tokenizer = tokenizer
        need_text = any(p.stop_strings for p in self.params) or stream_rows
        if need_text and tokenizer is None:
            raise ValueError("stop strings and streaming need a tokenizer: pass tokenizer=..., or load the "
                             "model from a folder that holds tokenizer.json")
        self.trackers: dict[int, StopStringTracker] = {}
        for i, p in enumerate(self.params):
            if p.stop_strings or i in stream_rows:
                skip = stream_skip_special if (i in stream_rows and stream_skip_special is not None) \
                    else skip_special_tokens
                self.trackers[i] = StopStringTracker(tokenizer, p.stop_strings, skip)
        self.stream_rows = stream_rows
        self.on_token = None  # optional callback(token_id) for row 0 (transformers-style streamers)
        self.skip_special_tokens = skip_special_tokens
        self.results: list[GenerationResult] | None = None

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        model, device, params = self.model, self.device, self.params
        B = self.ids.shape[0]
        V = model.config.vocab_size
        max_new = max(p.max_new_tokens for p in params)
        match_cpu_weight_layout(model, B)
        cache = self.cache if self.cache is not None else model.make_cache()
        past = cache.seq_len
        history = self.history or [[] for _ in range(B)]
        tensors = SamplingTensors.from_requests(
            params, [h + p for h, p in zip(history, self.prompts)], None, V, device)
        # Plain greedy (the common case) needs no sampler state at all.
        plain_greedy = tensors.all_greedy and tensors.logit_bias is None and not tensors.any_repetition \
            and not tensors.any_presence_frequency and tensors.num_logprobs is None
        eos_ids = [frozenset() if p.ignore_eos else frozenset(p.stop_token_ids) for p in params]

        # Left padding: the mask grows by a column of ones per step; positions continue per row.
        T = self.ids.shape[1]
        mask = self.mask
        next_pos = None
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, max_new)], dim=1)
            next_pos = mask[:, :T].sum(-1, keepdim=True) - 1
        logits = model(self.ids, attention_mask=None if mask is None else mask[:, :T], past_key_values=cache,
                       use_cache=True, logits_to_keep=1, **self.model_inputs).logits[:, -1]
        seq_len = past + T

        out_ids: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[Any]] = [[] for _ in range(B)]  # per row: (logprob, top values, top ids) per step
        reasons: list[str | None] = [None] * B
        rows = list(range(B))  # original row index of each batch row
        lingering = 0  # finished rows still in the batch (fed pads until dropped)
        for step in range(max_new):
            if plain_greedy:
                tok, out = logits.argmax(-1), None
            else:
                out = sample(logits, tensors)
                tok = out.token_ids
            if lingering:
                done_mask = torch.tensor([reasons[r] is not None for r in rows], device=device)
                tok = tok.masked_fill(done_mask, self.pad_id)
            host = tok.tolist()  # the one host sync per step
            if out is not None and out.logprobs is not None:
                self._record_logprobs(out, rows, reasons, logprobs)
            deltas: list[tuple[int, str]] = []
            for b, r in enumerate(rows):
                if reasons[r] is not None:
                    continue
                t = host[b]
                out_ids[r].append(t)
                if r == 0 and self.on_token is not None:
                    self.on_token(t)
                if t in eos_ids[r]:
                    reasons[r] = "eos"
                elif r in self.trackers:
                    tr = self.trackers[r]
                    delta = tr.add(t)
                    if tr.stopped:
                        reasons[r] = "stop"
                    if delta and r in self.stream_rows:
                        deltas.append((r, delta))
                if reasons[r] is None and len(out_ids[r]) >= params[r].max_new_tokens:
                    reasons[r] = "length"
                if reasons[r] is not None:
                    lingering += 1
            if deltas:
                yield deltas
            if not plain_greedy:
                active = None if not lingering else torch.tensor([reasons[r] is None for r in rows], device=device)
                tensors.advance(tok, active)
            if lingering == len(rows):
                break
            if 4 * lingering >= len(rows):  # drop finished rows from the batch
                keep = [b for b, r in enumerate(rows) if reasons[r] is None]
                keep_dev = torch.tensor(keep, device=device)
                cache.reorder(keep_dev)
                tensors = tensors.select(keep_dev)
                tok = tok[keep_dev]
                rows = [rows[b] for b in keep]
                lingering = 0
                if mask is not None:
                    mask, next_pos = mask[keep_dev], next_pos[keep_dev]
                    if bool(mask[:, :seq_len].all()):
                        mask = None
            seq_len += 1
            if mask is None:
                logits = model(tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            else:
                next_pos = next_pos + 1
                logits = model(tok[:, None], attention_mask=mask[:, :seq_len], position_ids=next_pos,
                               past_key_values=cache, use_cache=True).logits[:, -1]

        # Release held-back text of rows that did not stop on a stop string.
        final: list[tuple[int, str]] = []
        for r, tr in self.trackers.items():
            tail = tr.finish()
            if tail and r in self.stream_rows:
                final.append((r, tail))
        if final:
            yield final
        self._collect(out_ids, reasons, logprobs)

    @staticmethod
    def _record_logprobs(out, rows, reasons, logprobs) -> None:
        chosen = out.logprobs.tolist()
        top_v = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        top_i = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        for b, r in enumerate(rows):
            if reasons[r] is None:
                logprobs[r].append((chosen[b], top_v[b] if top_v else [], top_i[b] if top_i else []))

    def _collect(self, out_ids, reasons, logprobs) -> None:
        results = []
        for r, p in enumerate(self.params):
            ids = out_ids[r]
            reason = reasons[r] or "length"
            if r in self.trackers:
                text = self.trackers[r].text
            elif self.tokenizer is not None:
                text_ids = ids[:-1] if reason == "eos" else ids
                text = self.tokenizer.decode(text_ids, skip_special_tokens=self.skip_special_tokens)
            else:
                text = None
            res = GenerationResult(text, ids, reason, len(self.prompts[r]))
            if p.logprobs is not None:
                res.logprobs = [lp for lp, _, _ in logprobs[r]]
                if p.logprobs > 0:
                    res.top_logprobs = [dict(zip(i[: p.logprobs], v[: p.logprobs])) for _, v, i in logprobs[r]]
            results.append(res)
        self.results = results


IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def _pop_image_inputs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """LFM2-VL processor outputs among generate()'s keywords (fed to the prefill only)."""
    return {k: kwargs.pop(k) for k in IMAGE_INPUTS if k in kwargs}


def generate(
    model: Any,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    streamer: Any = None,
    *,
    tokenizer: Any = None,
    skip_special_tokens: bool = True,
    past_key_values: Any = None,
    history_ids: list[list[int]] | None = None,
    **kwargs: Any,
) -> GenerationOutput:
    """Generate new tokens for a batch of prompts.

    input_ids: a (B, T) tensor (left-padded when `attention_mask` marks pads), one list of
    ids, or a list of id lists of any lengths (padded here). `params` is one SamplingParams
    for all rows or one per row; without it, defaults come from the model's
    generation_config.json (greedy unless it says otherwise). HF-style keywords override:
    max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
    presence_penalty, frequency_penalty, stop_strings, eos_token_id, seed, ignore_eos,
    logprobs, logit_bias.

    LFM2-VL: pass the processor's `pixel_values`, `pixel_attention_mask` and `spatial_shapes`
    with prompts whose `<image>` tokens they fill.

    `streamer` (single row): an object with on_prompt/on_text/on_end (TextStreamer,
    TextIteratorStreamer) receives stop-string-safe text deltas; an HF-style object with
    put/end receives token id tensors instead. `past_key_values`: an `Lfm2Cache` to
    continue from (the ids are then the new tokens only; `history_ids` lists the tokens
    already in it, for the repetition penalty).
    """
    tokenizer = tokenizer if tokenizer is not None else _find_tokenizer(model)
    text_streamer = streamer is not None and hasattr(streamer, "on_text")
    run = _Run(model, input_ids, attention_mask, params, kwargs, tokenizer, {0} if text_streamer else set(),
               skip_special_tokens, past_key_values, history_ids,
               getattr(streamer, "skip_special_tokens", None) if text_streamer else None,
               _pop_image_inputs(kwargs))
    if streamer is not None and len(run.prompts) != 1:
        raise ValueError(f"streaming needs a single prompt, got a batch of {len(run.prompts)}")
    try:
        if text_streamer:
            streamer.on_prompt(run.prompts[0])
            for deltas in run:
                for _, delta in deltas:
                    streamer.on_text(delta)
            streamer.on_end()
        elif streamer is not None:  # transformers-style streamer: token ids, one step at a time
            streamer.put(torch.tensor(run.prompts[0])[None])
            run.on_token = lambda t: streamer.put(torch.tensor([t]))
            for _ in run:
                pass
            streamer.end()
        else:
            for _ in run:
                pass
    except BaseException as e:
        if streamer is not None and hasattr(streamer, "on_error"):
            streamer.on_error(e)
        raise
    return GenerationOutput(run.results)


class GenerationMixin:
    """Adds `model.generate(...)` (see `generate`) to a causal LM."""

    def generate(self, input_ids=None, attention_mask=None, params=None, streamer=None, **kwargs) -> GenerationOutput:
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        return generate(self, input_ids, attention_mask, params, streamer, **kwargs)
