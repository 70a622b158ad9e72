"""transformers-style generation on fastlfm's engine: `model.generate()` and the streamers.

`GenerationMixin.generate` takes what transformers' `generate` takes (a (B, T) tensor of
prompt ids, left-padded with an attention mask, or a list of id lists; sampling keywords or a
`generation_config`; a `streamer`; LFM2-VL image tensors) and returns what it returns: the
prompt ids followed by the new ids, one row per prompt, rows that stopped early padded with
the pad id. The tokens come from the engine (`fastlfm.engine.LLMEngine`), the one decoding
loop of fastlfm, built over the model on first use and kept for later calls.

The model classes themselves live in `fastlfm.models` and know nothing of generation; the
classes of the same names here add `generate()` to them, and `load_model` returns those.
"""

from __future__ import annotations

import os
import queue
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from . import models
from .engine import LLMEngine
from .engine.multimodal import IMAGE_KEYS, split_image_inputs
from .sampling import resolve_params, set_generation_values
from .tokenizer import TextStream, Tokenizer

__all__ = ["GenerationMixin", "GenerateDecoderOnlyOutput", "TextStreamer", "TextIteratorStreamer",
           "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Lfm2VlForConditionalGeneration", "MODEL_TYPES", "load_model",
           "load_model_and_tokenizer",
           "DEFAULT_ENGINE_OPTIONS"]

# The engine a model builds for itself (generate(), LLM): room for a batch of 64 sequences.
DEFAULT_ENGINE_OPTIONS: dict[str, Any] = {"max_num_seqs": 64}


@dataclass
class GenerateDecoderOnlyOutput:
    """`generate(..., return_dict_in_generate=True)`: prompt + new ids, as transformers returns."""

    sequences: torch.Tensor


class GenerationMixin:
    """`generate()` for an LFM2 model class, on an engine over the model.

    The engine (paged KV cache, conv-state slots, CUDA graphs on a GPU) is built on the first
    call and kept: `get_engine()` returns it, and `fastlfm.LLM` over the same model shares it,
    so one model holds one cache pool. Moving the model to another device or dtype builds a
    new one.
    """

    _engine: LLMEngine | None = None
    _engine_options: dict[str, Any] = {}

    def get_engine(self, tokenizer: Tokenizer | None = None, processor: Any = None,
                   **options: Any) -> LLMEngine:
        """The engine over this model. `options` are `LLMEngine`'s keywords: without them the kept
        engine is returned whatever it was built with; with them, it is rebuilt if they differ."""
        engine = self._engine
        wanted = {**DEFAULT_ENGINE_OPTIONS, **options}
        if engine is None or (options and wanted != self._engine_options) or engine.device != self.device \
                or engine.dtype != self.dtype:
            if engine is not None:
                if engine.has_unfinished():
                    raise RuntimeError("the model's engine still runs requests; finish them before changing it")
                self._engine = engine = None
                _release_device_memory(self.device)  # the old cache pool, before the new one is sized
            engine = LLMEngine(self, tokenizer, processor=processor, **wanted)
            self._engine, self._engine_options = engine, wanted
        if engine.tokenizer is None and tokenizer is not None:
            engine.tokenizer = tokenizer
        if engine.processor is None and processor is not None:
            engine.processor = processor
        return engine

    def generate(self, inputs: torch.Tensor | Sequence[Sequence[int]] | None = None,
                 generation_config: Any = None, streamer: Any = None, **kwargs: Any
                 ) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """Generate continuations of a batch of prompts; returns prompt + new ids (B, T + new).

        `inputs` may also be a tokenizer's or processor's BatchEncoding (input_ids, attention_mask,
        image tensors), as `generate(**inputs)` passes them. Keywords as in transformers:
        `input_ids`, `attention_mask` (left padding), sampling
        settings (max_new_tokens, max_length, do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, eos_token_id, stop_strings with tokenizer=, seed, ...; defaults
        from the checkpoint's generation_config.json), `generation_config` (fastlfm's or
        transformers' GenerationConfig, or a dict: its values replace the model's, keywords win), `streamer` (one
        prompt), `pad_token_id`, `return_dict_in_generate`, and for LFM2-VL the processor's
        pixel_values / pixel_attention_mask / spatial_shapes. Features transformers has and
        fastlfm does not (beam search, output_scores, ...) raise a ValueError naming them.
        """
        if isinstance(inputs, Mapping):  # a tokenizer's or processor's BatchEncoding, passed whole
            clash = sorted(set(inputs) & set(kwargs))
            if clash:
                raise ValueError(f"generate() got {', '.join(clash)} both in its first argument and as keywords")
            kwargs.update(inputs)
            inputs = None
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (the prompt token ids)")
        attention_mask = kwargs.pop("attention_mask", None)
        images = {k: kwargs.pop(k) for k in IMAGE_KEYS if k in kwargs}
        tokenizer = kwargs.pop("tokenizer", None)
        return_dict = kwargs.pop("return_dict_in_generate", None)
        # transformers: what a given config sets replaces the model's; what it leaves unset falls back to
        # it (resolve_params merges the sampling settings the same way)
        given = set_generation_values(generation_config)
        gen_defaults = {**(self.generation_config or {}), **given}
        if generation_config is not None:
            kwargs["generation_config"] = generation_config
            if given.get("max_length") is not None and given.get("max_new_tokens") is None:
                kwargs.setdefault("max_length", given["max_length"])
        if return_dict is None:  # the keyword wins over the generation config
            return_dict = bool(gen_defaults.get("return_dict_in_generate", False))
        pad_id = kwargs.pop("pad_token_id", None)
        if pad_id is None:
            pad_id = gen_defaults.get("pad_token_id", self.config.pad_token_id)
        ids, rows = _prompt_rows(input_ids, attention_mask, pad_id, self.config)
        max_length = kwargs.pop("max_length", None)
        if max_length is not None and kwargs.get("max_new_tokens") is None:
            kwargs["max_new_tokens"] = max(int(max_length) - ids.shape[1], 1)
        params = resolve_params(None, self.generation_config, len(rows), self.config.vocab_size, **kwargs)
        if streamer is not None and len(rows) != 1:
            raise ValueError(f"streaming needs a single prompt, got a batch of {len(rows)}")
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"tokenizer must be a fastlfm Tokenizer (fastlfm.AutoTokenizer), got "
                             f"{type(tokenizer).__name__}")
        needs_text = any(p.stop_strings for p in params)
        engine = self.get_engine(tokenizer=tokenizer)
        if needs_text and engine.tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer=... to generate()")
        image_rows = split_image_inputs(self.config, rows, images) if images else [None] * len(rows)
        seqs = []
        try:
            for row, p, im in zip(rows, params, image_rows):
                seqs.append(engine.add_request(row, p, image_inputs=im, detokenize=needs_text))
        except BaseException:
            for s in seqs:
                engine.abort(s.request_id)
            raise
        if streamer is not None:
            streamer.put(ids.cpu())
        try:
            new: dict[str, list[int]] = {}
            for out in engine.iter_outputs(seqs):
                if streamer is not None and out.new_token_ids:
                    streamer.put(torch.tensor(out.new_token_ids))
                if out.finished:
                    new[out.request_id] = out.token_ids
        except BaseException as e:
            if streamer is not None and hasattr(streamer, "on_error"):
                streamer.on_error(e)
            raise
        if streamer is not None:
            streamer.end()
        outs = [new[s.request_id] for s in seqs]
        fill = pad_id if pad_id is not None else min(engine.eos_token_ids, default=0)
        width = max(len(o) for o in outs)
        tail = torch.tensor([o + [fill] * (width - len(o)) for o in outs], dtype=ids.dtype).reshape(len(outs), width)
        sequences = torch.cat([ids, tail.to(ids.device)], dim=1)
        return GenerateDecoderOnlyOutput(sequences) if return_dict else sequences


def _release_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _prompt_rows(input_ids: Any, attention_mask: Any, pad_id: int | None, config: Any
                 ) -> tuple[torch.Tensor, list[list[int]]]:
    """The (B, T) id tensor a caller passed (or built, left-padded, from lists) and each row's
    real ids: the mask's ones, which must come after its zeros (left padding). Without a mask,
    pad ids are padding when the pad id is not an eos id, as transformers infers."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.is_floating_point():
            raise ValueError(f"input_ids must be integer ids of shape (batch, length > 0), got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}")
    else:
        rows = [list(input_ids)] if input_ids and isinstance(input_ids[0], int) else [list(r) for r in input_ids]
        if not rows or any(not r for r in rows):
            raise ValueError("input_ids must hold at least one token per prompt")
        width = max(len(r) for r in rows)
        fill = pad_id if pad_id is not None else 0
        ids = torch.tensor([[fill] * (width - len(r)) + r for r in rows], dtype=torch.long)
        if attention_mask is None:
            return ids, rows
    host = ids.tolist()
    if attention_mask is None:
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        if pad_id is None or pad_id in eos or not any(pad_id in r for r in host):
            return ids, host
        mask = [[int(t != pad_id) for t in r] for r in host]
    else:
        try:
            mask = torch.as_tensor(attention_mask).reshape(ids.shape).long().tolist()
        except (ValueError, RuntimeError, TypeError):  # ragged rows (unpadded), another shape
            raise ValueError(f"attention_mask must be one row per prompt, of input_ids' padded shape "
                             f"{tuple(ids.shape)}; for prompts of different lengths pad them (tokenizer(..., "
                             "padding=True), padding_side='left')") from None
    rows = []
    for i, (r, m) in enumerate(zip(host, mask)):
        n = sum(m)
        if n == 0 or m != [0] * (len(m) - n) + [1] * n:
            raise ValueError(f"attention_mask row {i} is not left padding (zeros, then ones, at least one one); "
                             "pad on the left (tokenizer padding_side='left')")
        rows.append(r[len(r) - n:])
    return ids, rows


# ----------------------------------------------------------------------------- streamers
class TextStreamer:
    """Prints the text of a generation to stdout as it comes (transformers' TextStreamer).

    `generate()` calls `put(ids)` with the prompt first, then with each new token, and `end()`.
    `skip_prompt` leaves the prompt out; `decode_kwargs` (skip_special_tokens) apply to the
    text. The text is built by fastlfm's text stream: complete characters only, the eos left
    out with the special tokens.
    """

    def __init__(self, tokenizer: Tokenizer, skip_prompt: bool = False, file: TextIO | None = None,
                 **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = bool(decode_kwargs.pop("skip_special_tokens", False))
        if decode_kwargs:
            raise ValueError(f"unsupported decode options {sorted(decode_kwargs)} (skip_special_tokens is supported)")
        self.file = file
        self._stream: TextStream | None = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("TextStreamer only supports batch size 1")
            value = value[0]
        ids = value.tolist()
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            if not self.skip_prompt:
                self.on_finalized_text(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))
            self._stream = TextStream(self.tokenizer, skip_special_tokens=self.skip_special_tokens)
            return
        text = "".join(self._stream.add(t) for t in ids)
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        tail = self._stream.finish() if self._stream is not None else ""
        self._stream, self._prompt_seen = None, False
        self.on_finalized_text(tail, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        out = self.file or sys.stdout
        out.write(text + ("\n" if stream_end else ""))
        out.flush()


class TextIteratorStreamer(TextStreamer):
    """The text as an iterator, for a generate() running in another thread:

        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        Thread(target=model.generate, kwargs=dict(input_ids=ids, streamer=streamer)).start()
        for delta in streamer: ...

    An exception in the generating thread is raised in the consumer.
    """

    _END = object()

    def __init__(self, tokenizer: Tokenizer, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.timeout = timeout
        self.text_queue: queue.Queue = queue.Queue()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self._END, timeout=self.timeout)

    def on_error(self, error: BaseException) -> None:
        self.text_queue.put(error)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.text_queue.get(timeout=self.timeout)
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


# ----------------------------------------------------------------------------- model classes
class Lfm2ForCausalLM(GenerationMixin, models.Lfm2ForCausalLM):
    """`fastlfm.models.Lfm2ForCausalLM` with `generate()`."""


class Lfm2MoeForCausalLM(GenerationMixin, models.Lfm2MoeForCausalLM):
    """`fastlfm.models.Lfm2MoeForCausalLM` with `generate()`."""


class Lfm2VlForConditionalGeneration(GenerationMixin, models.Lfm2VlForConditionalGeneration):
    """`fastlfm.models.Lfm2VlForConditionalGeneration` with `generate()`."""


MODEL_TYPES = {"lfm2": Lfm2ForCausalLM, "lfm2_moe": Lfm2MoeForCausalLM, "lfm2_vl": Lfm2VlForConditionalGeneration,
               "lfm2-vl": Lfm2VlForConditionalGeneration}


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = None, quantization: str | None = None, **kwargs: Any):
    """Load any supported LFM2 checkpoint (hub id, folder or GGUF file) as a model with `generate()`.
    `quantization` ("int8" / "int4"): weight-only quantization at load time (CPU kernels)."""
    return load_model_and_tokenizer(name_or_path, dtype, device, quantization, **kwargs)[0]


def load_model_and_tokenizer(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
                             device: str | torch.device | None = None, quantization: str | None = None,
                             **kwargs: Any) -> tuple[Any, Tokenizer | None, Any]:
    """(model with `generate()`, the tokenizer a GGUF file carries or None, the checkpoint folder or
    None): the folder holds the tokenizer files of a safetensors checkpoint."""
    from .gguf import is_gguf_file, load_gguf
    from .loading import resolve_model_dir

    if is_gguf_file(name_or_path):
        model, tokenizer = load_gguf(name_or_path, dtype=dtype, device=device, quantization=quantization,
                                     cls=Lfm2ForCausalLM)
        return model, tokenizer, None
    folder = resolve_model_dir(name_or_path, kwargs.get("revision"), kwargs.get("local_files_only"))
    model = models.load_model(folder, dtype, device, quantization=quantization, model_types=MODEL_TYPES, **kwargs)
    return model, None, folder
