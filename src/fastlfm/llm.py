"""The high-level API: `LLM(model).generate(prompts)`, `.chat(messages)`, `.stream(...)`, and
`Conversation`, a multi-turn chat that keeps the model's cache between turns.

Every call runs on the engine (`fastlfm.engine.LLMEngine`): one prompt or many, text or
images, streamed or not. A model loaded with `generate()` (fastlfm.generation) shares its
engine with the LLM, so `llm.model.generate(...)` and `llm.chat(...)` use one cache pool.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .generation import DEFAULT_ENGINE_OPTIONS, GenerationMixin
from .engine.multimodal import IMAGE_KEYS
from .loading import collection_paused
from .sampling import SamplingParams, resolve_params

__all__ = ["LLM", "Conversation", "GenerationResult"]

Messages = Sequence[Mapping[str, Any]]


@dataclass
class GenerationResult:
    """One generated sequence: new tokens only.

    `token_ids` include the token that ended generation (an eos, or the one completing a stop
    string); `text` excludes the eos and everything from the stop string on.
    finish_reason: "eos", "stop" (a stop string), "length" or "abort".
    """

    text: str | None
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None

    @classmethod
    def from_output(cls, out, logprobs: list | None = None) -> "GenerationResult":
        """From an engine RequestOutput (a final one); `logprobs`: the request's TokenLogprobs."""
        values = top = None
        if logprobs is not None:
            values = [lp.logprob for lp in logprobs]
            top = [dict(lp.top) for lp in logprobs]
        return cls(out.text if out.text_stream is not None else None, out.token_ids, out.finish_reason,
                   out.num_prompt_tokens, values, top)


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

    `model`: a hub id, a checkpoint folder, "demo", or a loaded model.
    `tokenizer`: a `fastlfm.tokenizer.Tokenizer`, a folder, or None for the model's folder.
    Sampling defaults come from the checkpoint's generation_config.json (greedy unless it
    says otherwise); any call may pass a SamplingParams and/or HF-style keywords.
    `quantization`: "int8" (per channel) or "int4" (groups of 32) weight-only quantization at load
    time, for the CPU kernels (fastlfm.cpu_linear); `model` may also be an LFM2 GGUF file (its own
    tokenizer is used).
    `engine_options`: keywords of the `fastlfm.engine.LLMEngine` every call runs on, e.g.
    {"max_num_seqs": 128}, {"compile": False} (on CUDA the decode step is compiled by
    default) or {"max_model_len": 8192}.
    """

    def __init__(self, model: str | os.PathLike | torch.nn.Module, tokenizer: Any = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto",
                 engine_options: dict[str, Any] | None = None, quantization: str | None = None):
        self.engine_options = _checked_engine_options(engine_options or {})
        with collection_paused():  # model, tokenizer and image processor
            self._load(model, tokenizer, device, dtype, quantization)
        self._engine = None
        self.last_result: GenerationResult | None = None

    def _load(self, model, tokenizer, device, dtype, quantization) -> None:
        """Sets self.model, self.tokenizer and self.processor (LFM2-VL's images, else None)."""
        from .generation import load_model_and_tokenizer
        from .loading import resolve_dtype, resolve_model_dir
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
            if tokenizer is None and name is not None:
                folder = resolve_model_dir(name, local_files_only=True)
        else:  # a folder, hub id or GGUF file (which carries its own tokenizer)
            self.model, own_tokenizer, folder = load_model_and_tokenizer(model, dtype, device, quantization)
            if tokenizer is None:
                tokenizer = own_tokenizer
        if tokenizer is None:
            if folder is None:
                raise ValueError("pass tokenizer=... (the model was not loaded from a folder)")
            tokenizer = Tokenizer.from_pretrained(folder)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = Tokenizer.from_pretrained(resolve_model_dir(tokenizer))
        self.tokenizer = tokenizer
        self.processor = None  # LFM2-VL: images -> pixel tensors + expanded <image> runs
        if getattr(self.model.config, "model_type", None) == "lfm2_vl":
            from .models.lfm2_vl_processing import Lfm2VlProcessor

            self.processor = (Lfm2VlProcessor.from_pretrained(folder, tokenizer) if folder is not None
                              else Lfm2VlProcessor(tokenizer))

    @property
    def engine(self):
        """The `fastlfm.engine.LLMEngine` every call runs on, built on first use (the model's own
        engine when the model has `generate()`, so both share one cache pool)."""
        if isinstance(self.model, GenerationMixin):
            return self.model.get_engine(self.tokenizer, self.processor, **self.engine_options)
        if self._engine is None:
            from .engine import LLMEngine

            self._engine = LLMEngine(self.model, self.tokenizer, processor=self.processor,
                                     **{**DEFAULT_ENGINE_OPTIONS, **self.engine_options})
        return self._engine

    # -- parameters ---------------------------------------------------------------------
    @property
    def generation_config(self) -> dict[str, Any]:
        """The checkpoint's generation_config.json (sampling defaults)."""
        return dict(getattr(self.model, "generation_config", None) or {})

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
        return out["input_ids"][0], {k: out[k] for k in IMAGE_KEYS}

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
        return self._generate_ids(ids, self._params_for(len(ids), params, kwargs))

    def _submit(self, ids: list[list[int]], params: list[SamplingParams],
                images: Sequence[dict[str, Any] | None] | None = None) -> list:
        """Add the requests to the engine (all or none)."""
        engine, seqs = self.engine, []
        try:
            for i, (row, p) in enumerate(zip(ids, params)):
                seqs.append(engine.add_request(row, p, image_inputs=images[i] if images else None))
        except BaseException:
            for s in seqs:
                engine.abort(s.request_id)
            raise
        return seqs

    def _generate_ids(self, ids: list[list[int]], params: list[SamplingParams],
                      images: Sequence[dict[str, Any] | None] | None = None) -> list[GenerationResult]:
        seqs = self._submit(ids, params, images)
        finals = {}
        for out in self.engine.iter_outputs(seqs):
            if out.finished:
                finals[out.request_id] = out
        return [GenerationResult.from_output(finals[s.request_id], s.logprobs if s.params.logprobs is not None else None)
                for s in seqs]

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | Sequence[SamplingParams] | None = None,
             tools: Sequence[Any] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             **kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Reply to a conversation (a list of {"role", "content"} messages; with an LFM2-VL
        model, contents may be lists of text and image parts). A list of conversations is a
        batch: one result per conversation, in order."""
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
        generated; the final GenerationResult is left in `self.last_result`. Leaving the loop
        early aborts the request."""
        images: dict[str, Any] = {}
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            ids, images = self._prepare_chat(prompt, tools)
        else:
            ids = self._encode(prompt)
        seq, = self._submit([ids], self._params_for(1, params, kwargs), [images or None])
        for out in self.engine.iter_outputs([seq]):
            if out.new_text:
                yield out.new_text
            if out.finished:
                self.last_result = GenerationResult.from_output(out, seq.logprobs if seq.params.logprobs is not None
                                                                else None)

    def conversation(self, system: str | None = None, params: SamplingParams | None = None,
                     tools: Sequence[Any] | None = None, **kwargs: Any) -> Conversation:
        """A multi-turn chat that keeps the cache between turns."""
        return Conversation(self, system, params, tools, **kwargs)


class Conversation:
    """A chat whose model state is kept between turns: an engine session.

    The conversation is one engine sequence that keeps its KV blocks and conv-state slot
    when a reply ends (`keep_cache`); each `send` appends only the new part of the rendered
    conversation (the template's end of the last reply, the new user turn and the assistant
    header) and continues from the cache, so the reply equals a from-scratch run on the whole
    token history. Under memory pressure the engine may take the cache back; the next turn
    then recomputes the history, with the same result.

    The history is the tokens the model actually produced, not a re-tokenization of their
    text. If the rendered conversation does not extend what is cached (a reply cut by a stop
    string, or a template that rewrites past turns), the session is rebuilt from the rendered
    conversation: correct, only slower. `last_turn_tokens` counts the tokens fed last turn.
    The cache is released by `reset()` and when the conversation is garbage-collected.
    """

    def __init__(self, llm: LLM, system: str | None = None, params: SamplingParams | None = None,
                 tools: Sequence[Any] | None = None, **kwargs: Any):
        self.llm = llm
        self.system = system
        self.tools = tools
        self.params = llm.sampling_params(params, **kwargs)
        self._session = None  # the engine Sequence holding the history and its cache
        self._release_at_gc = None
        self.reset()

    def reset(self) -> None:
        """Forget all turns (the system prompt stays) and release the cache."""
        self._end_session()
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self._text = ""  # the rendered conversation that the session's tokens stand for
        self.last_result: GenerationResult | None = None
        self.last_turn_tokens = 0
        self.last_input_ids: list[int] = []

    def _end_session(self) -> None:
        if self._session is not None:
            self._release_at_gc.detach()
            self.llm.engine.release(self._session)
            self._session = self._release_at_gc = None

    def _start_turn(self, params: SamplingParams):
        """Submit the pending user turn; returns (its sequence, the ids fed, the rendered prompt)."""
        tok, engine = self.llm.tokenizer, self.llm.engine
        full = tok.apply_chat_template(self.messages, tools=self.tools, add_generation_prompt=True, tokenize=False)
        session = self._session
        if session is not None and session.keep_cache and session.is_finished and self._text \
                and full.startswith(self._text):
            new_ids = tok.encode(full[len(self._text):], add_special_tokens=False)
            if new_ids:
                return engine.add_request(new_ids, params, continue_from=session), new_ids, full
        self._end_session()
        new_ids = tok.encode(full, add_special_tokens=False)
        seq = engine.add_request(new_ids, params, keep_cache=True)
        self._session = seq
        self._release_at_gc = weakref.finalize(self, engine.release_later, seq)
        return seq, new_ids, full

    def _turn(self, user_text: str, params: SamplingParams) -> Iterator[str]:
        self.messages.append({"role": "user", "content": user_text})
        final = None
        try:
            seq, new_ids, prompt_text = self._start_turn(params)
            for out in self.llm.engine.iter_outputs([seq]):
                if out.new_text:
                    yield out.new_text
                if out.finished:
                    final = out
        except BaseException:  # the turn did not happen: forget it and its half-updated cache
            self.messages.pop()
            self._text = ""
            self._end_session()
            raise
        result = GenerationResult.from_output(final, seq.logprobs if params.logprobs is not None else None)
        self.last_turn_tokens = len(new_ids)
        self.last_input_ids = seq.token_ids[:final.num_prompt_tokens]  # what the reply was conditioned on
        tok, gen = self.llm.tokenizer, result.token_ids
        if result.finish_reason == "stop":  # the cache holds the stop string: rebuild next turn
            self._text = ""
            content = result.text
        else:
            reply = gen
            if result.finish_reason == "eos" and self.llm.engine.drop_uncomputed(seq, 1):
                reply = gen[:-1]  # the template writes its own end of turn
            content = tok.decode(gen[:-1] if result.finish_reason == "eos" else gen, skip_special_tokens=False)
            self._text = prompt_text + tok.decode(reply, skip_special_tokens=False)
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
