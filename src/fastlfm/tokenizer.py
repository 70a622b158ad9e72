"""Tokenizer layer: a thin wrapper over the ``tokenizers`` library plus chat templates.

``Tokenizer.from_pretrained(folder)`` reads a local Hugging Face checkpoint folder
(``tokenizer.json``, ``tokenizer_config.json``, optional ``chat_template.jinja``,
``additional_chat_templates/*.jinja`` and ``special_tokens_map.json``) and behaves like
``transformers.AutoTokenizer`` (5.x) for LFM2: same ids from ``encode``, same text from
``decode``, and ``apply_chat_template`` renders the checkpoint's Jinja template in the same
sandboxed environment (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a JSON
``tojson`` filter, ``raise_exception``, ``strftime_now``).

``TextStream`` is the one text stream of a generation: ids in, text deltas out, cut at stop
strings, never half of a multi-byte character, O(1) amortized work per token.

``transformers`` is never imported here.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["Tokenizer", "TextStream", "ChatTemplateError", "BatchEncoding", "render_chat_template"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# Named special-token attributes, in the order transformers lists them.
_STANDARD_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; templates read the first one.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


#: The Llama-3-style split regex of LFM2's pre-tokenizer (spec §6.1), used with behaviour "isolated".
LFM2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


class BatchEncoding(dict):
    """What transformers' tokenizers and processors return: `input_ids`, `attention_mask` (and a
    processor's image tensors) as a dict with attribute access and `.to(device)`, so it can be
    passed on as `generate(**inputs)` or `generate(inputs)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        """The tensors moved to `device` (other values as they are), as transformers does."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") and hasattr(v, "device") else v
                              for k, v in self.items()})


def is_conversation_batch(conversation: Any) -> bool:
    """A list of conversations (each a list of messages), as transformers tells them apart."""
    return isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0], (list, tuple))


class ChatTemplateError(ValueError):
    """Raised by a chat template's ``raise_exception(...)`` (also a ``ValueError``)."""


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _token_content(value: Any, where: str) -> str | None:
    """A special token from a config may be a string or a serialised AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a string or an AddedToken dict with 'content', got {value!r}")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Could not read {path}: {e}") from e


def _template_data(value: Any) -> Any:
    """Rebuild template inputs out of plain JSON-like types.

    Chat templates run in a sandbox, but rich objects (arrays, images, tensors) passed in
    messages still expose methods.  Everything the template sees is therefore converted to
    plain str/int/float/bool/None/dict/list/tuple; anything else becomes the inert
    placeholder ``"<TypeName>"`` (templates only test media keys for presence).
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_template_data(k): _template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_template_data(v) for v in value)
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":  # numpy scalar
        return _template_data(item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # pydantic model
        return _template_data(dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    """Expose a message's reasoning as both ``reasoning_content`` and ``thinking``."""
    reasoning = None
    for key in _REASONING_KEYS:
        if message.get(key) is not None:
            reasoning = message[key]
            break
    if reasoning is None:
        return message
    out = {"thinking": reasoning}
    out.update(message)
    out["reasoning_content"] = reasoning
    return out


def _normalise_messages(messages: Any) -> list[dict]:
    """Validate the conversation shape and convert it to plain data (None-valued keys dropped)."""
    if isinstance(messages, (str, bytes)) or isinstance(messages, Mapping) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of message dicts like {{'role': 'user', 'content': '...'}}, "
            f"got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("Cannot apply a chat template to an empty conversation: messages is empty")
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, (list, tuple)):
            raise ValueError(
                f"messages[{i}] is a list: pass one conversation (a list of message dicts) or a batch of them "
                "(a list of conversations), not a mix"
            )
        if not isinstance(message, Mapping):
            if dataclasses.is_dataclass(message) or callable(getattr(message, "model_dump", None)):
                message = _template_data(message)
            else:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"messages[{i}] must have a string 'role' field, got {role!r}")
        out.append(_alias_reasoning(_template_data(message)))
    return out


def _normalise_tools(tools: Any) -> list | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or isinstance(tools, Mapping) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, (Mapping, str)):
            raise ValueError(
                f"tools[{i}] must be a JSON-schema dict (or a pre-formatted string), got {type(tool).__name__}"
            )
    return _template_data(list(tools))


# --------------------------------------------------------------------------------------
# Jinja environment
# --------------------------------------------------------------------------------------


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Unlike Jinja's built-in filter this does not HTML-escape, and keeps non-ASCII text as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict`` as seen by templates: callable and ``fromkeys``, nothing else."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class GenerationBlock(jinja2.ext.Extension):
        """Accepts ``{% generation %}...{% endgeneration %}`` and renders the body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

        def _passthrough(self, caller):
            return caller()

    def check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with an underscore")

    class SafeNamespace(Namespace):
        """``namespace()`` that refuses underscore-prefixed attribute names."""

        def __init__(*args, **kwargs):  # same calling convention as jinja2.utils.Namespace
            self, positional = args[0], args[1:]
            attrs = dict(*positional, **kwargs)
            for key in attrs:
                check_name(key)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check_name(name)
            Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = SafeNamespace
    return env.from_string(source)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any] | str] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    **template_vars: Any,
) -> str:
    """Render a Jinja chat template the way ``transformers`` does (single conversation).

    ``template_vars`` (e.g. ``bos_token``) become template variables.  With
    ``continue_final_message`` the text stops right after the final message's content
    (``True`` = the ``content`` field, or the name of another field), so the model continues it.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot be used together")
    chat = _normalise_messages(messages)
    tools_data = _normalise_tools(tools)
    if documents is not None:
        if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence) or not all(
            isinstance(d, Mapping) for d in documents
        ):
            raise ValueError("documents must be a list of dicts (e.g. with 'title' and 'text' keys)")
        documents = _template_data(list(documents))
    template_vars = _template_data(template_vars)

    final_text = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        last = chat[-1]
        final_text = last.get(field)
        if final_text is None:
            raise ValueError(f"continue_final_message is set but the final message has no {field!r} to continue")
        fields = [field]
        if field in _REASONING_KEYS:  # reasoning is present under several names: tag all copies
            fields = [k for k in _REASONING_KEYS if last.get(k) == final_text]
        if not any(f in template for f in fields):
            raise ValueError(f"continue_final_message is set to {field!r} but the chat template never uses that field")
        if isinstance(final_text, (list, tuple)):
            for part in reversed(final_text):
                if isinstance(part, dict) and "text" in part:
                    final_text = part["text"]
                    part["text"] = part["text"] + _CONTINUE_TAG
                    break
            else:
                raise ValueError("continue_final_message is set but the final message has no text part to continue")
        else:
            for f in fields:
                last[f] = last[f] + _CONTINUE_TAG

    compiled = _compile_template(template)
    rendered = compiled.render(
        messages=chat,
        tools=tools_data,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **template_vars,
    )

    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise ValueError(
                "continue_final_message is set but the final message does not appear in the rendered chat; "
                "the template may alter or drop it"
            )
        loc = rendered.rindex(tag)
        if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:loc]
        else:  # trailing whitespace of the message was trimmed by the template
            rendered = rendered[:loc].rstrip()
    return rendered


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


class Tokenizer:
    """A byte-level BPE tokenizer (``tokenizers`` backend) with the checkpoint's chat template.

    Build it with :meth:`from_pretrained`.  Encoding and decoding give the same ids and text as
    ``transformers.AutoTokenizer`` on the same files.
    """

    def __init__(
        self,
        backend: Any,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        extra_special_tokens: Iterable[str] = (),
        chat_template: str | dict[str, str] | None = None,
        model_max_length: int | None = None,
        name_or_path: str = "",
        added_tokens: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer``.

        ``special_tokens`` maps names (``bos_token``, ``eos_token``, ``pad_token``, ... and
        model-specific ones like ``image_token``) to token strings.  Tokens listed there, in
        ``extra_special_tokens`` or in ``added_tokens`` (AddedToken dicts) that the backend
        does not know are added to it, as transformers does.
        """
        from tokenizers import AddedToken

        self._backend = backend
        self._id_bytes: dict[int, bytes] = {}  # id_to_bytes, filled as ids come
        # Plain encode/decode never pads or truncates (transformers disables both by default).
        self._backend.no_truncation()
        self._backend.no_padding()
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.model_max_length = int(model_max_length) if model_max_length is not None else int(1e30)

        named: dict[str, str] = {}
        for key, value in (special_tokens or {}).items():
            if value is not None:
                named[key] = value
        self._named_special: dict[str, str] = named
        extras: list[str] = []
        for tok in extra_special_tokens:
            if tok not in extras:
                extras.append(tok)
        self._extra_special: list[str] = extras

        def known(content: str) -> bool:  # a lookup: get_vocab() builds a dict of the whole vocabulary (50 ms)
            return self._backend.token_to_id(content) is not None

        for entry in added_tokens:
            content = entry["content"]
            if known(content):
                continue
            tok = AddedToken(
                content,
                single_word=bool(entry.get("single_word", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", not entry.get("special", False))),
                special=bool(entry.get("special", False)),
            )
            self._backend.add_tokens([tok])
        missing = [t for t in [*named.values(), *extras] if not known(t)]
        if missing:
            self._backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )

        self.split_special_tokens = False
        # Batches are padded on the left: what decoder-only generation needs (transformers' default,
        # "right", makes generate() continue after the padding).
        self.padding_side = "left"

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a local folder holding ``tokenizer.json`` (+ ``tokenizer_config.json``,
        ``chat_template.jinja``, ``special_tokens_map.json`` when present)."""
        from tokenizers import Tokenizer as _Backend

        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"Tokenizer path {str(folder)!r} is not a local directory")
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ValueError(
                f"No {TOKENIZER_FILE} found in {str(folder)!r}: fastlfm needs the fast-tokenizer file "
                f"({TOKENIZER_FILE}) of the checkpoint"
            )
        try:
            backend = _Backend.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise ValueError(f"Could not load {tokenizer_file}: {e}") from e

        config: dict = {}
        config_file = folder / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            config = _read_json(config_file)
            if not isinstance(config, dict):
                raise ValueError(f"{config_file} must contain a JSON object")

        # Chat templates: files take priority over the `chat_template` key of the config.
        templates: dict[str, str] = {}
        template_file = folder / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            templates["default"] = template_file.read_text(encoding="utf-8")
        template_dir = folder / CHAT_TEMPLATE_DIR
        if template_dir.is_dir():
            for extra in sorted(template_dir.glob("*.jinja")):
                templates[extra.name[: -len(".jinja")]] = extra.read_text(encoding="utf-8")
        chat_template: str | dict[str, str] | None
        if templates:
            chat_template = templates["default"] if list(templates) == ["default"] else templates
        else:
            chat_template = cls._parse_config_template(config.get("chat_template"), config_file)

        # Named special tokens.
        special: dict[str, str | None] = {}
        for attr in _STANDARD_SPECIAL_ATTRS:
            if attr in config:
                special[attr] = _token_content(config[attr], f"{config_file}: {attr}")
        extra_cfg = config.get("extra_special_tokens") or None
        if extra_cfg is None:
            extra_cfg = config.get("additional_special_tokens") or None
        model_specific: dict[str, str] = {
            k: v
            for k, v in config.items()
            if k not in _STANDARD_SPECIAL_ATTRS and k.endswith("_token") and isinstance(v, str)
        }
        if isinstance(extra_cfg, Mapping):
            model_specific.update({k: _token_content(v, f"{config_file}: extra_special_tokens") for k, v in extra_cfg.items()})
            extra_cfg = None
        extras = [_token_content(t, f"{config_file}: extra_special_tokens") for t in (extra_cfg or [])]

        # Legacy special_tokens_map.json: used (and overrides the config) only when the config
        # has no `added_tokens_decoder`, matching transformers.
        map_file = folder / SPECIAL_TOKENS_MAP_FILE
        if "added_tokens_decoder" not in config and map_file.is_file():
            smap = _read_json(map_file)
            if not isinstance(smap, dict):
                raise ValueError(f"{map_file} must contain a JSON object")
            for key, value in smap.items():
                if key in _STANDARD_SPECIAL_ATTRS:
                    special[key] = _token_content(value, f"{map_file}: {key}")
                elif key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                    for tok in value:
                        content = _token_content(tok, f"{map_file}: {key}")
                        if content not in extras:
                            extras.append(content)
        special.update(model_specific)

        added_tokens = []
        decoder_cfg = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder_cfg, Mapping):
            raise ValueError(f"{config_file}: added_tokens_decoder must be an object")
        for idx in sorted(decoder_cfg, key=int):
            entry = decoder_cfg[idx]
            if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
                raise ValueError(f"{config_file}: added_tokens_decoder[{idx}] must be an AddedToken dict")
            added_tokens.append(entry)

        tok = cls(
            backend,
            special_tokens=special,
            extra_special_tokens=extras,
            chat_template=chat_template,
            model_max_length=config.get("model_max_length"),
            name_or_path=str(folder),
            added_tokens=added_tokens,
        )
        if config.get("split_special_tokens"):
            tok.split_special_tokens = True
            tok._backend.encode_special_tokens = True
        return tok

    @staticmethod
    def _parse_config_template(value: Any, config_file: Path) -> str | dict[str, str] | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
            out = {}
            for item in value:
                if not isinstance(item, Mapping) or "name" not in item or "template" not in item:
                    raise ValueError(f"{config_file}: chat_template list entries need 'name' and 'template'")
                out[item["name"]] = item["template"]
            return out
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"{config_file}: chat_template must be a string or a list of named templates")

    # ---------------------------------------------------------------- vocabulary
    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(AutoTokenizer)``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token`` or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of ``token_id`` (byte-level form) or None when out of range."""
        return self._backend.id_to_token(int(token_id))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Token strings of several ids."""
        return [self.id_to_token(i) for i in ids]

    # ---------------------------------------------------------------- special tokens
    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (bos_token, eos_token, pad_token, ... and model-specific names)."""
        return dict(self._named_special)

    def _named(self, name: str) -> str | None:
        return self._named_special.get(name)

    def _named_id(self, name: str) -> int | None:
        tok = self._named_special.get(name)
        return None if tok is None else self.token_to_id(tok)

    @property
    def bos_token(self) -> str | None:
        return self._named("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._named("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._named("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._named("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens then extra special tokens, without duplicates (as transformers)."""
        return list(dict.fromkeys([*self._named_special.values(), *self._extra_special]))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of :attr:`all_special_tokens`."""
        return [self.token_to_id(t) for t in self.all_special_tokens]

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (what ``skip_special_tokens`` drops)."""
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    @functools.cached_property
    def _byte_level_map(self):
        """The charmap codec table of the byte-level alphabet (None unless the decoder is ByteLevel)."""
        if type(self._backend.decoder).__name__ != "ByteLevel":
            return None
        alphabet = _byte_level_alphabet()
        return codecs.charmap_build("".join(sorted(alphabet, key=alphabet.__getitem__)))

    @property
    def is_byte_level(self) -> bool:
        """Whether every id decodes to fixed bytes (:meth:`id_to_bytes`): a ByteLevel decoder."""
        return self._byte_level_map is not None

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` decodes to, for byte-level tokenizers (b"" for an id outside the
        vocabulary); remembered per id, so a process's first text costs nothing up front.

        With a ByteLevel decoder, ``decode(ids)`` is the UTF-8 decoding (invalid sequences
        replaced) of the ids' bytes laid end to end, so text can be built byte by byte: a
        token string maps to bytes through the byte-level alphabet, or, when it has a character
        outside it (an added token), to its own UTF-8 bytes, as the decoder does.
        """
        known = self._id_bytes.get(token_id)
        if known is None:
            try:
                token = self._backend.id_to_token(token_id)  # None past the vocabulary
            except OverflowError:  # negative, or past what the backend's ids can hold
                token = None
            known = b"" if token is None else self._token_to_bytes(token)
            self._id_bytes[token_id] = known
        return known

    def _token_to_bytes(self, token: str) -> bytes:
        try:
            return codecs.charmap_encode(token, "strict", self._byte_level_map)[0]
        except UnicodeEncodeError:  # a character outside the alphabet (an added token): its own UTF-8
            return token.encode()

    @functools.cached_property
    def token_bytes(self) -> list[bytes] | None:
        """:meth:`id_to_bytes` of every id (None for tokenizers that are not byte-level), for
        callers that need the whole table."""
        if not self.is_byte_level:
            return None
        return [self.id_to_bytes(i) for i in range(self._backend.get_vocab_size(with_added_tokens=True))]

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode(..., add_special_tokens=True)`` puts the BOS token first."""
        bos = self.bos_token_id
        return bos is not None and self._backend.encode("", add_special_tokens=True).ids[:1] == [bos]

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the tokenizer.json post-processor
        adds its tokens (BOS for LFM2)."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self.encodings([text], add_special_tokens)[0].ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` for several texts (parallel in the backend)."""
        return [e.ids for e in self.encodings(list(texts), add_special_tokens)]

    def encodings(self, texts: list[str], add_special_tokens: bool = True) -> list[Any]:
        """The backend's Encoding of each text (`.ids`, `len()`), without character offsets where
        tokenizers can leave them out (`encode_batch_fast`: a 1k-token prompt in 2/3 of the time).
        The batch calls release the GIL while they tokenize (tokenizers' `encode` does not), so other
        threads (an engine, a server's event loop) run meanwhile."""
        fast = getattr(self._backend, "encode_batch_fast", None)
        if fast is not None:
            return fast(texts, add_special_tokens=add_special_tokens)
        return self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (an int, a list, or anything with ``tolist()`` such as a tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        elif not isinstance(ids, list):
            ids = list(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Any], skip_special_tokens: bool = False) -> list[str]:
        """``decode`` of each row (a (B, T) tensor or a list of id lists)."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences]

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, padding: bool | str = False,
                 return_tensors: str | None = None) -> BatchEncoding:
        """transformers' ``tokenizer(text)``: ``input_ids`` and ``attention_mask`` of one text or a batch
        (``padding=True`` pads on ``padding_side``; ``return_tensors="pt"`` gives tensors)."""
        batched = not isinstance(text, str)
        if batched and not (isinstance(text, Sequence) and all(isinstance(t, str) for t in text)):
            raise ValueError(f"text must be a str or a list of str, got {type(text).__name__}")
        rows = self.encode_batch(list(text), add_special_tokens) if batched else [self.encode(text, add_special_tokens)]
        return self.pad_rows(rows, batched, padding, return_tensors)

    def pad_rows(self, rows: list[list[int]], batched: bool = True, padding: bool | str = False,
                 return_tensors: str | None = None) -> BatchEncoding:
        """Token id rows as transformers returns them: padded on ``padding_side`` with the pad id when
        ``padding`` (True / "longest"), as (B, T) tensors with ``return_tensors="pt"`` (rows of
        different lengths need padding), one unbatched row as a flat list."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (fastlfm returns torch tensors: 'pt')")
        if padding not in (False, None, True, "longest", "do_not_pad"):
            raise ValueError(f"padding={padding!r} is not supported (True / 'longest' or False)")
        if not rows:
            raise ValueError("nothing to tokenize: the batch is empty")
        width = max(map(len, rows))
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest") and any(len(r) < width for r in rows):
            if self.pad_token_id is None:
                raise ValueError(f"{self.name_or_path or 'this tokenizer'} has no pad token, so it cannot pad a batch")
            if self.padding_side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
            left = self.padding_side == "left"
            fill = [[self.pad_token_id] * (width - len(r)) for r in rows]
            zeros = [[0] * (width - len(r)) for r in rows]
            rows = [f + r if left else r + f for f, r in zip(fill, rows)]
            masks = [z + m if left else m + z for z, m in zip(zeros, masks)]
        if return_tensors == "pt":
            import torch

            if any(len(r) != width for r in rows):
                raise ValueError(f"rows of different lengths {sorted(set(map(len, rows)))} cannot be one tensor: "
                                 "pass padding=True")
            return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                                 attention_mask=torch.tensor(masks, dtype=torch.long))
        if not batched:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    # ---------------------------------------------------------------- chat template
    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        """The template source to use: ``chat_template`` (a template or the name of one of the
        checkpoint's templates), else the checkpoint's default (``tool_use`` when tools are given
        and such a named template exists)."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None and chat_template in own:
                return own[chat_template]
            if chat_template is not None:
                return chat_template
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ValueError(
                f"{self.name_or_path or 'This tokenizer'} has several chat templates and none named 'default'; "
                f"pass chat_template= one of {sorted(own)}"
            )
        if chat_template is not None:
            return chat_template
        if own is None:
            where = self.name_or_path or "this tokenizer"
            raise ValueError(
                f"No chat template available for {where}: neither {CHAT_TEMPLATE_FILE} nor a 'chat_template' "
                f"field in {TOKENIZER_CONFIG_FILE} was found; pass chat_template= explicitly"
            )
        return own

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any] | str] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        *,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool | str = False,
        return_tensors: str | None = None,
        return_dict: bool = False,
        padding: bool | str = False,
        **extra_template_vars: Any,
    ) -> Any:
        """Render ``messages`` with the chat template; return ids (``tokenize=True``) or text.

        As transformers 4.57: a list of conversations renders each (a batch); ``return_tensors="pt"``
        gives a (B, T) tensor (``padding=True`` pads a batch on ``padding_side``, left by default),
        ``return_dict=True`` a `BatchEncoding` of ``input_ids`` and ``attention_mask``.

        The named special tokens (``bos_token`` ...) are template variables, overridden by
        ``extra_template_vars``.  Tokenising the rendered text adds no special tokens (the
        template already contains BOS).
        """
        template = self.get_chat_template(chat_template, tools)
        template_vars = {**self.special_tokens_map, **extra_template_vars}
        batched = is_conversation_batch(messages)
        texts = [
            render_chat_template(
                template,
                conversation,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **template_vars,
            )
            for conversation in (messages if batched else [messages])
        ]
        if not tokenize:
            return texts if batched else texts[0]
        rows = [self.encode(text, add_special_tokens=False) for text in texts]
        if return_tensors is None and not return_dict and not padding:
            return rows if batched else rows[0]
        encoded = self.pad_rows(rows, batched, padding, return_tensors)
        return encoded if return_dict else encoded["input_ids"]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})"
        )


# --------------------------------------------------------------------------------------
# The text stream: generated ids -> text deltas, cut at stop strings
# --------------------------------------------------------------------------------------


class TextStream:
    """The text of one generation, built token by token: incremental detokenization, stop
    strings and held-back text, in O(1) amortized work per token for any id sequence.

    ``add(id)`` returns the text that is final now: it never ends inside a multi-byte
    character, and never in a prefix of a stop string that may still complete (that tail is
    held back). When a stop string completes, ``stopped`` becomes true and the text ends right
    before it. ``finish()`` releases what is held back at the end of generation (a character
    whose bytes never all arrived comes out as U+FFFD). The deltas concatenate to
    ``tokenizer.decode(ids, skip_special_tokens=...)`` cut before the first stop string.

    Byte-level tokenizers (LFM2's): each id maps to fixed bytes (``Tokenizer.id_to_bytes``) and
    Python's incremental UTF-8 decoder turns the byte stream into text. tokenizers' own
    ``DecodeStream`` does not fit here: while its text ends in U+FFFD it re-decodes a window
    that grows by one id per step, so a run of ids that never completes a character (lone
    continuation bytes from a random model, or forced by ``logit_bias``) costs O(k) per token and
    O(k^2) in all. Other tokenizers (no byte table) go through ``DecodeStream``.

    ``skip_special_tokens`` drops special tokens from the text, except those in ``keep_token_ids``
    (e.g. the tool-call markers a server parses).
    """

    def __init__(self, tokenizer: "Tokenizer", stop_strings: Sequence[str] = (), skip_special_tokens: bool = True,
                 keep_token_ids: Iterable[int] = ()) -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self._max_held = max((len(s) - 1 for s in self.stop_strings), default=0)
        self._skip = tokenizer.special_token_ids - frozenset(keep_token_ids) if skip_special_tokens else frozenset()
        self._id_to_bytes = tokenizer.id_to_bytes if tokenizer.is_byte_level else None
        if self._id_to_bytes is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            from tokenizers.decoders import DecodeStream

            self._backend = tokenizer.backend
            self._stream = DecodeStream(skip_special_tokens=False)  # skipped ids are filtered here
            self._recent: list[int] = []  # ids since the stream last produced text (for finish)
            self._decode = tokenizer.decode
        self.stopped = False
        self._held = ""
        self._parts: list[str] = []
        self._num_chars = 0
        self._joined: str | None = ""

    # ------------------------------------------------------------------ input
    def add(self, token_id: int) -> str:
        """Append one generated id; return the newly released text (possibly "")."""
        if self.stopped or token_id in self._skip:
            return ""
        if self._id_to_bytes is not None:
            piece = self._utf8.decode(self._id_to_bytes(token_id))
        else:
            piece = self._stream.step(self._backend, token_id)
            if piece is None:
                self._recent.append(token_id)
                return ""
            self._recent = [token_id]
        return self._release(piece, final=False) if piece else ""

    def finish(self) -> str:
        """End of generation: release the held-back text and any incomplete character."""
        if self.stopped:
            return ""
        if self._id_to_bytes is not None:
            tail = self._utf8.decode(b"", final=True)
        else:  # the ids DecodeStream still waits on, decoded after their context id
            tail = ""
            if len(self._recent) > 1:
                context = self._decode(self._recent[:1])
                tail = self._decode(self._recent)[len(context):]
            self._recent = []
        return self._release(tail, final=True)

    # ------------------------------------------------------------------ output
    @property
    def text(self) -> str:
        """All text released so far (joined on demand: read it at the end, not per token)."""
        if self._joined is None:
            self._joined = "".join(self._parts)
            self._parts = [self._joined]
        return self._joined

    @property
    def num_chars(self) -> int:
        return self._num_chars

    def _release(self, piece: str, final: bool) -> str:
        pending = self._held + piece
        if self.stop_strings:
            # Released text never ends in a stop-string prefix, so any match starts in `pending`.
            cut = min((i for i in (pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                out, self._held = pending[:cut], ""
            elif final:
                out, self._held = pending, ""
            else:
                keep = self._partial_stop_suffix(pending)
                out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep:]
        else:
            out = pending
        if out:
            self._parts.append(out)
            self._num_chars += len(out)
            self._joined = None
        return out

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: the printable character that stands for each byte 0-255
    (printable Latin-1 bytes stand for themselves, the others are shifted past U+0100)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}
