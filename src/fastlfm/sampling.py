"""Sampling controls and the batched, on-device sampler shared by generate() and the engine.

`SamplingParams` is one request's settings. `SamplingTensors` turns the settings of a batch
of requests (each with its own params, token history and step) into per-row tensors, and
`sample(logits, tensors)` picks one token per row with no Python loop over rows and no host
sync.

Order of the logit transforms (the order of transformers' logits processors, then OpenAI's
penalties, which transformers does not have):

  1. logit_bias                  (added to the raw logits)
  2. repetition_penalty          (prompt + generated tokens: positive logits / p, negative * p)
  3. presence / frequency        (generated tokens only: - presence * [count > 0] - frequency * count)
     grammar mask                (structured output: tokens the row's grammar forbids -> -inf)
  -- greedy rows take the argmax here; sampling rows go on --
  4. temperature                 (logits / T)
  5. top_k                       (keep logits >= the k-th largest; ties at the k-th are kept)
  6. top_p                       (keep the smallest set of most likely tokens whose mass >= p)
  7. min_p                       (keep tokens with prob >= min_p * max prob)
  8. draw                        (Gumbel-max over what is left)

Steps 5-7 each see the output of the previous step, as transformers' warpers do.

Randomness is counter-based: the uniform for (row, vocab index) is a hash of
(seed, step, index). A request with a fixed seed therefore draws the same tokens whether it
runs alone or shares a batch with others, on any batch position, with no torch.Generator
per row. Rows without a seed get one drawn from torch's global generator when the tensors
are built (so `torch.manual_seed` makes them reproducible too).

Log-probabilities, when asked for, are those of the raw model distribution
(log_softmax of the logits before any transform), as vLLM reports them by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from . import cpu_gemv
from .ops import host_to_device

__all__ = ["SamplingParams", "SamplingTensors", "SamplerOutput", "sample", "apply_penalties", "filter_logits",
           "resolve_params", "eos_token_ids", "GenerationConfig", "MIN_TEMPERATURE"]

#: Temperatures below this are greedy (argmax), whatever `do_sample` says. Below it a draw is the
#: argmax unless two logits are within ~1e-5 of each other, and dividing float32 logits by a smaller
#: temperature only gets closer to overflow: at 1e-38 they become inf and the draw is garbage.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens for one request (HF and OpenAI names).

    `do_sample=None` means: sample iff `temperature > 0` (temperature 0 is greedy). A temperature
    below `MIN_TEMPERATURE` (1e-5), 0 excepted, is also greedy: too small to divide by safely.
    `stop_token_ids` end generation like the model's eos ids (`eos_token_ids`), which the
    engine always adds; `ignore_eos` ignores both. `logprobs`: None = none; n >= 0 = the
    chosen token's logprob plus the top n. Text: `skip_special_tokens` leaves special tokens
    out of the text, except `keep_special_token_ids` (e.g. tool-call markers a server parses).
    Structured output (fastlfm.structured; one of): `json_schema` (a JSON schema, a dict or its JSON
    text; `{"type": "object"}` = any JSON object), `regex`, `choice` (the output is one of these
    strings). The request ends when the grammar is complete ("eos" if it ended on an eos token,
    else "stop"), `ignore_eos` notwithstanding.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    do_sample: bool | None = None
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    keep_special_token_ids: list[int] = field(default_factory=list)
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None

    @property
    def sampling(self) -> bool:
        """True when tokens are drawn at random, False for greedy (argmax): temperatures below
        MIN_TEMPERATURE are greedy."""
        if self.do_sample is None:
            return self.temperature >= MIN_TEMPERATURE
        return bool(self.do_sample) and self.temperature >= MIN_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ValueError naming the first bad field and its value; return self."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0 (0 = greedy)")
        if self.do_sample is True and self.temperature == 0:
            raise bad("temperature", "must be > 0 when do_sample=True (use do_sample=False for greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise bad("do_sample", "must be True, False or None")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise bad("stop_strings", "must be a list of non-empty strings")
        if not all(is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size) for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"must be token ids in [0, {vocab_size or 'vocab_size'})")
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", "must be True or False")
        if not all(is_int(t) and t >= 0 for t in self.keep_special_token_ids):
            raise bad("keep_special_token_ids", "must be a list of token ids")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be None or an integer in [0, 20]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must be a dict {token_id: bias}")
            for tok, b in self.logit_bias.items():
                if not is_int(tok) or tok < 0 or (vocab_size is not None and tok >= vocab_size):
                    raise bad("logit_bias", f"token id {tok!r} is not in [0, {vocab_size or 'vocab_size'})")
                if not isinstance(b, (int, float)) or isinstance(b, bool) or math.isnan(b):
                    raise bad("logit_bias", f"bias for token {tok} must be a number, got {b!r}")
        constraints = [n for n in ("json_schema", "regex", "choice") if getattr(self, n) is not None]
        if len(constraints) > 1:
            raise bad(constraints[1], f"only one of json_schema, regex and choice may be set (got {constraints})")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str)):
            raise bad("json_schema", "must be a JSON schema: a dict or its JSON text")
        if self.regex is not None and not (isinstance(self.regex, str) and self.regex):
            raise bad("regex", "must be a non-empty string")
        if self.choice is not None and (isinstance(self.choice, str) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise bad("choice", "must be a non-empty list of non-empty strings")
        return self

    @property
    def constrained(self) -> bool:
        """Whether a grammar constrains the output (json_schema, regex or choice)."""
        return self.json_schema is not None or self.regex is not None or self.choice is not None

    # -- construction from HF-style settings -------------------------------------------
    _GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                               "do_sample", "max_new_tokens")
    _SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "min_p")

    @classmethod
    def from_generation_config(cls, config: dict[str, Any] | None, **overrides: Any) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json, then `overrides`.

        Follows transformers where it is explicit: a config without `do_sample` is greedy (its
        `eos_token_id` is the engine's business: `eos_token_ids`). One difference on purpose:
        if the caller passes a sampling knob (temperature/top_k/top_p/min_p) but no
        `do_sample`, we sample (iff temperature > 0) instead of silently ignoring the knob.
        Unknown override names raise ValueError. HF's implicit `top_k=50` is not applied.
        """
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        values: dict[str, Any] = {k: config[k] for k in cls._GENERATION_CONFIG_KEYS if config.get(k) is not None}
        if "do_sample" not in values:
            values["do_sample"] = False
        if "do_sample" not in overrides and any(k in overrides for k in cls._SAMPLING_KNOBS):
            values["do_sample"] = None
        values.update({k: v for k, v in overrides.items()})
        for list_field in ("stop_strings", "stop_token_ids", "keep_special_token_ids"):
            v = values.get(list_field)
            if v is None:
                values.pop(list_field, None)
            elif isinstance(v, (int, str)):
                values[list_field] = [v]
            else:
                values[list_field] = list(v)
        return cls(**values).validate()

    def merged(self, **overrides: Any) -> SamplingParams:
        """A copy with some fields replaced (validated)."""
        return replace(self, **overrides).validate()


# ----------------------------------------------------------------------------- resolving
def eos_token_ids(generation_config: dict[str, Any] | None, config_eos: int | list[int] | None = None,
                  tokenizer_eos: int | None = None) -> frozenset[int]:
    """The ids that end a generation: generation_config.json's `eos_token_id` (an int or a
    list), else the model config's, else the tokenizer's. The one place this is decided."""
    for ids in ((generation_config or {}).get("eos_token_id"), config_eos, tokenizer_eos):
        if ids is not None:
            return frozenset(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]) if i is not None)
    return frozenset()


# HF-style keyword names accepted besides SamplingParams' own field names.
_HF_ALIASES = {"eos_token_id": "stop_token_ids", "stop": "stop_strings", "max_tokens": "max_new_tokens"}
# transformers keywords that change nothing here (the cache is always used, finished rows are
# padded with the model's pad id).
_HF_NO_OPS = {"use_cache", "pad_token_id", "bos_token_id"}
# transformers keywords for features fastlfm does not have: refused unless they ask for nothing.
_HF_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "output_scores": False, "output_logits": False,
                   "num_beam_groups": 1, "min_new_tokens": 0, "min_length": 0, "no_repeat_ngram_size": 0,
                   "typical_p": 1.0, "penalty_alpha": None, "length_penalty": 1.0, "early_stopping": False,
                   "diversity_penalty": 0.0, "bad_words_ids": None, "suppress_tokens": None,
                   "begin_suppress_tokens": None, "sequence_bias": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                   "max_time": None, "assistant_model": None, "prompt_lookup_num_tokens": None,
                   "output_attentions": False, "output_hidden_states": False}
# generation_config.json bookkeeping that is not a setting.
_HF_META = {"transformers_version", "_from_model_config", "_commit_hash"}


def _refuse_unsupported(values: dict[str, Any], where: str = "") -> None:
    for k, neutral in _HF_UNSUPPORTED.items():
        if values.get(k) not in (None, neutral):
            raise ValueError(f"{where}{k} is not supported by fastlfm (only {k}={neutral!r}; got {values[k]!r})")


def set_generation_values(config: Any) -> dict[str, Any]:
    """What a generation config passed by a caller sets: a GenerationConfig (ours or transformers',
    whose `to_diff_dict` leaves out its defaults), an object with `to_dict()`, or a mapping."""
    if config is None:
        return {}
    for method in ("to_diff_dict", "to_dict"):
        if hasattr(config, method):
            return getattr(config, method)()
    return dict(config)


class GenerationConfig(dict):
    """transformers' `GenerationConfig`, for the settings fastlfm's generate() implements.

        GenerationConfig(do_sample=True, temperature=0.3, min_p=0.15, repetition_penalty=1.05, max_new_tokens=512)

    A dict of the values that were set, with attribute access (unset attributes read transformers'
    defaults). As `generate(generation_config=...)` its values replace the model's (what it leaves
    unset falls back to the model's generation_config.json, as in transformers) and keywords
    override both. Names fastlfm does not know, and features it does not implement (num_beams=4,
    ...), raise ValueError when set here; a checkpoint's file keeps unknown names unread.
    """

    # transformers' defaults, read for unset attributes.
    _DEFAULTS: dict[str, Any] = {"max_length": 20, "max_new_tokens": None, "do_sample": False, "temperature": 1.0,
                                 "top_k": 50, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0,
                                 "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
                                 "stop_strings": None, "use_cache": True, "return_dict_in_generate": False,
                                 **_HF_UNSUPPORTED}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.update(kwargs)

    @classmethod
    def known_names(cls) -> set[str]:
        return ({f.name for f in fields(SamplingParams)} | set(_HF_ALIASES) | _HF_NO_OPS | set(cls._DEFAULTS)
                | _HF_META)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        values = dict(*args, **kwargs)
        unknown = sorted(set(values) - self.known_names())
        if unknown:
            raise ValueError(f"GenerationConfig: unknown or unsupported parameter(s) {', '.join(unknown)}")
        _refuse_unsupported(values, "GenerationConfig: ")
        super().update(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationConfig:
        """A checkpoint's generation_config.json: names fastlfm does not know are kept but not read
        (loading a checkpoint does not fail on them); unsupported features are refused by generate()."""
        config = cls()
        dict.update(config, {k: v for k, v in values.items() if k not in _HF_META})
        return config

    @classmethod
    def from_pretrained(cls, name_or_path: Any, config_file_name: str = "generation_config.json") -> GenerationConfig:
        import json

        from .loading import resolve_model_dir

        path = resolve_model_dir(name_or_path) / config_file_name
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        return dict(self)

    to_diff_dict = to_dict  # the values that were set (transformers: those that differ from the defaults)

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        if name in self._DEFAULTS:
            return self._DEFAULTS[name]
        raise AttributeError(f"GenerationConfig has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self.update({name: value})

    def __repr__(self) -> str:
        return f"GenerationConfig({', '.join(f'{k}={v!r}' for k, v in self.items())})"


def resolve_params(
    params: SamplingParams | Sequence[SamplingParams] | None,
    defaults: dict[str, Any] | None,
    batch_size: int,
    vocab_size: int | None = None,
    **kwargs: Any,
) -> list[SamplingParams]:
    """One validated SamplingParams per prompt from `params` and HF-style keyword overrides;
    every generation API resolves its arguments here, once.

    `defaults` is the checkpoint's generation_config.json dict; a `generation_config=` keyword (a
    dict, or a GenerationConfig of ours or transformers') overrides what it sets and leaves the
    rest to `defaults`, as in transformers; its `eos_token_id`, if any, ends generation like the
    model's eos ids do. Keywords override both.
    """
    for k in _HF_NO_OPS & set(kwargs):
        kwargs.pop(k)
    _refuse_unsupported(kwargs)
    for k in _HF_UNSUPPORTED.keys() & kwargs.keys():
        kwargs.pop(k)
    if "generation_config" in kwargs:
        given = set_generation_values(kwargs.pop("generation_config"))
        _refuse_unsupported(given, "generation_config: ")  # the caller's; the checkpoint's extras stay unread
        defaults = {**(defaults or {}), **given}
        if defaults.get("eos_token_id") is not None:
            kwargs.setdefault("eos_token_id", defaults["eos_token_id"])
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


# ----------------------------------------------------------------------------- random numbers
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), in int64 without overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (Wellons' "lowbias32"): full avalanche, cheap in torch ops."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_INDEX_HASH: dict[tuple[int, str], torch.Tensor] = {}


def _index_hash(vocab_size: int, device: torch.device) -> torch.Tensor:
    key = (vocab_size, str(device))
    if key not in _INDEX_HASH:
        _INDEX_HASH[key] = _mix32(torch.arange(vocab_size, device=device, dtype=torch.int64) + 0x9E3779B9)
    return _INDEX_HASH[key]


def row_keys(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from (seed, step)."""
    k = _mix32(seed_hi ^ 0x68E31DA4)
    k = _mix32(k ^ seed_lo)
    return _mix32(k ^ (step & _MASK32))


def uniforms(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) float32 uniforms in (0, 1), a pure function of (seed, step, vocab index)."""
    bits = _mix32(_index_hash(vocab_size, seed_lo.device)[None, :] ^ row_keys(seed_lo, seed_hi, step)[:, None])
    return unit_interval(bits)


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 tensor) -> float32 in the open interval (0, 1): the top 24 bits, centred.
    The top value (2**24 - 0.5) / 2**24 rounds to 1.0 in float32; it is pulled just below, or the
    Gumbel noise -log(-log(u)) would be +inf and turn a filtered-out (-inf) logit into NaN, which
    argmax picks: a token outside top_k / top_p or a grammar's mask, once in 2**24 draws."""
    return (((bits >> 8) & 0xFFFFFF).to(torch.float32) + 0.5).mul_(1.0 / (1 << 24)).clamp_(max=1.0 - 2.0 ** -24)


# ----------------------------------------------------------------------------- batch tensors
def _split_seed(seed: int) -> tuple[int, int]:
    s = seed % (1 << 64)
    return s & _MASK32, s >> 32


@dataclass
class SamplingTensors:
    """Per-row sampling settings of a batch, as device tensors.

    Build with `from_requests` (the engine, once per step) or once and then `advance`
    after each step (generate()). The boolean attributes are host-side facts about the
    whole batch, so `sample` skips unused transforms without reading device memory.
    """

    temperature: torch.Tensor  # (B,) float32; 1.0 on greedy rows
    top_k: torch.Tensor  # (B,) int64; vocab_size where off
    top_p: torch.Tensor  # (B,) float32
    min_p: torch.Tensor  # (B,) float32
    repetition_penalty: torch.Tensor  # (B,) float32
    presence_penalty: torch.Tensor  # (B,) float32
    frequency_penalty: torch.Tensor  # (B,) float32
    greedy: torch.Tensor  # (B,) bool
    seed_lo: torch.Tensor  # (B,) int64, low 32 bits of the seed
    seed_hi: torch.Tensor  # (B,) int64, high 32 bits
    step: torch.Tensor  # (B,) int64, tokens generated so far
    logit_bias: torch.Tensor | None  # (B, V) float32
    seen: torch.Tensor | None  # (B, V) bool: in prompt or output (repetition penalty)
    output_counts: torch.Tensor | None  # (B, V) float32: counts in the output (presence/frequency)
    all_greedy: bool
    any_top_k: bool
    max_top_k: int  # largest top_k among rows that use it (topk width; no device read)
    any_top_p: bool
    any_min_p: bool
    any_repetition: bool
    any_presence_frequency: bool
    num_logprobs: int | None  # max over rows of params.logprobs, None if no row asks
    allowed: torch.Tensor | None = None  # (B, V) bool: the tokens a grammar allows (structured output)

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_requests(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]] | None,
        output_ids: Sequence[Sequence[int]] | None,
        vocab_size: int,
        device: torch.device | str = "cpu",
        steps: Sequence[int] | None = None,
    ) -> SamplingTensors:
        """Tensors for a batch: row i has `params[i]`, its prompt and generated tokens so far
        (used only by the penalties), and its step (default: number of generated tokens)."""
        B = len(params)
        device = torch.device(device)
        outputs = output_ids if output_ids is not None else [()] * B
        prompts = prompt_ids if prompt_ids is not None else [()] * B
        if steps is None:
            steps = [len(o) for o in outputs]
        greedy = [not p.sampling for p in params]
        seeds = [p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item()) for p in params]
        lo_hi = [_split_seed(s) for s in seeds]

        def f32(vals):
            return host_to_device(vals, torch.float32, device)

        def i64(vals):
            return host_to_device(vals, torch.int64, device)

        any_repetition = any(p.repetition_penalty != 1.0 for p in params)
        any_pf = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params)
        seen = counts = bias = None
        if any_repetition:
            seen = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=device)
            hist = _pad_rows([list(a) + list(b) for a, b in zip(prompts, outputs)], vocab_size, device)
            seen.scatter_(1, hist, True)
            seen = seen[:, :vocab_size].contiguous()
        if any_pf:
            counts = torch.zeros(B, vocab_size + 1, dtype=torch.float32, device=device)
            hist = _pad_rows([list(o) for o in outputs], vocab_size, device)
            counts.scatter_add_(1, hist, torch.ones(hist.shape, dtype=torch.float32, device=device))
            counts = counts[:, :vocab_size].contiguous()
        if any(p.logit_bias for p in params):
            rows, cols, vals = [], [], []
            for i, p in enumerate(params):
                for tok, b in (p.logit_bias or {}).items():
                    rows.append(i), cols.append(tok), vals.append(float(b))
            bias = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)
            bias.index_put_((i64(rows), i64(cols)), f32(vals), accumulate=True)
        n_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        sampled = [p for p, g in zip(params, greedy) if not g]
        return cls(
            temperature=f32([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
            top_k=i64([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            repetition_penalty=f32([p.repetition_penalty for p in params]),
            presence_penalty=f32([p.presence_penalty for p in params]),
            frequency_penalty=f32([p.frequency_penalty for p in params]),
            greedy=host_to_device(greedy, torch.bool, device),
            seed_lo=i64([lo for lo, _ in lo_hi]),
            seed_hi=i64([hi for _, hi in lo_hi]),
            step=i64(list(steps)),
            logit_bias=bias,
            seen=seen,
            output_counts=counts,
            all_greedy=not sampled,
            any_top_k=any(0 < p.top_k < vocab_size for p in sampled),
            max_top_k=max([p.top_k for p in sampled if 0 < p.top_k < vocab_size], default=vocab_size),
            any_top_p=any(p.top_p < 1.0 for p in sampled),
            any_min_p=any(p.min_p > 0 for p in sampled),
            any_repetition=any_repetition,
            any_presence_frequency=any_pf,
            num_logprobs=max(n_logprobs) if n_logprobs else None,
        )

    def advance(self, token_ids: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Record one sampled token per row (in place, on device): step += 1, histories grow.
        Rows where `active` is False are left unchanged."""
        inc = torch.ones_like(self.step) if active is None else active.to(self.step.dtype)
        self.step += inc
        col = token_ids.view(-1, 1).to(torch.int64)
        if self.seen is not None:
            mark = torch.ones_like(col, dtype=torch.bool) if active is None else active.view(-1, 1)
            self.seen.scatter_(1, col, self.seen.gather(1, col) | mark)
        if self.output_counts is not None:
            self.output_counts.scatter_add_(1, col, inc.view(-1, 1).to(torch.float32))

    def select(self, rows: torch.Tensor) -> SamplingTensors:
        """The tensors of a subset of rows (dropping finished requests)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.index_select(0, rows.to(v.device)) if isinstance(v, torch.Tensor) else v
        return SamplingTensors(**out)


def _pad_rows(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(1, max((len(r) for r in rows), default=1))
    return host_to_device([r + [pad] * (width - len(r)) for r in rows], torch.int64, torch.device(device))


# ----------------------------------------------------------------------------- the sampler
@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None = None  # (B,) float32: the chosen tokens' logprobs
    top_logprobs: torch.Tensor | None = None  # (B, n) float32, most likely first
    top_token_ids: torch.Tensor | None = None  # (B, n) int64


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Steps 1-3: logit_bias, repetition penalty, presence/frequency penalties (float32), then the
    grammar's token mask (structured output: disallowed tokens -> -inf)."""
    if t.logit_bias is not None:
        logits = logits + t.logit_bias
    if t.any_repetition:
        p = t.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(t.seen, penalised, logits)
    if t.any_presence_frequency:
        c = t.output_counts
        logits = logits - c * t.frequency_penalty[:, None] - (c > 0).to(logits.dtype) * t.presence_penalty[:, None]
    if t.allowed is not None:
        logits = logits.masked_fill(~t.allowed, float("-inf"))
    return logits


def filter_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Steps 4-7 on penalised logits: temperature, top_k, top_p, min_p (removed -> -inf)."""
    V = logits.shape[-1]
    logits = logits / t.temperature[:, None]
    neg_inf = logits.new_full((), float("-inf"))  # a fill, not a (syncing) host copy
    if t.any_top_k:
        kmax = min(V, t.max_top_k)
        top = torch.topk(logits, kmax, dim=-1).values
        kth = top.gather(1, (t.top_k.clamp(max=kmax) - 1)[:, None])
        kth = torch.where((t.top_k < V)[:, None], kth, neg_inf)  # rows with top_k off keep all
        logits = torch.where(logits < kth, neg_inf, logits)
    if t.any_top_p:
        ascending, order = torch.sort(logits, dim=-1)
        cum = ascending.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - t.top_p)[:, None]
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = torch.empty_like(remove_sorted).scatter_(1, order, remove_sorted)
        logits = torch.where(remove & (t.top_p < 1)[:, None], neg_inf, logits)
    if t.any_min_p:
        probs = logits.softmax(-1)
        remove = probs < t.min_p[:, None] * probs.amax(-1, keepdim=True)
        logits = torch.where(remove, neg_inf, logits)
    return logits


#: On the CPU, a draw hashes only the tokens the filters kept when they are at most this share of the
#: row: the same token as hashing all (the uniforms are a function of the token's index), without
#: ~15 int64 passes over the whole vocabulary (B=8, 65,536 ids: 14 of 19 ms a step). On the GPU the
#: full pass is cheaper than finding the kept ids (a host sync).
SPARSE_DRAW_SHARE = 0.25


def _draw_among_kept(filtered: torch.Tensor, t: SamplingTensors) -> torch.Tensor | None:
    """The Gumbel-max draw of each row over its finite logits only; None when the rows keep too
    many tokens to gain (or one keeps none: the full pass's argmax is then the answer)."""
    B, V = filtered.shape
    kept = filtered > float("-inf")
    counts = kept.sum(-1)
    if int(counts.sum()) > SPARSE_DRAW_SHARE * B * V or bool((counts == 0).any()):
        return None
    rows, cols = kept.nonzero(as_tuple=True)  # row-major: within a row, ascending ids
    keys = row_keys(t.seed_lo, t.seed_hi, t.step)
    u = unit_interval(_mix32(_index_hash(V, filtered.device)[cols] ^ keys[rows]))
    scores = filtered[rows, cols] - torch.log(-torch.log(u))
    best = torch.full((B,), float("-inf"), dtype=scores.dtype).scatter_reduce_(0, rows, scores, "amax")
    at_best = scores == best[rows]  # the first such id, as argmax over the whole row picks
    return torch.full((B,), V, dtype=torch.long).scatter_reduce_(0, rows[at_best], cols[at_best], "amin")


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(-1) of (rows, vocab) scores; on the CPU through fastlfm's kernel where it runs
    (torch's CPU argmax is a scalar loop: 0.2-0.4 ms for a row of LFM2's 65,536 logits, 1-2% of a
    350M decode step)."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.bfloat16) and scores.dim() == 2 \
            and cpu_gemv.available():
        return cpu_gemv.argmax_rows(scores)
    return scores.argmax(-1)


def sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """One token per row of `logits` (B, V): argmax for greedy rows, a draw otherwise."""
    raw = logits.float()
    penalised = apply_penalties(raw, t)
    if t.all_greedy:
        token_ids = argmax_rows(penalised)
    else:
        filtered = filter_logits(penalised, t)
        drawn = _draw_among_kept(filtered, t) if filtered.device.type == "cpu" else None
        if drawn is None:
            u = uniforms(t.seed_lo, t.seed_hi, t.step, logits.shape[-1])
            gumbel = -torch.log(-torch.log(u))
            drawn = (filtered + gumbel).argmax(-1)
        token_ids = torch.where(t.greedy, argmax_rows(penalised), drawn)
    out = SamplerOutput(token_ids)
    if t.num_logprobs is not None:
        logp = torch.log_softmax(raw, dim=-1)
        out.logprobs = logp.gather(1, token_ids[:, None])[:, 0]
        if t.num_logprobs > 0:
            out.top_logprobs, out.top_token_ids = torch.topk(logp, t.num_logprobs, dim=-1)
    return out
