"""The high-level API: `LLM(model).generate(prompts)`, `.chat(messages)`, `.stream(...)`, and
`Conversation`, a multi-turn chat that keeps the model's cache between turns.

Everything here runs on one model through `fastlfm.generation`; `LLM.backend` names the
path ("model"), so a batched engine can take over `generate` for lists of prompts without
changing callers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .generation import IMAGE_INPUTS, GenerationResult, _Run, generate, resolve_params
from .sampling import SamplingParams

__all__ = ["LLM", "Conversation", "GenerationResult"]

Messages = Sequence[Mapping[str, Any]]


def _checked_engine_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` if LLMEngine takes every key (checked now: the engine is built on first use)."""
    import inspect

    from .engine import LLMEngine

    allowed = set(inspect.signature(LLMEngine.__init__).parameters) - {"self", "model", "tokenizer", "processor"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"engine_options: unknown option(s) {unknown}; LLMEngine takes {sorted(allowed)}")
    return dict(options)


class LLM:
    """A model and its tokenizer, ready to generate.

    `model`: a hub id, a checkpoint folder, "demo", or a loaded `Lfm2ForCausalLM`.
    `tokenizer`: a `fastlfm.tokenizer.Tokenizer`, a folder, or None for the model's folder.
    Sampling defaults come from the checkpoint's generation_config.json (greedy unless it
    says otherwise); any call may pass a SamplingParams and/or HF-style keywords.
    `quantization`: "int8" (per channel) or "int4" (groups of 32) weight-only quantization at load
    time, for the CPU kernels (fastlfm.cpu_linear); `model` may also be an LFM2 GGUF file.
    `engine_options`: keywords of the `fastlfm.engine.LLMEngine` that batches run on, e.g.
    {"compile": True} (CUDA: torch.compile of the decode step, as BENCHMARKS.md measures it)
    or {"max_num_seqs": 128}.
    """

    backend = "model"

    def __init__(self, model: str | os.PathLike | torch.nn.Module, tokenizer: Any = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto",
                 engine_options: dict[str, Any] | None = None, quantization: str | None = None):
        self.engine_options = {"max_num_seqs": 64, **_checked_engine_options(engine_options or {})}
        from .loading import resolve_dtype, resolve_model_dir
        from .models import load_model
        from .tokenizer import Tokenizer

        folder = None
        if isinstance(model, torch.nn.Module):
            if dtype not in (None, "auto"):
                model = model.to(dtype=resolve_dtype(dtype, None))
            if device is not None:
                model = model.to(device=device)
            if quantization is not None:
                from .cpu_linear import prepare_for_cpu

                prepare_for_cpu(model, quantization)
            self.model = model
            name = getattr(model, "name_or_path", None)
            if tokenizer is None and name is not None and "_fastlfm_tokenizer" not in model.__dict__:
                folder = resolve_model_dir(name, local_files_only=True)
        else:  # a folder, hub id or GGUF file (which carries its own tokenizer)
            self.model = load_model(model, dtype=dtype, device=device, quantization=quantization)
            if "_fastlfm_tokenizer" not in self.model.__dict__:
                folder = resolve_model_dir(model)
        if tokenizer is None and folder is None:
            tokenizer = self.model.__dict__.get("_fastlfm_tokenizer")
        if tokenizer is None:
            if folder is None:
                raise ValueError("pass tokenizer=... (the model was not loaded from a folder)")
            tokenizer = Tokenizer.from_pretrained(folder)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = Tokenizer.from_pretrained(resolve_model_dir(tokenizer))
        self.tokenizer = tokenizer
        self.model.__dict__["_fastlfm_tokenizer"] = tokenizer  # generate() finds it there
        self.processor = None  # LFM2-VL: images -> pixel tensors + expanded <image> runs
        if getattr(self.model.config, "model_type", None) == "lfm2_vl":
            from .models.lfm2_vl_processing import Lfm2VlProcessor

            self.processor = (Lfm2VlProcessor.from_pretrained(folder, tokenizer) if folder is not None
                              else Lfm2VlProcessor(tokenizer))

    # -- parameters ---------------------------------------------------------------------
    @property
    def generation_config(self) -> dict[str, Any]:
        """The checkpoint's generation_config.json, with the tokenizer's eos if it has none."""
        cfg = dict(getattr(self.model, "generation_config", None) or {})
        if cfg.get("eos_token_id") is None and self.tokenizer.eos_token_id is not None:
            cfg["eos_token_id"] = self.tokenizer.eos_token_id
        return cfg

    def sampling_params(self, params: SamplingParams | None = None, **kwargs: Any) -> SamplingParams:
        """The SamplingParams a call with these arguments uses."""
        return resolve_params(params, self.generation_config, 1, self.model.config.vocab_size, **kwargs)[0]

    def _params_for(self, n: int, params: SamplingParams | Sequence[SamplingParams] | None,
                    kwargs: dict[str, Any]) -> list[SamplingParams]:
        return resolve_params(params, self.generation_config, n, self.model.config.vocab_size, **kwargs)

    # -- prompts --------------------------------------------------------------------------
    def encode_chat(self, messages: Messages, tools: Sequence[Any] | None = None,
                    **template_kwargs: Any) -> list[int]:
        """Token ids of a conversation rendered with the chat template, ready for a reply."""
        return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                  tokenize=True, **template_kwargs)

    def _prepare_chat(self, messages: Messages, tools: Sequence[Any] | None = None,
                      **template_kwargs: Any) -> tuple[list[int], dict[str, Any]]:
        """Prompt ids of a conversation and, when its messages hold image parts
        ({"type": "image", "image": PIL image | path | bytes}), the image tensors."""
        has_images = any(isinstance(m.get("content"), list) and any(
            isinstance(p, Mapping) and p.get("type") == "image" for p in m["content"]) for m in messages)
        if not has_images:
            return self.encode_chat(messages, tools, **template_kwargs), {}
        if self.processor is None:
            raise ValueError(f"messages contain images but {type(self.model).__name__} is a text-only model; "
                             "use an LFM2-VL checkpoint")
        out = self.processor.apply_chat_template(messages, tools=tools, **template_kwargs)
        return out["input_ids"][0], {k: out[k] for k in IMAGE_INPUTS}

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 **kwargs: Any) -> list[GenerationResult]:
        """Complete one prompt or a batch (strings or token id lists); one result per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty")
        ids = [self._encode(p) for p in prompts]
        rows = self._params_for(len(ids), params, kwargs)
        return self._generate_ids(ids, rows)

    def _generate_ids(self, ids: list[list[int]], params: list[SamplingParams],
                      images: list[dict[str, Any] | None] | None = None) -> list[GenerationResult]:
        # Batches run on the continuous-batching engine (packed, no padding; image prompts
        # with text prompts); one prompt on the single-model path. `images`: the processor's
        # tensors per prompt (None for text).
        if len(ids) > 1:
            outs = self.engine.generate(ids, params, image_inputs=images)
            return [_engine_result(o, self.engine.eos_token_ids | set(p.stop_token_ids)) for o, p in zip(outs, params)]
        return generate(self.model, ids, params=params, tokenizer=self.tokenizer,
                        **((images or [None])[0] or {})).results

    @property
    def engine(self):
        """The `fastlfm.engine.LLMEngine` over this model, created on first use."""
        if getattr(self, "_engine", None) is None:
            from .engine import LLMEngine

            self._engine = LLMEngine(self.model, self.tokenizer, processor=self.processor, **self.engine_options)
        return self._engine

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | Sequence[SamplingParams] | None = None,
             tools: Sequence[Any] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             **kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Reply to a conversation (a list of {"role", "content"} messages; with an LFM2-VL
        model, contents may be lists of text and image parts). A list of conversations is a
        batch, run on the engine: one result per conversation, in order."""
        batch = isinstance(messages, Sequence) and bool(messages) and not isinstance(messages[0], Mapping)
        convs = list(messages) if batch else [messages]
        if batch and not all(isinstance(c, Sequence) and not isinstance(c, (str, Mapping)) for c in convs):
            raise ValueError("chat() takes a conversation (a list of message dicts) or a list of conversations")
        prepared = [self._prepare_chat(c, tools, **(chat_template_kwargs or {})) for c in convs]
        results = self._generate_ids([ids for ids, _ in prepared], self._params_for(len(convs), params, kwargs),
                                     [images or None for _, images in prepared])
        return results if batch else results[0]

    def stream(self, prompt: str | Sequence[int] | Messages, params: SamplingParams | None = None,
               tools: Sequence[Any] | None = None, **kwargs: Any) -> Iterator[str]:
        """Text deltas of one completion (a prompt) or reply (a list of messages) as they are
        generated; the final GenerationResult is left in `self.last_result`."""
        images: dict[str, Any] = {}
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            ids, images = self._prepare_chat(prompt, tools)
        else:
            ids = self._encode(prompt)
        run = _Run(self.model, [ids], None, self._params_for(1, params, kwargs), {}, self.tokenizer, {0},
                   model_inputs=images)
        for deltas in run:
            for _, delta in deltas:
                yield delta
        self.last_result = run.results[0]

    def conversation(self, system: str | None = None, params: SamplingParams | None = None,
                     tools: Sequence[Any] | None = None, **kwargs: Any) -> Conversation:
        """A multi-turn chat that keeps the cache between turns."""
        return Conversation(self, system, params, tools, **kwargs)


def _engine_result(out, eos_ids: set[int]) -> GenerationResult:
    """An engine RequestOutput as a GenerationResult ("stop" on an eos token is "eos" here)."""
    reason = out.finish_reason
    if reason == "stop" and out.token_ids and out.token_ids[-1] in eos_ids:
        reason = "eos"
    logprobs = top = None
    if out.logprobs is not None:
        logprobs = [lp.logprob for lp in out.logprobs]
        top = [dict(lp.top) for lp in out.logprobs]
    return GenerationResult(out.text, out.token_ids, reason, out.num_prompt_tokens, logprobs, top)


class Conversation:
    """A chat whose model state is kept between turns.

    Each `send` feeds only the new part of the conversation (the end of the previous reply,
    the new user turn and the assistant header) as one multi-token continuation of the
    cache, so the reply equals a from-scratch run on the whole token history.

    The history is the tokens the model actually produced, not a re-tokenization of their
    text. If the rendered conversation does not extend what is cached (a reply cut by a stop
    string, or a template that rewrites past turns), the cache is rebuilt from the rendered
    conversation: correct, only slower. `last_turn_tokens` counts the tokens fed last turn.
    """

    def __init__(self, llm: LLM, system: str | None = None, params: SamplingParams | None = None,
                 tools: Sequence[Any] | None = None, **kwargs: Any):
        self.llm = llm
        self.system = system
        self.tools = tools
        self.params = llm.sampling_params(params, **kwargs)
        self.reset()

    def reset(self) -> None:
        """Forget all turns (the system prompt stays)."""
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = None
        self.cache_ids: list[int] = []  # tokens whose state is in the cache
        self._pending: list[int] = []  # sampled but not yet fed (the last token of a reply)
        self._text = ""  # the rendered text that cache_ids + _pending stand for
        self.last_result: GenerationResult | None = None
        self.last_turn_tokens = 0
        self.last_input_ids: list[int] = []

    def _next_input(self) -> tuple[list[int], str]:
        """The ids to feed for the pending user turn, and the full prompt text they complete."""
        tok = self.llm.tokenizer
        full = tok.apply_chat_template(self.messages, tools=self.tools, add_generation_prompt=True, tokenize=False)
        if self.cache is not None and self._text and full.startswith(self._text):
            return self._pending + tok.encode(full[len(self._text):], add_special_tokens=False), full
        self.cache, self.cache_ids, self._pending = self.llm.model.make_cache(), [], []
        return tok.encode(full, add_special_tokens=False), full

    def _turn(self, user_text: str, params: SamplingParams) -> Iterator[str]:
        self.messages.append({"role": "user", "content": user_text})
        try:
            new_ids, prompt_text = self._next_input()
            run = _Run(self.llm.model, [new_ids], None, [params], {}, self.llm.tokenizer, {0},
                       past_key_values=self.cache, history_ids=[list(self.cache_ids)])
            for deltas in run:
                for _, delta in deltas:
                    yield delta
        except BaseException:  # the turn did not happen; the cache may be half-updated
            self.messages.pop()
            self.cache, self._text = None, ""
            raise
        result = run.results[0]
        self.last_turn_tokens = len(new_ids)
        self.last_input_ids = self.cache_ids + new_ids  # what the reply was conditioned on
        tok = self.llm.tokenizer
        # The model consumed new_ids and every generated token but the last.
        gen = result.token_ids
        reply_ids = gen[:-1] if result.finish_reason == "eos" else gen
        raw_reply = tok.decode(reply_ids, skip_special_tokens=False)
        self.cache_ids = self.cache_ids + new_ids + gen[:-1]
        self._pending = gen[-1:] if result.finish_reason != "eos" else []
        if result.finish_reason == "stop":  # the cache holds the stop string: rebuild next turn
            self._text = ""
            content = result.text
        else:
            self._text = prompt_text + raw_reply
            content = raw_reply
        self.messages.append({"role": "assistant", "content": content})
        self.last_result = result

    def send(self, user_text: str, params: SamplingParams | None = None, **kwargs: Any) -> str:
        """Add a user turn, generate the reply, keep both in the history; return the reply text."""
        for _ in self.stream(user_text, params, **kwargs):
            pass
        return self.last_result.text

    def stream(self, user_text: str, params: SamplingParams | None = None, **kwargs: Any) -> Iterator[str]:
        """`send`, yielding the reply's text deltas as they are generated."""
        p = params or self.params
        if kwargs:
            p = p.merged(**kwargs)
        yield from self._turn(user_text, p)
