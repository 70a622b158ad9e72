"""LFM2 tool calls: parse the model's pythonic calls into OpenAI ``tool_calls``.

LFM2 writes calls as a Python list between two special tokens (spec §6.2)::

    <|tool_call_start|>[get_weather(city="Paris"), get_time(tz="CET")]<|tool_call_end|>

The list is parsed with :mod:`ast` (never evaluated): each element must be a call of a
(possibly dotted) name with keyword arguments whose values are literals (strings, numbers,
booleans, ``None``, lists, dicts; JSON's ``true``/``false``/``null`` are accepted too).  The
JSON form some system prompts ask for, ``[{"name": "f", "arguments": {...}}]``, is accepted
as well.  Anything else inside a call block is *malformed*: the block is returned as plain
content, text unchanged, so a confused model never turns into a server error.

:func:`parse_tool_calls` handles a finished text; :class:`StreamingToolCallParser` turns a
stream of text deltas into content deltas and complete tool calls, buffering only from
``<|tool_call_start|>`` to ``<|tool_call_end|>``.
"""

from __future__ import annotations

import ast
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TOOL_CALL_START",
    "TOOL_CALL_END",
    "ToolCall",
    "parse_call_list",
    "parse_tool_calls",
    "StreamingToolCallParser",
    "format_tool_calls",
]

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"

_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


@dataclass
class ToolCall:
    """One parsed call: ``arguments`` is a JSON object string, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class _Malformed(ValueError):
    pass


def _literal(node: ast.AST) -> Any:
    """The value of a literal expression node; JSON names are allowed, nothing is executed."""
    if isinstance(node, ast.Name):
        if node.id in _JSON_NAMES:
            return _JSON_NAMES[node.id]
        raise _Malformed(f"argument value {node.id!r} is a bare name, not a literal")
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):  # {**x}
            raise _Malformed("dict unpacking is not a literal")
        return {_json_key(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values)}
    try:
        value = ast.literal_eval(node)  # constants, negative numbers, complex-free arithmetic
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise _Malformed(f"argument value is not a literal: {ast.dump(node)[:80]}") from e
    if isinstance(value, (bytes, complex)) or value is Ellipsis:
        raise _Malformed(f"argument value {value!r} has no JSON form")
    return value


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (int, float, bool)) or key is None:
        return json.dumps(key)
    raise _Malformed(f"dict key {key!r} cannot be a JSON object key")


def _call_name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):  # namespaced tools such as functions.get_weather
        return f"{_call_name(func.value)}.{func.attr}"
    raise _Malformed("a call must name a function")


def _parse_element(node: ast.AST) -> ToolCall:
    if isinstance(node, ast.Call):
        if node.args:
            raise _Malformed("positional arguments cannot be mapped to parameter names")
        if any(kw.arg is None for kw in node.keywords):
            raise _Malformed("**kwargs unpacking is not a literal")
        arguments = {kw.arg: _literal(kw.value) for kw in node.keywords}
        return ToolCall(_call_name(node.func), json.dumps(arguments, ensure_ascii=False))
    if isinstance(node, ast.Dict):  # JSON form: {"name": ..., "arguments": {...}}
        obj = _literal(node)
        name, arguments = obj.get("name"), obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise _Malformed("a JSON call needs a string 'name' and an object 'arguments'")
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))
    raise _Malformed("a tool call must be f(key=value, ...)")


def parse_call_list(source: str) -> list[ToolCall]:
    """Parse the text between the call markers; raises ``ValueError`` when malformed."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise _Malformed(f"not a Python expression: {e}") from e
    body = tree.body
    elements = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    if not elements:
        raise _Malformed("empty call list")
    try:
        return [_parse_element(e) for e in elements]
    except RecursionError as e:  # absurdly nested literals
        raise _Malformed("argument nesting too deep") from e


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split a finished completion into (content, tool calls).

    Well-formed call blocks are removed from the content; malformed or unterminated ones
    stay in it verbatim.
    """
    parser = StreamingToolCallParser()
    content, calls = parser.feed(text)
    tail, more = parser.finish()
    return content + tail, calls + more


class StreamingToolCallParser:
    """Incremental version of :func:`parse_tool_calls` for text deltas.

    ``feed(delta)`` returns ``(content_delta, completed_calls)``. Content is held back only
    while it could be the beginning of ``<|tool_call_start|>`` or is inside a call block;
    ``finish()`` releases whatever is still held (an unterminated block becomes content).
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buffer += delta
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(TOOL_CALL_START)
                if start < 0:
                    keep = _partial_suffix(self._buffer, TOOL_CALL_START)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
                self._in_call = True
            end = self._buffer.find(TOOL_CALL_END)
            if end < 0:
                break
            block = self._buffer[: end + len(TOOL_CALL_END)]
            self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
            self._in_call = False
            try:
                calls.extend(parse_call_list(block[len(TOOL_CALL_START) : -len(TOOL_CALL_END)]))
            except ValueError:
                content.append(block)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, self._buffer, self._in_call = self._buffer, "", False
        return rest, []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _python_literal(value: Any) -> str:
    """Python source for a JSON value (``true`` -> ``True`` ...)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def format_tool_calls(tool_calls: list[dict[str, Any]]) -> str:
    """Render OpenAI ``tool_calls`` of an assistant message back into LFM2's pythonic form.

    Used for conversation history, so that earlier calls reach the model in the format it
    produces. ``arguments`` must be a JSON object string (or a dict).
    """
    rendered = []
    for i, call in enumerate(tool_calls):
        fn = call.get("function") or {}
        name, arguments = fn.get("name"), fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"tool_calls[{i}].function.arguments is not valid JSON: {e}") from e
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            raise ValueError(f"tool_calls[{i}] needs function.name and JSON-object function.arguments")
        args = ", ".join(f"{k}={_python_literal(v)}" for k, v in arguments.items())
        rendered.append(f"{name}({args})")
    return f"{TOOL_CALL_START}[{', '.join(rendered)}]{TOOL_CALL_END}"
