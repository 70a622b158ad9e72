"""From OpenAI requests to engine requests and back.

`OpenAIServing` validates a request against the model (name, context length, token ids),
renders the prompt (chat template with tools), builds `SamplingParams` on top of the
checkpoint's generation_config.json, runs one engine request per choice and turns the
engine's outputs into OpenAI responses: a whole body, or server-sent-event chunks.

Both paths feed every engine output through the same `_ChoiceState`, so streamed deltas
always concatenate to the non-streamed text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from ..engine.async_engine import EngineDeadError
from ..sampling import SamplingParams
from .errors import APIError, bad_request, engine_unavailable, error_body, invalid_request
from .images import ImagePolicy, check_url, decode_data_url, fetch_image, is_remote, open_image
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, TokenIds
from .tool_calls import TOOL_CALL_END, TOOL_CALL_START, StreamingToolCallParser, ToolCall, format_tool_calls

# SamplingParams field -> request field, to name the field in errors raised by validate().
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "stop_strings": "stop", "logprobs": "logprobs"}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- request bodies
# Request bodies are parsed and validated off the event loop, and big lists (messages, prompt
# token ids) are validated in slices: one pydantic call holds the GIL for its whole duration
# (100k messages took 0.5 s), which would stall the event loop just as running it there would.
_SLICE = 1000
_SURROGATE = re.compile("[\ud800-\udfff]")
_STRICT = ConfigDict(strict=True)
_MESSAGES = TypeAdapter(list[ChatMessage], config=_STRICT)
_TOKEN_IDS = TypeAdapter(TokenIds, config=_STRICT)
_STRINGS = TypeAdapter(list[str], config=_STRICT)


def parse_json_body(body: bytes) -> Any:
    """The JSON value of a request body, or a 400 that says what is wrong with it."""
    if not body.strip():
        raise bad_request("The request body is empty: send a JSON object", code="invalid_json")
    try:
        return json.loads(body)
    except RecursionError:
        raise bad_request("Request body is not valid JSON: it is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers of more than 4300 digits
        detail = "a number has too many digits" if "integer string conversion" in str(e) else str(e)
        raise bad_request(f"Request body is not valid JSON: {detail}", code="invalid_json") from None


def _validate(model: type, data: Any):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_request(e.errors()) from None


def _validate_slices(adapter: TypeAdapter, items: list, loc: tuple) -> list:
    """`adapter.validate_python(items)`, `_SLICE` items per call; errors name the item's index."""
    out: list = []
    for start in range(0, len(items), _SLICE):
        try:
            out += adapter.validate_python(items[start:start + _SLICE])
        except ValidationError as e:
            raise invalid_request([{**err, "loc": (*loc, start + err["loc"][0], *err["loc"][1:])}
                                   if err.get("loc") else err for err in e.errors()]) from None
    return out


# ----------------------------------------------------------------------------- one choice


@dataclass
class Delta:
    """What one engine output adds to a choice."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # engine TokenLogprob objects
    finish_reason: str | None = None

    def is_empty(self) -> bool:
        return not (self.content or self.tool_calls or self.logprobs or self.finish_reason)


# The engine's finish reasons in OpenAI's words (eos tokens and stop strings are both "stop").
OPENAI_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


class _ChoiceState:
    """Turns the engine outputs of one choice into deltas.

    The engine's text deltas are final (special tokens skipped, a tail that may start a stop
    string held back, cut before a stop string), so they pass straight on. When tool calls
    are parsed the request keeps the two tool-call markers in its text, and the text goes
    through the streaming tool-call parser.
    """

    def __init__(self, serving: "OpenAIServing", parse_tools: bool):
        self.serving = serving
        self.tool_parser = StreamingToolCallParser() if parse_tools else None
        self.num_tool_calls = 0
        self.num_generated = 0
        self.num_cached = 0  # prompt tokens of its request found in the prefix cache
        self.finish_reason: str | None = None
        self.started = time.perf_counter()
        self.last_token_time: float | None = None

    def update(self, out) -> Delta:
        metrics = self.serving.metrics
        now = time.perf_counter()
        n_new = len(out.new_token_ids)
        if n_new:
            if self.last_token_time is None:
                metrics.time_to_first_token.observe(now - self.started)
            else:
                metrics.time_per_output_token.observe((now - self.last_token_time) / n_new)
            self.last_token_time = now
        self.num_generated = out.num_generated_tokens
        self.num_cached = out.num_cached_tokens

        delta = Delta(logprobs=list(out.logprobs or ()))
        if out.finished and out.finish_reason == "eos" and delta.logprobs:
            delta.logprobs.pop()  # the eos / stop token is not part of the text
        if self.tool_parser is None:
            delta.content = out.new_text
        else:
            delta.content, delta.tool_calls = self.tool_parser.feed(out.new_text)
            if out.finished:
                rest, more = self.tool_parser.finish()
                delta.content += rest
                delta.tool_calls += more
            self.num_tool_calls += len(delta.tool_calls)
        if out.finished:
            reason = OPENAI_FINISH_REASONS[out.finish_reason]
            metrics.e2e_latency.observe(now - self.started)
            metrics.finished(reason)
            if self.num_tool_calls and reason in ("stop", "length"):
                reason = "tool_calls"
            self.finish_reason = delta.finish_reason = reason
        return delta


# ----------------------------------------------------------------------------- prepared work


@dataclass
class _Job:
    """One engine request: a choice of a chat or text completion."""

    index: int
    prompt_index: int  # which prompt of the request (completions may have several)
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    prompt_text: str = ""  # for echo
    image_inputs: dict[str, Any] | None = None  # LFM2-VL processor tensors of the prompt's images


@dataclass
class _Prepared:
    response_id: str
    model: str
    jobs: list[_Job]
    parse_tools: bool
    stream: bool
    include_usage: bool
    num_top_logprobs: int | None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        # n choices of one prompt count the prompt once, as OpenAI does.
        return sum({job.prompt_index: len(job.prompt_ids) for job in self.jobs}.values())


# ----------------------------------------------------------------------------- serving


class OpenAIServing:
    def __init__(self, engine, served_model_names: list[str], metrics: ServerMetrics, max_pending: int,
                 image_policy: ImagePolicy | None = None):
        if engine.tokenizer is None:
            raise ValueError("the server needs a checkpoint with tokenizer files (tokenizer.json)")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        # LFM2-VL: the processor turns image parts into pixel tensors and <image> runs.
        self.processor = getattr(engine, "processor", None)
        self.image_policy = image_policy or ImagePolicy()
        self.model_config = engine.config
        self.model_names = list(served_model_names)
        self.metrics = metrics
        self.max_pending = max_pending
        self.pending = 0
        self.max_model_len = int(engine.max_model_len)
        self.generation_config = dict(engine.generation_config or {})
        self.vocab_size = int(engine.config.vocab_size)  # rows of the output layer: ids the model takes and emits
        self.grammars = engine.grammars  # structured output (compiled lazily)
        # Tool calls are parsed from text that keeps these two special tokens (if the tokenizer has them).
        self.tool_markers = [self.tokenizer.token_to_id(TOOL_CALL_START), self.tokenizer.token_to_id(TOOL_CALL_END)]
        self.supports_tools = None not in self.tool_markers
        self.token_text = functools.lru_cache(maxsize=1 << 16)(
            lambda i: self.tokenizer.decode([i], skip_special_tokens=False))
        self.max_token_bytes = _max_token_bytes(self.tokenizer)
        self._live: set[str] = set()  # engine request ids being streamed from (for abort_all)
        # Parsing, validation, templating and tokenization run here, off the event loop.
        self._executor = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 4), thread_name_prefix="fastlfm-prepare")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def abort_all(self) -> None:
        """Abort every running engine request (shutdown): each response ends with what it has and
        finish_reason "abort"."""
        for request_id in list(self._live):
            await self.engine.abort(request_id)

    async def _off_loop(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ validation helpers
    def check_model(self, name: str) -> str:
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist. Available: {', '.join(self.model_names)}",
                           param="model", code="model_not_found")
        return name

    def _sampling_params(self, req, max_new_tokens: int, num_logprobs: int | None, seed_offset: int) -> SamplingParams:
        overrides: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value is not None:
                overrides[name] = value
        if req.top_k is not None:
            overrides["top_k"] = max(req.top_k, 0)  # vLLM's -1 = off
        if req.seed is not None:
            overrides["seed"] = req.seed + seed_offset  # n choices from one seed differ, reproducibly
        if req.stop_list:
            overrides["stop_strings"] = req.stop_list
        if req.ignore_eos:
            overrides["ignore_eos"] = True
        constraint = _constraint(req)
        if constraint is not None:
            overrides[constraint[0]] = constraint[1]
        if num_logprobs is not None:
            overrides["logprobs"] = num_logprobs
        if req.logit_bias:
            bias = {}
            for key, value in req.logit_bias.items():
                digits = key.lstrip("0") or "0"  # keys are ASCII digits (protocol); any count of them
                token = int(digits) if len(digits) <= len(str(self.vocab_size)) else self.vocab_size
                if token >= self.vocab_size:
                    shown = key if len(key) <= 24 else f"{key[:12]}...{key[-6:]} ({len(key)} digits)"
                    raise bad_request(f"logit_bias token id {shown} is outside the vocabulary (size {self.vocab_size})",
                                      param="logit_bias")
                bias[token] = bias.get(token, 0.0) + float(value)
            overrides["logit_bias"] = bias
        try:
            params = SamplingParams.from_generation_config(self.generation_config, **overrides)
            if req.stop_token_ids:
                params = params.merged(stop_token_ids=[*params.stop_token_ids, *req.stop_token_ids])
            params.validate(self.vocab_size)
        except ValueError as e:
            m = re.search(r"parameter (\w+)=", str(e))
            param = _PARAM_NAMES.get(m.group(1), m.group(1)) if m else None
            raise bad_request(str(e), param=param) from None
        if constraint is not None:
            try:  # compiled now, off the event loop; the engine finds it in its cache
                self.grammars.compile(params)
            except ValueError as e:
                raise bad_request(str(e), param=constraint[2]) from None
        return params

    def _max_new_tokens(self, requested: int | None, prompt_len: int, what: str) -> int:
        room = self.max_model_len - prompt_len
        if room < 1 or (requested is not None and requested > room):
            asked = prompt_len + (requested if requested is not None else 1)
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{asked} tokens ({prompt_len} in the {what}, {asked - prompt_len} in the completion). "
                f"Please reduce the length of the {what} or completion.",
                param=what, code="context_length_exceeded")
        return requested if requested is not None else room

    def _too_long(self, what: str, tokens: int, n_bytes: int | None = None) -> APIError:
        size = f"at least {tokens} tokens ({n_bytes} bytes)" if n_bytes is not None else f"{tokens} tokens"
        return APIError(
            400, f"This model's maximum context length is {self.max_model_len} tokens. However, your {what} is {size} "
                 f"long, which leaves no room for a completion. Please reduce the length of the {what}.",
            param=what, code="context_length_exceeded")

    def _check_text_size(self, text: str, what: str) -> None:
        """Refuse a text whose size alone proves it longer than the context: a token stands for at
        most `max_token_bytes` bytes of it, so this needs no tokenizing (seconds for megabytes)."""
        if self.max_token_bytes is None:
            return
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        if n_bytes // self.max_token_bytes >= self.max_model_len:
            raise self._too_long(what, n_bytes // self.max_token_bytes, n_bytes)

    def _encode(self, text: str, add_special_tokens: bool, what: str) -> list[int]:
        """Token ids of `text`, refused as soon as it is known to be too long for the context."""
        self._check_text_size(text, what)
        if _SURROGATE.search(text):  # JSON allows "\ud800"; the tokenizer takes only valid Unicode
            raise bad_request(f"The {what} is not valid Unicode: it contains a lone surrogate code point "
                              "(U+D800-U+DFFF)", param=what)
        encoding = self.tokenizer.encodings([text], add_special_tokens)[0]  # GIL released meanwhile
        if len(encoding) >= self.max_model_len:  # before building a Python list of all its ids
            raise self._too_long(what, len(encoding))
        return encoding.ids

    def reserve(self, jobs: int) -> Callable[[], None]:
        """Count `jobs` generations against the capacity (429 when full); returns an
        idempotent release, called when the response is over whatever happened to it."""
        if jobs > self.max_pending:  # would never fit: a client error, not a busy server
            raise bad_request(f"The request needs {jobs} generations (prompts x n) but the server runs at most "
                              f"{self.max_pending} at once", param="n")
        if self.pending + jobs > self.max_pending:  # counted in /metrics with every other error response
            raise APIError(429, f"The server is at capacity ({self.max_pending} generations queued or running); "
                           "retry later", code="queue_full", headers={"Retry-After": "1"})
        self.pending += jobs
        self.metrics.in_flight.set(self.pending)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.pending -= jobs
                self.metrics.in_flight.set(self.pending)

        return release

    # ------------------------------------------------------------------ chat
    def _image_parts(self, req: ChatCompletionRequest) -> list[tuple[int, int, str, str]]:
        """(message, part, url, param) of every image part, checked against the model and the
        image policy before anything is decoded or fetched."""
        found = []
        for i, msg in enumerate(req.messages):
            for j, part in enumerate(msg.content if isinstance(msg.content, list) else []):
                if part.type == "text":
                    if part.text is None:
                        raise bad_request("A text part needs a 'text' string", param=f"messages.{i}.content.{j}.text",
                                          code="missing_required_parameter")
                    continue
                if part.type != "image_url":
                    kinds = "text and image_url parts" if self.processor is not None else "text parts"
                    raise bad_request(f"Content part type {part.type!r} is not supported; send {kinds}",
                                      param=f"messages.{i}.content.{j}.type")
                if self.processor is None:
                    raise bad_request("Content part type 'image_url' is not supported: this model is text-only "
                                      "(image inputs need an LFM2-VL model); send text parts",
                                      param=f"messages.{i}.content.{j}.type")
                if part.image_url is None:
                    raise bad_request("An image_url part needs an 'image_url' object with a 'url'",
                                      param=f"messages.{i}.content.{j}.image_url",
                                      code="missing_required_parameter")
                param = f"messages.{i}.content.{j}.image_url.url"
                check_url(part.image_url.url, param, self.image_policy)
                found.append((i, j, part.image_url.url, param))
        return found

    # ------------------------------------------------------------------ request bodies
    async def prepare_chat_body(self, body: bytes) -> _Prepared:
        """Parse, validate and render a chat request body, off the event loop (remote images, when
        allowed, are fetched on the loop in between)."""
        step = await self._off_loop(self._chat_from_body, body)
        if isinstance(step, _Prepared):
            return step
        req, remote = step
        fetched = {(i, j): await fetch_image(url, param, self.image_policy) for i, j, url, param in remote}
        return await self._off_loop(self.prepare_chat, req, fetched)

    async def prepare_completion_body(self, body: bytes) -> _Prepared:
        """Parse, validate and tokenize a text completion request body, off the event loop."""
        return await self._off_loop(lambda: self.prepare_completion(self.parse_completion(body)))

    def parse_chat(self, body: bytes) -> ChatCompletionRequest:
        data = parse_json_body(body)
        messages = data.get("messages") if isinstance(data, dict) else None
        if isinstance(messages, list) and len(messages) > self.max_model_len:
            # Each message renders to at least one token (its role marker): refused before seconds of
            # validation and templating (100k messages: ~3 s of Python holding the GIL).
            raise APIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens. However, your messages "
                     f"are {len(messages)}, each at least one token long, which leaves no room for a completion. "
                     "Please reduce the length of the messages.", param="messages", code="context_length_exceeded")
        if not isinstance(messages, list) or len(messages) <= _SLICE:
            return _validate(ChatCompletionRequest, data)
        validated = _validate_slices(_MESSAGES, messages, ("messages",))
        req = _validate(ChatCompletionRequest, {**data, "messages": validated[:1]})  # the rest is validated
        req.messages = validated
        return req

    def parse_completion(self, body: bytes) -> CompletionRequest:
        data = parse_json_body(body)
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], str) and len(prompt) <= _SLICE:
            return _validate(CompletionRequest, data)
        # Token ids: a prompt longer than the context is refused before its ids are validated.
        if isinstance(prompt[0], list):
            for i, ids in enumerate(prompt):
                if isinstance(ids, list) and len(ids) >= self.max_model_len:
                    raise self._too_long("prompt", len(ids))
                if not isinstance(ids, list) or not ids:
                    raise bad_request("Each prompt of a list of token-id prompts must be a non-empty list of token "
                                      "ids", param=f"prompt.{i}")
            validated = [_validate_slices(_TOKEN_IDS, ids, ("prompt", i)) for i, ids in enumerate(prompt)]
        elif isinstance(prompt[0], str):
            validated = _validate_slices(_STRINGS, prompt, ("prompt",))
        else:
            if len(prompt) >= self.max_model_len:
                raise self._too_long("prompt", len(prompt))
            validated = _validate_slices(_TOKEN_IDS, prompt, ("prompt",))
        req = _validate(CompletionRequest, {**data, "prompt": "placeholder"})  # the prompt is validated
        req.prompt = validated
        return req

    def _chat_from_body(self, body: bytes) -> _Prepared | tuple[ChatCompletionRequest, list]:
        req = self.parse_chat(body)
        self.check_model(req.model)
        remote = [part for part in self._image_parts(req) if is_remote(part[2])]
        return (req, remote) if remote else self.prepare_chat(req)

    def _load_images(self, req: ChatCompletionRequest, fetched: dict[tuple[int, int], bytes] | None) -> dict:
        images = {}
        for i, j, url, param in self._image_parts(req):
            if (i, j) in (fetched or {}):
                raw = fetched[(i, j)]
            elif is_remote(url):
                raise RuntimeError("remote images are fetched by prepare_chat_body")
            else:
                raw = decode_data_url(url, param, self.image_policy.max_bytes)
            images[(i, j)] = open_image(raw, param)
        return images

    def _chat_message(self, msg: ChatMessage, i: int, template_handles_calls: bool,
                      images: dict[tuple[int, int], Any] | None = None) -> dict[str, Any]:
        content = msg.content
        if isinstance(content, list):  # parts were checked by _image_parts
            parts = [{"type": "image", "image": images[(i, j)]} if part.type == "image_url"
                     else {"type": "text", "text": part.text} for j, part in enumerate(content)]
            if any(p["type"] == "image" for p in parts):
                content = parts  # the template renders <image> for each image part, in order
            else:
                content = "\n".join(p["text"] for p in parts)
        message: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role}
        if msg.tool_calls:
            calls = [c.model_dump() for c in msg.tool_calls]
            if template_handles_calls:
                message["tool_calls"] = calls
            else:  # the LFM2 template prints content only: put the calls in the model's own syntax
                try:
                    content = format_tool_calls(calls) + (content or "")
                except ValueError as e:
                    raise bad_request(str(e), param=f"messages.{i}.tool_calls") from None
        message["content"] = content if content is not None else ""
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(msg, key) is not None:
                message[key] = getattr(msg, key)
        return message

    def prepare_chat(self, req: ChatCompletionRequest,
                     fetched_images: dict[tuple[int, int], bytes] | None = None) -> _Prepared:
        """Validate and render a chat request. Image parts need an LFM2-VL model; remote ones
        arrive in `fetched_images` (see `prepare_chat_body`)."""
        model = self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if req.continue_final_message and req.add_generation_prompt:
            raise bad_request("continue_final_message requires add_generation_prompt to be false",
                              param="continue_final_message")
        choice = req.tool_choice
        if choice is not None and not isinstance(choice, str) or choice == "required":
            raise bad_request("tool_choice 'required' and named functions need constrained decoding, which fastlfm "
                              "does not implement; use 'auto' or 'none'", param="tool_choice")
        tools = None
        if req.tools:
            # LFM2 was trained on bare function schemas between the tool-list tokens (model card).
            tools = [t.function.model_dump(exclude_none=True) for t in req.tools]
        parse_tools = bool(tools) and choice != "none" and self.supports_tools
        try:
            template = self.tokenizer.get_chat_template(None, tools)
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None
        handles_calls = "tool_calls" in template
        images = self._load_images(req, fetched_images)
        messages = [self._chat_message(m, i, handles_calls, images) for i, m in enumerate(req.messages)]
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, tokenize=False, chat_template=template)
        except Exception as e:  # template errors are caused by the conversation's shape
            raise bad_request(f"The chat template cannot render these messages: {e}", param="messages") from None
        image_inputs = None
        if images:
            self._check_text_size(rendered, "messages")
            prompt_ids, image_inputs = self._expand_images(rendered, [images[k] for k in sorted(images)])
        else:
            prompt_ids = self._encode(rendered, add_special_tokens=False, what="messages")
        if not prompt_ids:
            raise bad_request("The rendered prompt is empty", param="messages")
        max_new = self._max_new_tokens(req.max_new_tokens, len(prompt_ids), "messages")
        num_lp = (req.top_logprobs or 0) if req.logprobs else None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        params = [self._sampling_params(req, max_new, num_lp, i) for i in range(req.n)]
        if parse_tools:  # the parser reads the tool-call markers in the text
            params = [p.merged(keep_special_token_ids=self.tool_markers) for p in params]
        jobs = [_Job(i, 0, prompt_ids, p, f"{rid}-{i}", image_inputs=image_inputs) for i, p in enumerate(params)]
        return _Prepared(rid, model, jobs, parse_tools, req.stream,
                         bool(req.stream_options and req.stream_options.include_usage), num_lp)

    def _expand_images(self, text: str, images: list[Any]) -> tuple[list[int], dict[str, Any]]:
        """Prompt ids with each `<image>` expanded, and the image tensors, from the processor."""
        from ..engine.multimodal import DIGESTS_KEY, IMAGE_KEYS, check_image_inputs, view_digests

        try:
            enc = self.processor(text, images)
            prompt_ids, image_inputs = enc["input_ids"][0], {k: enc[k] for k in IMAGE_KEYS}
            check_image_inputs(self.model_config, prompt_ids, image_inputs)  # what the engine would refuse: a 400 now
            image_inputs[DIGESTS_KEY] = view_digests(image_inputs)  # the prefix cache's keys, made here
        except ValueError as e:
            raise bad_request(f"Cannot prepare the images of these messages: {e}", param="messages") from None
        return prompt_ids, image_inputs

    # ------------------------------------------------------------------ completions
    def prepare_completion(self, req: CompletionRequest) -> _Prepared:
        model = self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of different from n is not supported", param="best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs would need prompt logprobs, which are not supported", param="echo")
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = []
        for p_idx, p in enumerate(prompts):
            if isinstance(p, str):
                ids, text = self._encode(p, add_special_tokens=True, what="prompt"), p
            else:
                bad = [t for t in p if t >= self.vocab_size]
                if bad:
                    raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})",
                                      param="prompt")
                ids, text = list(p), (self.tokenizer.decode(p, skip_special_tokens=True) if req.echo else "")
            if not ids:
                raise bad_request("The prompt is empty", param="prompt")
            max_new = self._max_new_tokens(req.max_new_tokens, len(ids), "prompt")
            for i in range(req.n):
                params = self._sampling_params(req, max_new, req.logprobs, i)
                index = p_idx * req.n + i
                jobs.append(_Job(index, p_idx, ids, params, f"{rid}-{index}", text if req.echo else ""))
        return _Prepared(rid, model, jobs, False, req.stream,
                         bool(req.stream_options and req.stream_options.include_usage), req.logprobs)

    # ------------------------------------------------------------------ running
    def _outputs(self, job: _Job) -> AsyncIterator:
        """The engine outputs of one job; stopping early aborts it in the engine."""
        return self.engine.generate(job.prompt_ids, job.params, job.request_id, image_inputs=job.image_inputs)

    async def _merged(self, prep: _Prepared) -> AsyncIterator[tuple[_Job, Any]]:
        """Outputs of all jobs as they come; cancelling the consumer aborts every job."""
        ids = [job.request_id for job in prep.jobs]
        self._live.update(ids)
        try:
            if len(prep.jobs) == 1:
                job = prep.jobs[0]
                async with contextlib.aclosing(self._outputs(job)) as outputs:
                    async for out in outputs:
                        yield job, out
                return
            queue: asyncio.Queue = asyncio.Queue()
            done = object()

            async def pump(job: _Job) -> None:
                try:
                    async with contextlib.aclosing(self._outputs(job)) as outputs:
                        async for out in outputs:
                            await queue.put((job, out))
                except Exception as e:  # surfaced to the consumer, which ends the request
                    await queue.put((job, e))
                finally:
                    await queue.put((job, done))

            tasks = [asyncio.create_task(pump(job)) for job in prep.jobs]
            remaining = len(tasks)
            try:
                while remaining:
                    job, item = await queue.get()
                    if item is done:
                        remaining -= 1
                    elif isinstance(item, Exception):
                        raise item
                    else:
                        yield job, item
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._live.difference_update(ids)

    def _states(self, prep: _Prepared) -> dict[int, _ChoiceState]:
        return {job.index: _ChoiceState(self, prep.parse_tools) for job in prep.jobs}

    # ------------------------------------------------------------------ logprobs
    def _chat_logprobs(self, lps: list) -> list[dict]:
        out = []
        for lp in lps:
            token = self.token_text(lp.token_id)
            out.append({"token": token, "logprob": lp.logprob, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": (t := self.token_text(i)), "logprob": v, "bytes": list(t.encode())}
                                         for i, v in lp.top]})
        return out

    def _completion_logprobs(self, lps: list, offset: int) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            token = self.token_text(lp.token_id)
            tokens.append(token)
            values.append(lp.logprob)
            tops.append({self.token_text(i): v for i, v in lp.top})
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _usage(self, prep: _Prepared, states: dict[int, _ChoiceState]) -> dict:
        completion = sum(s.num_generated for s in states.values())
        cached: dict[int, int] = {}  # per prompt, as prompt_tokens counts it (n choices: the most any found)
        for job in prep.jobs:
            cached[job.prompt_index] = max(cached.get(job.prompt_index, 0), states[job.index].num_cached)
        return {"prompt_tokens": prep.prompt_tokens, "completion_tokens": completion,
                "total_tokens": prep.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}

    # ------------------------------------------------------------------ full responses
    async def chat_response(self, prep: _Prepared) -> dict:
        release = self.reserve(len(prep.jobs))
        states = self._states(prep)
        try:
            return await self._chat_response(prep, states)
        finally:
            self._count_aborted(states)
            release()

    async def _chat_response(self, prep: _Prepared, states: dict[int, _ChoiceState]) -> dict:
        content = {i: [] for i in states}
        calls: dict[int, list[ToolCall]] = {i: [] for i in states}
        lps: dict[int, list] = {i: [] for i in states}
        async with contextlib.aclosing(self._merged(prep)) as outputs:
            async for job, out in outputs:
                d = states[job.index].update(out)
                content[job.index].append(d.content)
                calls[job.index] += d.tool_calls
                lps[job.index] += d.logprobs
        choices = []
        for i, state in sorted(states.items()):
            text = "".join(content[i])
            message = {"role": "assistant", "content": text if text or not calls[i] else None,
                       "tool_calls": [c.to_openai() for c in calls[i]] if calls[i] else None}
            logprobs = {"content": self._chat_logprobs(lps[i])} if prep.num_top_logprobs is not None else None
            choices.append({"index": i, "message": message, "logprobs": logprobs,
                            "finish_reason": state.finish_reason})
        self._count_usage(prep, states)
        return {"id": prep.response_id, "object": "chat.completion", "created": prep.created, "model": prep.model,
                "choices": choices, "usage": self._usage(prep, states), "system_fingerprint": None}

    async def completion_response(self, prep: _Prepared) -> dict:
        release = self.reserve(len(prep.jobs))
        states = self._states(prep)
        try:
            return await self._completion_response(prep, states)
        finally:
            self._count_aborted(states)
            release()

    async def _completion_response(self, prep: _Prepared, states: dict[int, _ChoiceState]) -> dict:
        jobs = {job.index: job for job in prep.jobs}
        text = {i: [jobs[i].prompt_text] for i in states}
        lps: dict[int, list] = {i: [] for i in states}
        async with contextlib.aclosing(self._merged(prep)) as outputs:
            async for job, out in outputs:
                d = states[job.index].update(out)
                text[job.index].append(d.content)
                lps[job.index] += d.logprobs
        choices = []
        for i, state in sorted(states.items()):
            logprobs = self._completion_logprobs(lps[i], len(jobs[i].prompt_text)) \
                if prep.num_top_logprobs is not None else None
            choices.append({"index": i, "text": "".join(text[i]), "logprobs": logprobs,
                            "finish_reason": state.finish_reason})
        self._count_usage(prep, states)
        return {"id": prep.response_id, "object": "text_completion", "created": prep.created, "model": prep.model,
                "choices": choices, "usage": self._usage(prep, states), "system_fingerprint": None}

    def _count_aborted(self, states: dict[int, _ChoiceState]) -> None:
        for state in states.values():
            if state.finish_reason is None:  # the client went away (or the request failed)
                state.finish_reason = "abort"
                self.metrics.finished("abort")

    def _count_usage(self, prep: _Prepared, states: dict[int, _ChoiceState]) -> None:
        self.metrics.prompt_tokens.inc(prep.prompt_tokens)
        self.metrics.completion_tokens.inc(sum(s.num_generated for s in states.values()))

    # ------------------------------------------------------------------ streams
    def start_stream(self, prep: _Prepared, chat: bool) -> tuple[AsyncIterator[str], Callable[[], None]]:
        """Reserve capacity now (so a full queue is a 429, not a broken stream); returns the
        SSE text stream and the release to call when the response ends."""
        release = self.reserve(len(prep.jobs))
        states = self._states(prep)
        return (self._chat_stream(prep, states) if chat else self._completion_stream(prep, states)), release

    async def _chat_stream(self, prep: _Prepared, states: dict[int, _ChoiceState]) -> AsyncIterator[str]:
        base = {"id": prep.response_id, "object": "chat.completion.chunk", "created": prep.created,
                "model": prep.model}
        usage_field = {"usage": None} if prep.include_usage else {}
        tool_index = {i: 0 for i in states}

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return sse({**base, "choices": [choice], **usage_field})

        try:
            for i in sorted(states):
                yield chunk(i, {"role": "assistant", "content": ""})
            async with contextlib.aclosing(self._merged(prep)) as outputs:
                async for job, out in outputs:
                    d = states[job.index].update(out)
                    if d.is_empty():
                        continue
                    delta: dict[str, Any] = {}
                    if d.content:
                        delta["content"] = d.content
                    if d.tool_calls:
                        first = tool_index[job.index]
                        tool_index[job.index] += len(d.tool_calls)
                        delta["tool_calls"] = [{"index": first + k, **c.to_openai()}
                                               for k, c in enumerate(d.tool_calls)]
                    logprobs = {"content": self._chat_logprobs(d.logprobs)} \
                        if prep.num_top_logprobs is not None and d.logprobs else None
                    yield chunk(job.index, delta, logprobs, d.finish_reason)
            self._count_usage(prep, states)
            if prep.include_usage:
                yield sse({**base, "choices": [], "usage": self._usage(prep, states)})
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            status, body = _stream_error(e)
            self.metrics.error(status)
            yield sse(body)
        finally:
            self._count_aborted(states)
        yield SSE_DONE

    async def _completion_stream(self, prep: _Prepared, states: dict[int, _ChoiceState]) -> AsyncIterator[str]:
        base = {"id": prep.response_id, "object": "text_completion", "created": prep.created, "model": prep.model}
        usage_field = {"usage": None} if prep.include_usage else {}
        jobs = {job.index: job for job in prep.jobs}
        offsets = {i: len(jobs[i].prompt_text) for i in states}

        def chunk(index: int, text: str, logprobs=None, finish_reason=None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            return sse({**base, "choices": [choice], **usage_field})

        try:
            for i in sorted(states):
                if jobs[i].prompt_text:
                    yield chunk(i, jobs[i].prompt_text)
            async with contextlib.aclosing(self._merged(prep)) as outputs:
                async for job, out in outputs:
                    d = states[job.index].update(out)
                    if d.is_empty():
                        continue
                    logprobs = None
                    if prep.num_top_logprobs is not None:
                        logprobs = self._completion_logprobs(d.logprobs, offsets[job.index])
                    offsets[job.index] += len(d.content)
                    yield chunk(job.index, d.content, logprobs, d.finish_reason)
            self._count_usage(prep, states)
            if prep.include_usage:
                yield sse({**base, "choices": [], "usage": self._usage(prep, states)})
        except Exception as e:
            status, body = _stream_error(e)
            self.metrics.error(status)
            yield sse(body)
        finally:
            self._count_aborted(states)
        yield SSE_DONE


def _constraint(req) -> tuple[str, Any, str] | None:
    """(SamplingParams field, value, request parameter) of a request's structured output, if any."""
    found = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("json_schema", {"type": "object"}, "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format of type 'json_schema' needs json_schema.schema (a JSON schema object)",
                              param="response_format")
        found.append(("json_schema", fmt.json_schema.schema_, "response_format"))
    if req.guided_json is not None:
        found.append(("json_schema", req.guided_json, "guided_json"))
    if req.guided_regex is not None:
        found.append(("regex", req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        found.append(("choice", list(req.guided_choice), "guided_choice"))
    if len(found) > 1:
        raise bad_request(f"only one of response_format (json), guided_json, guided_regex and guided_choice may be "
                          f"given; got {', '.join(f[2] for f in found)}", param=found[1][2])
    return found[0] if found else None


def _stream_error(e: Exception) -> tuple[int, dict]:
    """(status, OpenAI error body) of an error that ends a stream after its 200 was sent."""
    if isinstance(e, APIError):
        return e.status, e.body()
    if isinstance(e, EngineDeadError):
        e = engine_unavailable(e)
        return e.status, e.body()
    if isinstance(e, ValueError):
        return 400, error_body(400, str(e))
    return 500, error_body(500, f"Internal error during generation: {type(e).__name__}: {e}")


def _max_token_bytes(tokenizer) -> int | None:
    """An upper bound on the bytes of text one token stands for: the longest single-token text
    (special tokens included) + 1 (decoders that drop a leading space). None when the tokenizer
    normalizes text (then input bytes and token bytes need not correspond)."""
    try:
        backend = tokenizer.backend
        if backend.normalizer is not None:
            return None
        size = backend.get_vocab_size(with_added_tokens=True)
        texts = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    except Exception:  # a tokenizer without these: no size shortcut, tokenizing still bounds the work
        return None
    return max(len(t.encode("utf-8", "surrogatepass")) for t in texts) + 1
