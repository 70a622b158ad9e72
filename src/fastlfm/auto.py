"""transformers' entry points on fastlfm: code written for transformers runs with one import changed.

    from fastlfm import AutoModelForCausalLM, AutoTokenizer   # was: from transformers import ...

`AutoModelForCausalLM` / `AutoModelForImageTextToText` (`AutoModelForVision2Seq`) load by
config.json's `model_type` (lfm2, lfm2_moe, lfm2_vl) the model classes of `fastlfm.generation`,
whose `generate()` runs on the engine; `AutoTokenizer` and `AutoProcessor` give fastlfm's
tokenizer and an LFM2-VL processor with transformers' call signatures; `pipeline("text-generation")`
is transformers' text-generation pipeline over `model.generate()`. Semantics follow transformers
4.57 (the version of Liquid AI's guide) and also accept the 5.x forms a user meets (a
BatchEncoding from `apply_chat_template(..., return_dict=True)` passed to `generate`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .generation import MODEL_TYPES, load_model
from .models.lfm2_vl_processing import conversation_images
from .loading import CheckpointError, read_config_dict, resolve_model_dir
from .sampling import GenerationConfig, set_generation_values
from .tokenizer import BatchEncoding, Tokenizer, is_conversation_batch

__all__ = ["AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoTokenizer",
           "AutoProcessor", "Lfm2VlProcessor", "TextGenerationPipeline", "pipeline"]

# from_pretrained keywords that change nothing here: fastlfm picks its own kernels and loads
# without a copy in host memory; the code of LFM2 is built in.
_NO_OP_LOAD_KEYWORDS = {"attn_implementation", "trust_remote_code", "low_cpu_mem_usage", "use_safetensors"}


def _device_of(device_map: Any, device: Any) -> str | torch.device:
    """One device from transformers' `device_map` / `device` (a model runs on one device here)."""
    if device_map is not None and device is not None:
        raise ValueError("pass device_map or device, not both")
    if isinstance(device_map, Mapping):
        places = set(device_map.values())
        if len(places) != 1:
            raise ValueError(f"device_map={dict(device_map)!r} spreads the model over several devices; fastlfm runs a "
                             "model on one device: pass device_map='auto', 'cuda' or 'cpu'")
        device_map = places.pop()
    chosen = device_map if device_map is not None else device
    if chosen is None:
        return "cpu"  # transformers loads onto the CPU unless told otherwise
    if chosen == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(chosen, int):
        return torch.device("cuda", chosen)
    try:
        return torch.device(chosen)
    except (RuntimeError, TypeError):
        name = "device_map" if device_map is not None else "device"
        raise ValueError(f"{name}={chosen!r} is not a device ('auto', 'cuda', 'cuda:0', 'cpu' or a GPU index)") from None


class _AutoModel:
    """transformers' Auto model classes: `from_pretrained` picks the class by config.json's model_type."""

    model_types: tuple[str, ...] = ()

    def __init__(self) -> None:
        raise TypeError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(name_or_path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, torch_dtype: Any = None,
                        dtype: Any = None, device_map: Any = None, device: Any = None, revision: str | None = None,
                        local_files_only: bool | None = None, **kwargs: Any):
        """Load a hub id, a folder or (AutoModelForCausalLM) an LFM2 GGUF file. `dtype` / `torch_dtype`:
        "auto" (config.json's), "bfloat16", "float16", "float32" or a torch dtype; without one, float32 as
        transformers 4.57. `device_map` ("auto", "cuda", "cpu", a GPU index, or a map onto one device)
        or `device`; without either, the CPU."""
        for key in _NO_OP_LOAD_KEYWORDS & set(kwargs):
            kwargs.pop(key)
        if kwargs:
            raise ValueError(f"{cls.__name__}.from_pretrained: unsupported keyword(s) {', '.join(sorted(kwargs))}")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one")
        dtype = dtype if dtype is not None else torch_dtype
        target = _device_of(device_map, device)
        from .gguf import is_gguf_file

        if not is_gguf_file(pretrained_model_name_or_path):
            folder = resolve_model_dir(pretrained_model_name_or_path, revision, local_files_only)
            model_type = read_config_dict(folder).get("model_type")
            if model_type not in cls.model_types:
                raise CheckpointError(f"{folder / 'config.json'}: model_type {model_type!r} is not one "
                                      f"{cls.__name__} loads ({', '.join(cls.model_types)})")
            pretrained_model_name_or_path = folder
        elif "lfm2" not in cls.model_types:
            raise CheckpointError(f"{pretrained_model_name_or_path}: a GGUF file holds a text model; "
                                  f"{cls.__name__} loads {', '.join(cls.model_types)}")
        return load_model(pretrained_model_name_or_path, dtype, target)


class AutoModelForCausalLM(_AutoModel):
    """Any LFM2 checkpoint: LFM2, LFM2-MoE, and LFM2-VL (Liquid AI's guide loads it this way)."""

    model_types = tuple(MODEL_TYPES)


class AutoModelForImageTextToText(_AutoModel):
    """LFM2-VL checkpoints (transformers 5's class for them)."""

    model_types = ("lfm2_vl", "lfm2-vl")


class AutoModelForVision2Seq(AutoModelForImageTextToText):
    """transformers 4's name of AutoModelForImageTextToText."""


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(name_or_path)`: the checkpoint's tokenizer (fastlfm.tokenizer.Tokenizer)."""

    def __init__(self) -> None:
        raise TypeError("AutoTokenizer is built with AutoTokenizer.from_pretrained(name_or_path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, padding_side: str | None = None,
                        revision: str | None = None, local_files_only: bool | None = None, use_fast: bool = True,
                        trust_remote_code: bool | None = None) -> Tokenizer:
        if not use_fast:
            raise ValueError("use_fast=False: fastlfm has only the fast (tokenizers) tokenizer")
        from .gguf import is_gguf_file, load_gguf_tokenizer

        if is_gguf_file(pretrained_model_name_or_path):  # a GGUF file carries its tokenizer
            tokenizer = load_gguf_tokenizer(pretrained_model_name_or_path)
        else:
            tokenizer = Tokenizer.from_pretrained(resolve_model_dir(pretrained_model_name_or_path, revision,
                                                                    local_files_only))
        if padding_side is not None:
            tokenizer.padding_side = padding_side
        return tokenizer


# ----------------------------------------------------------------------------- LFM2-VL processor
class Lfm2VlProcessor:
    """transformers' LFM2-VL processor calls over fastlfm's (`fastlfm.models.lfm2_vl_processing`):

        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)        # text
        inputs = processor(images=image, text=prompt, return_tensors="pt")                 # tensors
        inputs = processor.apply_chat_template(messages_with_images, add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=64)
        processor.batch_decode(output, skip_special_tokens=True)
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer: Tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor

    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, return_tensors: str | None = None,
                 padding: bool | str = False, use_image_special_tokens: bool | None = None) -> BatchEncoding:
        """Prompt ids with each `<image>` expanded, and the image tensors (`pixel_values`,
        `pixel_attention_mask`, `spatial_shapes`)."""
        if text is None:
            raise ValueError("the LFM2-VL processor needs text= (the prompt, with one <image> per image)")
        out = self.processor(text, images, use_image_special_tokens=use_image_special_tokens)
        encoded = self.tokenizer.pad_rows(out["input_ids"], not isinstance(text, str), padding, return_tensors)
        encoded.update({k: out[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes") if k in out})
        return encoded

    def apply_chat_template(self, conversation: Any, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_tensors: str | None = None, return_dict: bool = False, padding: bool | str = False,
                            **template_kwargs: Any) -> Any:
        """The rendered prompt(s) (`tokenize=False`, transformers' default), or the prompt tokenized with
        the images of its image parts: the ids, or with `return_dict=True` everything `__call__` returns."""
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **template_kwargs)
        if not tokenize:
            return text
        batched = is_conversation_batch(conversation)
        images = [conversation_images(messages, f"conversation {c}: ")
                  for c, messages in enumerate(conversation if batched else [conversation])]
        encoded = self(images=images if any(images) else None, text=text, return_tensors=return_tensors,
                       padding=padding)
        return encoded if return_dict else encoded["input_ids"]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)


class AutoProcessor:
    """`AutoProcessor.from_pretrained(name_or_path)`: the LFM2-VL processor of an LFM2-VL checkpoint,
    the tokenizer of a text one (as transformers)."""

    def __init__(self) -> None:
        raise TypeError("AutoProcessor is built with AutoProcessor.from_pretrained(name_or_path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
                        local_files_only: bool | None = None, trust_remote_code: bool | None = None
                        ) -> Lfm2VlProcessor | Tokenizer:
        folder = resolve_model_dir(pretrained_model_name_or_path, revision, local_files_only)
        tokenizer = Tokenizer.from_pretrained(folder)
        if read_config_dict(folder).get("model_type") not in AutoModelForImageTextToText.model_types:
            return tokenizer
        from .models.lfm2_vl_processing import Lfm2VlProcessor as Processor

        return Lfm2VlProcessor(Processor.from_pretrained(folder, tokenizer))


# ----------------------------------------------------------------------------- pipeline
# transformers' text-generation pipeline samples unless the model's generation config or the
# caller says otherwise (its `_default_generation_config`).
PIPELINE_GENERATION_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}


class TextGenerationPipeline:
    """transformers' text-generation pipeline over `model.generate()` (so on the engine): a string or a
    chat (a list of messages) in, `[{"generated_text": ...}]` out; a list of them is one batch."""

    def __init__(self, model: Any, tokenizer: Tokenizer, **generate_kwargs: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.generate_kwargs = generate_kwargs

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, text_inputs: Any, *, return_full_text: bool = True, add_special_tokens: bool | None = None,
                 continue_final_message: bool | None = None, prefix: str = "", skip_special_tokens: bool = True,
                 batch_size: int | None = None, **generate_kwargs: Any) -> list:
        """`batch_size` changes nothing here: every prompt of the call is one batch on the engine."""
        if "generation_config" not in generate_kwargs:
            generate_kwargs = {**self.generate_kwargs, **generate_kwargs}
        generate_kwargs = self._with_defaults(generate_kwargs)
        is_chat = lambda x: isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], Mapping)  # noqa: E731
        batched = not isinstance(text_inputs, str) and not is_chat(text_inputs)
        prompts = list(text_inputs) if batched else [text_inputs]
        rows, chats = [], []
        for i, prompt in enumerate(prompts):
            if is_chat(prompt):
                cont = prompt[-1].get("role") == "assistant" if continue_final_message is None else continue_final_message
                rows.append(self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=not cont,
                                                               continue_final_message=cont))
                chats.append(cont)
            elif isinstance(prompt, str):
                rows.append(self.tokenizer.encode(prefix + prompt, add_special_tokens=add_special_tokens is not False))
                chats.append(None)
            else:
                raise ValueError(f"text-generation input {i} must be a string or a chat (a list of message dicts), "
                                 f"got {type(prompt).__name__}")
        output = self.model.generate(rows, **generate_kwargs)
        width = max(map(len, rows))  # generate() left-pads the rows to one width
        results = []
        for prompt, cont, new in zip(prompts, chats, output[:, width:]):
            text = self.tokenizer.decode(new, skip_special_tokens=skip_special_tokens)
            if return_full_text and cont is None:
                text = prompt + text
            elif return_full_text:
                last = prompt[-1]
                text = (list(prompt[:-1]) + [{"role": last["role"], "content": last["content"] + text}] if cont
                        else list(prompt) + [{"role": "assistant", "content": text}])
            results.append([{"generated_text": text}])
        return results if batched else results[0]

    def _with_defaults(self, generate_kwargs: dict[str, Any]) -> dict[str, Any]:
        """transformers' pipeline defaults for what neither the call nor the model's generation config
        sets (the sampling ones only when sampling)."""
        given = set_generation_values(generate_kwargs.get("generation_config"))
        set_params = {**(self.model.generation_config or {}), **given, **generate_kwargs}
        added = {k: v for k, v in PIPELINE_GENERATION_DEFAULTS.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added.pop("temperature", None)
        if "generation_config" in generate_kwargs:
            return {**generate_kwargs, "generation_config": GenerationConfig.from_dict({**given, **added})}
        return {**generate_kwargs, **added}


def pipeline(task: str | None = None, model: Any = None, tokenizer: Any = None, *, torch_dtype: Any = None,
             dtype: Any = None, device_map: Any = None, device: Any = None, model_kwargs: dict | None = None,
             trust_remote_code: bool | None = None, **generate_kwargs: Any) -> TextGenerationPipeline:
    """transformers' `pipeline("text-generation", model, ...)`: `model` is a hub id, a folder or a
    loaded model; `tokenizer` defaults to the model's. Other keywords are generation settings for
    every call."""
    if task != "text-generation":
        raise ValueError(f"pipeline task {task!r} is not supported by fastlfm (only 'text-generation')")
    if model is None:
        raise ValueError("pipeline('text-generation') needs a model (hub id, folder or loaded model)")
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            tokenizer = model
        model = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch_dtype, dtype=dtype,
                                                     device_map=device_map, device=device, **(model_kwargs or {}))
    elif any(v is not None for v in (torch_dtype, dtype, device_map, device)):
        raise ValueError("dtype / device options apply when the pipeline loads the model; move a loaded model yourself")
    if tokenizer is None:
        tokenizer = getattr(model, "name_or_path", None)
        if tokenizer is None:
            raise ValueError("pipeline: pass tokenizer= (the model does not say where it was loaded from)")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer, **generate_kwargs)
