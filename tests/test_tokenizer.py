"""Tokenizer tests: fastlfm.tokenizer against transformers' AutoTokenizer on the same files."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from fastlfm.testing.tokenizer_files import (
    CHAT_TEMPLATE,
    SPECIAL_TOKEN_IDS,
    SPECIAL_TOKENS,
    write_tokenizer_files,
)
from fastlfm.tokenizer import ChatTemplateError, TextStream, Tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

FFFD = "\ufffd"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's a test, isn't it? We'll SEE'S.",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\nand  \n  mixed \r\n whitespace runs      end",
    "Digits: 1 12 123 1234 12345 1234567890 3.14159 -0.5e-10 2024-01-15",
    "Émojis 😀🤖🚀 and family 👨‍👩‍👧 and flags 🇫🇷🇯🇵 and skin 👍🏽",
    "中文测试：你好，世界！机器学习。日本語のテキスト。한국어 텍스트.",
    "Привет мир! Γειά σου κόσμε. مرحبا بالعالم",
    'def f(x: int) -> int:\n    """doc"""\n    return {"a": [1, 2, 3]}[x] ** 2  # comment\n',
    "#include <stdio.h>\nint main() { printf(\"%d\\n\", 42); }",
    "rare chars: \u0000\u0001\u007f \u200b zero-width \ufeff bom ◌̈ combining",
    "mixed<|im_start|>user\nhi<|im_end|>\n<image><|img_row_3_col_7|>trailing",
    "<|startoftext|><|pad|>",
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lfm2_tokenizer")
    write_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def hf(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def hf_chat_ids(hf, messages, **kwargs):
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


# ------------------------------------------------------------------------------------------
# Fixture files
# ------------------------------------------------------------------------------------------


def test_special_tokens_at_real_ids(tok, hf):
    assert len(tok) == tok.vocab_size == len(hf) == 1024
    for content, idx in SPECIAL_TOKEN_IDS.items():
        assert tok.token_to_id(content) == idx
        assert tok.id_to_token(idx) == content
        assert hf.convert_tokens_to_ids(content) == idx
    assert tok.token_to_id("<|reserved_14|>") == 14
    assert tok.token_to_id("<|reserved_395|>") == 395
    assert tok.token_to_id("<image>") == 396
    for r in range(1, 11):
        for c in range(1, 11):
            assert tok.token_to_id(f"<|img_row_{r}_col_{c}|>") == 397 + 10 * (r - 1) + (c - 1)
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 7)
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 0)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 7, 0)
    assert tok.all_special_ids == list(hf.all_special_ids)
    assert tok.all_special_tokens == list(hf.all_special_tokens)
    assert tok.special_tokens_map == hf.special_tokens_map
    assert tok.add_bos_token


def test_fixture_files_look_like_lfm2(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE"
    pre = data["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    split, byte_level = pre["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated" and not split["invert"]
    assert byte_level["type"] == "ByteLevel"
    assert byte_level["add_prefix_space"] is False and byte_level["use_regex"] is False
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["post_processor"]["type"] == "TemplateProcessing"
    assert [t["id"] for t in data["added_tokens"]] == list(range(500))
    assert all(t["special"] for t in data["added_tokens"])
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] == "<|startoftext|>" and cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|pad|>"
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()} == dict(enumerate(SPECIAL_TOKENS))
    smap = json.loads((tok_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert smap["eos_token"]["content"] == "<|im_end|>"
    assert (tok_dir / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE


def test_pre_tokenizer_groups_digits_by_three(tok):
    ids = tok.encode("1234567890 x", add_special_tokens=False)
    digit_pieces = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert "".join(digit_pieces) == "1234567890"
    assert all(len(p) <= 3 for p in digit_pieces)
    # The learned vocabulary is real: common words are single tokens.
    assert len(tok.encode(" the", add_special_tokens=False)) == 1


def test_fixture_is_deterministic_and_sized(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_tokenizer_files(a)
    # Train again in a fresh process (the in-process result is cached), with another hash seed.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    code = "import sys; from fastlfm.testing.tokenizer_files import write_tokenizer_files as w; w(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(b)], check=True, env=env)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    write_tokenizer_files(c, vocab_size=2048)
    big = Tokenizer.from_pretrained(c)
    assert big.vocab_size == 2048 == len(AutoTokenizer.from_pretrained(str(c)))
    assert big.token_to_id("<|image_end|>") == 499
    with pytest.raises(ValueError):
        write_tokenizer_files(tmp_path / "d", vocab_size=1000)


# ------------------------------------------------------------------------------------------
# encode / decode
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf, text, add_special_tokens):
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    assert ids == hf.encode(text, add_special_tokens=add_special_tokens)
    if add_special_tokens:
        assert ids[0] == 1 and ids.count(1) == 1 + text.count("<|startoftext|>")
    else:
        assert ids.count(1) == text.count("<|startoftext|>")


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tok, hf, text, skip_special_tokens):
    ids = tok.encode(text)
    out = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert out == hf.decode(ids, skip_special_tokens=skip_special_tokens)
    if not skip_special_tokens:
        assert out == "<|startoftext|>" + text  # byte-level BPE is lossless
    else:
        assert "<|" not in out


def test_special_tokens_in_text_are_single_ids(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n<image>", add_special_tokens=False)
    assert ids[0] == 6 and 7 in ids and ids[-1] == 396


def test_decode_random_ids_matches_transformers(tok, hf):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(7) == hf.decode(7) == "<|im_end|>"


def test_no_post_processor_follows_transformers(tmp_path, tok_dir):
    # transformers 5.x ignores add_bos_token when tokenizer.json exists: the post-processor decides.
    folder = tmp_path / "nopp"
    shutil.copytree(tok_dir, folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    ours, theirs = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.encode("hello there") == theirs.encode("hello there")
    assert ours.encode("hello there")[0] != 1
    assert not ours.add_bos_token


# ------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — température, précipitations",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "City, e.g. Paris"}},
            "required": ["location"],
        },
    },
}
SEARCH_TOOL = {
    "name": "search",
    "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "k": {"type": "integer"}}},
}

CONVERSATIONS = {
    "plain_user": ([{"role": "user", "content": "Hi"}], None),
    "multi_turn": (
        [
            {"role": "system", "content": "You are a helpful assistant trained by Liquid AI."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And in 中文? 😀"},
        ],
        None,
    ),
    "tools_with_system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
        [WEATHER_TOOL, SEARCH_TOOL],
    ),
    "tools_without_system": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL]),
    "tool_response": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": '<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|>Checking.',
            },
            {"role": "tool", "content": '{"temperature": 21, "unit": "C"}'},
            {"role": "tool", "content": {"temperature": 21, "sky": "ensoleillé"}},
        ],
        [WEATHER_TOOL],
    ),
    "content_parts": (
        [
            {"role": "system", "content": "You are a helpful multimodal assistant by Liquid AI."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image"}]},
        ],
        None,
    ),
    "empty_system": ([{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], None),
    "none_content_dropped": (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": None}],
        None,
    ),
    "non_string_content": ([{"role": "user", "content": {"a": [1, 2.5, None, True], "b": "ü"}}], None),
}


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tok, hf, case, add_generation_prompt):
    messages, tools = CONVERSATIONS[case]
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert isinstance(text, str)
    assert text == hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert ids == hf_chat_ids(hf, messages, tools=tools, add_generation_prompt=add_generation_prompt)
    # BOS exactly once (not re-added when tokenising the rendered text), generation prompt last.
    assert ids[0] == 1 and ids.count(1) == 1
    assert text.startswith("<|startoftext|>")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert ids == tok.encode(text, add_special_tokens=False)


def test_chat_template_follows_spec_rules(tok):
    # Independent of transformers: the exact text the LFM2 rules (spec §6.2) produce.
    msgs = [{"role": "system", "content": "You are…"}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
        "<|startoftext|><|im_start|>system\nYou are…<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tool = {"name": "f", "parameters": {"x": "é"}}
    assert tok.apply_chat_template(msgs, tools=[tool, '{"name": "g"}'], tokenize=False) == (
        "<|startoftext|><|im_start|>system\nYou are…\nList of tools: <|tool_list_start|>"
        '[{"name": "f", "parameters": {"x": "é"}}, {"name": "g"}]<|tool_list_end|><|im_end|>\n'
        "<|im_start|>user\nHi<|im_end|>\n"
    )
    assert tok.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "tool", "content": [1, 2]}], tokenize=False
    ) == (
        "<|startoftext|><|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>tool\n<|tool_response_start|>[1, 2]<|tool_response_end|><|im_end|>\n"
    )
    assert tok.apply_chat_template(
        [{"role": "system", "content": ""}, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
        tokenize=False,
    ) == "<|startoftext|><|im_start|>user\n<image>?<|im_end|>\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids[:3] == [1, 6, tok.encode("user", add_special_tokens=False)[0]]
    suffix = [6] + tok.encode("assistant\n", add_special_tokens=False)
    assert ids[-len(suffix) :] == suffix


CUSTOM_TEMPLATE = """\
{%- set ns = namespace(n=0) -%}
{{ bos_token }}[{{ greeting }}]
{% for m in messages %}
    {%- if m.role == 'skip' %}{% continue %}{% endif -%}
    {%- if m.role == 'stop' %}{% break %}{% endif -%}
    {%- set ns.n = ns.n + 1 -%}
    <{{ m.role }}:{{ m | length }}:{{ m.reasoning_content }}:{{ m.thinking }}>{{ m.content | tojson(indent=2) }}{{ m.content | tojson(separators=(',', ':')) }}
{% endfor %}
n={{ ns.n }} d={{ dict(a=1) | tojson }} year={{ strftime_now('%Y') | length }} eos={{ eos_token }} pad={{ pad_token }}
{% generation %}gen{% endgeneration %}
{%- if add_generation_prompt %}GO{% endif %}"""


def test_custom_template_environment_matches_transformers(tok, hf):
    msgs = [
        {"role": "user", "content": {"k": ["é", 1]}, "name": None},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "a", "reasoning": "because"},
        {"role": "assistant", "content": "ü<>&"},
        {"role": "stop", "content": "y"},
        {"role": "user", "content": "never"},
    ]
    kwargs = dict(chat_template=CUSTOM_TEMPLATE, add_generation_prompt=True, greeting="héllo")
    ours = tok.apply_chat_template(msgs, tokenize=False, **kwargs)
    assert ours == hf.apply_chat_template(msgs, tokenize=False, **kwargs)
    assert "héllo" in ours and "never" not in ours and "n=3" in ours and "<user:2::>" in ours
    assert "<assistant:5:because:because>" in ours and "ü<>&" in ours and "GO" in ours
    assert tok.apply_chat_template(msgs, **kwargs) == hf_chat_ids(hf, msgs, **kwargs)
    # Template variables override the special tokens.
    assert tok.apply_chat_template(msgs, tokenize=False, bos_token="BOS!", **kwargs).startswith("BOS![")


def test_raise_exception_in_template(tok, hf):
    template = "{{ raise_exception('Only user and assistant roles are supported!') }}"
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="Only user and assistant"):
        tok.apply_chat_template(msgs, chat_template=template)
    with pytest.raises(ValueError):
        tok.apply_chat_template(msgs, chat_template=template)
    with pytest.raises(Exception, match="Only user and assistant"):
        hf.apply_chat_template(msgs, chat_template=template)
    with pytest.raises(ValueError, match="Unsupported content part type"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_sandbox_blocks_unsafe_access(tok):
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(
            [{"role": "user", "content": "x"}], chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}"
        )


def test_continue_final_message_matches_transformers(tok, hf):
    msgs = [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Autumn moonlight —"}]
    ours = tok.apply_chat_template(msgs, continue_final_message=True, tokenize=False)
    assert ours == hf.apply_chat_template(msgs, continue_final_message=True, tokenize=False)
    assert ours.endswith("<|im_start|>assistant\nAutumn moonlight —")
    assert tok.apply_chat_template(msgs, continue_final_message=True) == hf_chat_ids(
        hf, msgs, continue_final_message=True
    )
    with pytest.raises(ValueError):
        tok.apply_chat_template(msgs, continue_final_message=True, add_generation_prompt=True)


def test_chat_template_file_takes_precedence(tmp_path, tok_dir):
    folder = tmp_path / "prec"
    shutil.copytree(tok_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = "CONFIG{% for m in messages %}{{ m.content }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    msgs = [{"role": "user", "content": "hi"}]
    ours = Tokenizer.from_pretrained(folder).apply_chat_template(msgs, tokenize=False)
    assert ours == AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(msgs, tokenize=False)
    assert ours.startswith("<|startoftext|><|im_start|>user")
    (folder / "chat_template.jinja").unlink()
    ours = Tokenizer.from_pretrained(folder).apply_chat_template(msgs, tokenize=False)
    assert ours == AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(msgs, tokenize=False) == "CONFIGhi"


def test_named_templates(tmp_path, tok_dir):
    folder = tmp_path / "named"
    shutil.copytree(tok_dir, folder)
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    ours, theirs = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(str(folder))
    msgs = [{"role": "user", "content": "x"}]
    for kwargs in ({}, {"tools": [SEARCH_TOOL]}, {"chat_template": "default"}):
        assert ours.apply_chat_template(msgs, tokenize=False, **kwargs) == theirs.apply_chat_template(
            msgs, tokenize=False, **kwargs
        )
    assert ours.apply_chat_template(msgs, tokenize=False, tools=[SEARCH_TOOL]) == "T1"


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path, tok_dir):
    folder = tmp_path / "no_json"
    shutil.copytree(tok_dir, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="not a local directory"):
        Tokenizer.from_pretrained(tmp_path / "does_not_exist")


def test_no_chat_template(tmp_path, tok_dir):
    folder = tmp_path / "no_template"
    shutil.copytree(tok_dir, folder)
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    t = Tokenizer.from_pretrained(folder)
    assert t.chat_template is None
    with pytest.raises(ValueError, match="No chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])
    # An explicit template still works.
    assert t.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=CHAT_TEMPLATE) == (
        Tokenizer.from_pretrained(tok_dir).apply_chat_template([{"role": "user", "content": "hi"}])
    )


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "list of message dicts"),
        ({"role": "user", "content": "hi"}, "list of message dicts"),
        ([], "empty"),
        (["hi"], r"messages\[0\]"),
        ([{"role": "user", "content": "a"}, {"content": "no role"}], r"messages\[1\].*role"),
        ([{"role": 3, "content": "a"}], "role"),
        ([{"role": "user", "content": "a"}, [{"role": "user", "content": "b"}]], r"messages\[1\] is a list.*not a mix"),
        ([[{"role": "user", "content": "a"}], "hi"], "list of message dicts"),  # a batch with a bad conversation
    ],
)
def test_bad_message_shapes(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_bad_tools(tok):
    with pytest.raises(ValueError, match="tools"):
        tok.apply_chat_template([{"role": "user", "content": "a"}], tools=[42])
    with pytest.raises(ValueError, match="tools"):
        tok.apply_chat_template([{"role": "user", "content": "a"}], tools={"name": "f"})


# ------------------------------------------------------------------------------------------
# Incremental detokenization
# ------------------------------------------------------------------------------------------

STREAM_TEXTS = [
    "héllo 你好世界 😀👍🏽 ok",
    "日本語のテキストと中文混合 🤖🚀🇫🇷 family 👨‍👩‍👧 end",
    "plain ascii only, nothing special 123456",
    "Привет, мир! ∑∫√∞ ≈ ≠ → 한국어",
]


def _contains_split_character(tok, ids):
    return any(FFFD in tok.decode([i]) for i in ids)


def stream_all(stream, ids):
    deltas = [stream.add(i) for i in ids]
    return deltas + [stream.finish()]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_text_stream_one_id_at_a_time(tok, text, skip_special_tokens):
    ids = tok.encode(text) + [7]
    if text != STREAM_TEXTS[2]:
        assert _contains_split_character(tok, ids), "test text should split characters across tokens"
    stream = TextStream(tok, skip_special_tokens=skip_special_tokens)
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    deltas = []
    for i in ids:
        delta = stream.add(i)
        assert FFFD not in delta
        deltas.append(delta)
        assert stream.text == "".join(deltas) and full.startswith(stream.text)  # never taken back
    assert stream.finish() == ""
    assert "".join(deltas) == full == stream.text
    assert stream.text == (text if skip_special_tokens else "<|startoftext|>" + text + "<|im_end|>")


def test_text_stream_equals_decode_for_any_ids(tok):
    """Random ids, special and byte tokens included: the deltas add up to tokenizer.decode."""
    rng = random.Random(3)
    bytes_only = [i for i, b in enumerate(tok.token_bytes) if len(b) == 1]
    assert len(bytes_only) >= 256  # every byte has a token of its own, as in LFM2's vocabulary
    for trial in range(300):
        pool = bytes_only if trial % 2 else range(tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 60))]
        for skip in (True, False):
            assert "".join(stream_all(TextStream(tok, skip_special_tokens=skip), ids)) == \
                tok.decode(ids, skip_special_tokens=skip)


def test_token_bytes_are_what_the_decoder_makes_of_each_token(tok):
    """Oracle: tokenizers' own ByteLevel decoder. A token whose bytes are whole UTF-8 characters
    decodes to exactly them; one that is not (a partial character) decodes to replacement text;
    added tokens are their own UTF-8."""
    table, whole = tok.token_bytes, 0
    assert len(table) == tok._backend.get_vocab_size(with_added_tokens=True)
    for i, b in enumerate(table):
        text = tok.decode([i])
        try:
            assert b.decode() == text, (i, b, text)
            whole += 1
        except UnicodeDecodeError:
            assert "\ufffd" in text, (i, b, text)
    assert whole > len(table) // 2


def test_id_to_bytes_is_the_table_and_empty_outside_the_vocabulary(tok_dir):
    """The per-id lookup the text stream uses equals the whole table (oracle above: the decoder),
    for an added token outside the byte-level alphabet too (its own UTF-8), and is b"" for ids the
    vocabulary does not have."""
    fresh = Tokenizer.from_pretrained(tok_dir)
    fresh._backend.add_tokens(["héllo wörld ✓"])  # space, Latin-1 and a symbol: not byte-level characters
    added = fresh._backend.token_to_id("héllo wörld ✓")
    table = fresh.token_bytes
    assert table[added] == "héllo wörld ✓".encode() and fresh.decode([added]) == "héllo wörld ✓"
    lookup = Tokenizer.from_pretrained(tok_dir)
    lookup._backend.add_tokens(["héllo wörld ✓"])
    assert [lookup.id_to_bytes(i) for i in reversed(range(len(table)))][::-1] == table
    assert lookup.id_to_bytes(-1) == lookup.id_to_bytes(len(table)) == lookup.id_to_bytes(10**12) == b""


def _byte_token(tok, value: int) -> int:
    return next(i for i, b in enumerate(tok.token_bytes) if b == bytes([value]))


@pytest.mark.parametrize("byte", [0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xFF])
def test_text_stream_runs_that_never_complete_a_character(tok, byte):
    """Lone continuation bytes, lead bytes with no continuation, and bytes never valid in
    UTF-8: each comes out as U+FFFD exactly as decode() gives it, in a bounded delay."""
    ids = [_byte_token(tok, byte)] * 200 + tok.encode("ok", add_special_tokens=False)
    stream = TextStream(tok)
    deltas = stream_all(stream, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert "".join(deltas[:100]).count(FFFD) >= 95  # released as it goes, not held for ever


def test_text_stream_emoji_split_over_tokens(tok):
    """A 4-byte emoji whose bytes come one token each: nothing until the last byte."""
    emoji = "\U0001F916"
    ids = [_byte_token(tok, b) for b in emoji.encode()]
    stream = TextStream(tok)
    assert [stream.add(i) for i in ids] == ["", "", "", emoji]
    # cut after three bytes: the end of generation releases the incomplete character
    stream = TextStream(tok)
    assert [stream.add(i) for i in ids[:3]] == ["", "", ""]
    assert stream.finish() == FFFD == tok.decode(ids[:3])


def test_text_stream_special_tokens_and_kept_ones(tok):
    ids = tok.encode("hi", add_special_tokens=False)
    start, end = tok.token_to_id("<|tool_call_start|>"), tok.token_to_id("<|tool_call_end|>")
    seq = [6, *ids, start, *ids, end, 7]  # <|im_start|> hi <|tool_call_start|> hi <|tool_call_end|> <|im_end|>
    assert "".join(stream_all(TextStream(tok), seq)) == "hihi"
    assert "".join(stream_all(TextStream(tok, skip_special_tokens=False), seq)) == tok.decode(seq)
    kept = TextStream(tok, keep_token_ids=[start, end])
    assert "".join(stream_all(kept, seq)) == "hi<|tool_call_start|>hi<|tool_call_end|>"


def test_text_stream_stop_string_spanning_tokens(tok):
    text = "The quick brown fox jumps over the lazy dog"
    ids = tok.encode(text, add_special_tokens=False)
    stop = "fox jum"
    stream = TextStream(tok, stop_strings=[stop, "never there"])
    deltas = []
    for n, i in enumerate(ids, 1):
        deltas.append(stream.add(i))
        if stream.stopped:
            break
    assert stream.stopped and stream.text == text[:text.find(stop)] == "".join(deltas)
    assert stop in tok.decode(ids[:n]) and stop not in tok.decode(ids[:n - 1])  # stopped at the completing token
    assert stop not in tok.decode([ids[n - 1]])  # it spans tokens
    assert stream.add(ids[0]) == "" and stream.finish() == ""  # nothing after a stop


def test_text_stream_holds_back_a_possible_stop_and_releases_it(tok):
    ids = tok.encode("abc xy and more", add_special_tokens=False)
    stream = TextStream(tok, stop_strings=["xyz"])
    deltas = stream_all(stream, ids)
    assert not stream.stopped and "".join(deltas) == "abc xy and more"
    released = ""
    for d in deltas[:-1]:
        released += d
        assert not released.endswith("x") and not released.endswith("xy")  # a possible stop start is held


def test_text_stream_without_a_byte_table_uses_decode_stream():
    """A WordPiece tokenizer has no byte table: the stream goes through DecodeStream; the
    oracle is the same tokenizer's decode()."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hel": 1, "##lo": 2, "wor": 3, "##ld": 4, "!": 5, "[SEP]": 6}
    backend = Backend(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    wp = Tokenizer(backend, special_tokens={"eos_token": "[SEP]"})
    assert wp.token_bytes is None
    ids = [1, 2, 3, 4, 5, 6, 1, 2]
    for skip in (True, False):
        assert "".join(stream_all(TextStream(wp, skip_special_tokens=skip), ids)) == wp.decode(ids, skip)
    stream = TextStream(wp, stop_strings=["world"])
    stream_all(stream, ids)
    assert stream.stopped and stream.text == "hello "


def test_text_stream_work_per_token_does_not_grow(tok):
    """Cost model: each add() decodes the bytes of one token, whatever came before (the old
    detokenizer re-decoded a window that grew while the text ended in U+FFFD)."""
    cont = _byte_token(tok, 0x80)
    lead = _byte_token(tok, 0xE4)
    decoded = []
    stream = TextStream(tok)
    real = stream._utf8

    class Counting:
        def decode(self, data, final=False):
            decoded.append(len(data))
            return real.decode(data, final)

    stream._utf8 = Counting()
    for i in [cont] * 3000 + [lead] * 3000:
        stream.add(i)
    assert max(decoded) == 1 and len(decoded) == 6000


def test_call_refuses_what_is_not_text(tok):
    """tokenizer(text) names the problem instead of failing inside the padding code."""
    for bad, message in (([], "batch is empty"), (None, "str or a list of str"), ([1, 2], "str or a list of str")):
        with pytest.raises(ValueError, match=message):
            tok(bad)
    assert tok(["a", "bc"])["input_ids"] == [tok.encode("a"), tok.encode("bc")]
