"""The pythonic tool-call parser (fastlfm.server.tool_calls), against hand-written expectations.

Streaming is checked as a property: any split of the text into deltas gives the same
content and calls as parsing the whole text at once.
"""

from __future__ import annotations

import json
import random

import pytest

from fastlfm.server.tool_calls import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    StreamingToolCallParser,
    format_tool_calls,
    parse_call_list,
    parse_tool_calls,
)

S, E = TOOL_CALL_START, TOOL_CALL_END


def calls_as_data(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_single_call_with_every_literal_kind():
    text = (S + '[get_weather(city="Paris", days=3, hourly=True, units=None, ratio=-0.5, '
            "tags=['a', \"b\"], opts={'x': 1, 2: [1, 2]}, pair=(1, 2), t=true, f=false, n=null)]" + E)
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert calls_as_data(calls) == [("get_weather", {
        "city": "Paris", "days": 3, "hourly": True, "units": None, "ratio": -0.5, "tags": ["a", "b"],
        "opts": {"x": 1, "2": [1, 2]}, "pair": [1, 2], "t": True, "f": False, "n": None})]
    # Arguments are a JSON object string, as OpenAI sends them.
    assert isinstance(calls[0].arguments, str) and calls[0].arguments.startswith("{")
    assert calls[0].id.startswith("call_") and len(calls[0].id) > 10


def test_several_calls_text_around_and_several_blocks():
    text = f"Let me check. {S}[a(x=1), ns.b(y='é\\n')]{E} and then {S}[c()]{E} done."
    content, calls = parse_tool_calls(text)
    assert content == "Let me check.  and then  done."
    assert calls_as_data(calls) == [("a", {"x": 1}), ("ns.b", {"y": "é\n"}), ("c", {})]
    assert len({c.id for c in calls}) == 3


def test_json_call_form_and_bare_call():
    content, calls = parse_tool_calls(f'{S}[{{"name": "f", "arguments": {{"q": "x", "k": true}}}}]{E}')
    assert content == "" and calls_as_data(calls) == [("f", {"q": "x", "k": True})]
    assert calls_as_data(parse_call_list('g(a="b")')) == [("g", {"a": "b"})]


@pytest.mark.parametrize("inner", [
    "[get_weather(city=",                      # syntax error
    "[get_weather('Paris')]",                  # positional argument: no parameter name
    "[f(x=y)]",                                # a bare name is not a literal
    "[f(x=g(1))]",                             # nested call is not a literal
    "[__import__('os').system('echo hacked')]",  # not a named function; must never run
    "[f(**kw)]",
    "[1, 2]",
    "[]",
    "[f(x=b'bytes')]",
    "[{'name': 3}]",
])
def test_malformed_block_is_kept_as_content(inner):
    text = f"before {S}{inner}{E} after"
    content, calls = parse_tool_calls(text)
    assert calls == []
    assert content == text
    with pytest.raises(ValueError):
        parse_call_list(inner)


def test_unterminated_block_is_content():
    text = f"x {S}[f(a=1)"
    assert parse_tool_calls(text) == (text, [])


def test_marker_lookalikes_are_content():
    text = "a <|tool_call_sta and <|tool x|> b"
    assert parse_tool_calls(text) == (text, [])


def _stream(text: str, cuts: list[int]):
    parser = StreamingToolCallParser()
    content, calls, pieces = [], [], []
    bounds = [0, *cuts, len(text)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        c, k = parser.feed(text[a:b])
        content.append(c)
        pieces.append(c)
        calls += k
    c, k = parser.finish()
    content.append(c)
    return "".join(content), calls, pieces


@pytest.mark.parametrize("text", [
    f"Sure. {S}[get_weather(city=\"Paris\")]{E} Anything else?",
    f"{S}[a(x=1)]{E}{S}[b(y=[1, 2])]{E}",
    f"plain text with < and <| but no call {S}[broken(]{E} tail",
    f"ends while in a call {S}[f(a=1)",
    "no calls at all",
])
def test_streaming_equals_whole_text_for_any_split(text):
    whole_content, whole_calls = parse_tool_calls(text)
    rng = random.Random(0)
    splits = [list(range(1, len(text)))]  # one character at a time
    splits += [sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6)))) for _ in range(20)]
    for cuts in splits:
        content, calls, _ = _stream(text, cuts)
        assert content == whole_content
        assert calls_as_data(calls) == calls_as_data(whole_calls)


def test_streaming_emits_content_before_a_call_immediately_and_holds_only_marker_prefixes():
    parser = StreamingToolCallParser()
    assert parser.feed("Hello <|tool") == ("Hello ", [])   # "<|tool" may start a marker
    assert parser.feed("box|> ok") == ("<|toolbox|> ok", [])  # it did not
    assert parser.feed(f" {S}[f(") == (" ", [])
    content, calls = parser.feed(f"a=1)]{E}!")
    assert content == "!" and calls_as_data(calls) == [("f", {"a": 1})]
    assert parser.finish() == ("", [])


def test_format_tool_calls_round_trips():
    openai_calls = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": json.dumps({"city": "Paris", "days": 2})}},
        {"id": "call_2", "type": "function", "function": {"name": "search",
                                                          "arguments": {"q": "x", "flags": [True, None]}}},
    ]
    text = format_tool_calls(openai_calls)
    assert text == f'{S}[get_weather(city="Paris", days=2), search(q="x", flags=[True, None])]{E}'
    _, calls = parse_tool_calls(text)
    assert calls_as_data(calls) == [("get_weather", {"city": "Paris", "days": 2}),
                                    ("search", {"q": "x", "flags": [True, None]})]
    with pytest.raises(ValueError, match="not valid JSON"):
        format_tool_calls([{"function": {"name": "f", "arguments": "{oops"}}])
