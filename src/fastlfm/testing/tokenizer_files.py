"""Tiny, LFM2-shaped tokenizer files for tests.

``write_tokenizer_files(folder)`` writes a Hugging Face style tokenizer into ``folder``
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
``chat_template.jinja``).  It mirrors the real LFM2 tokenizer (spec §6): a byte-level BPE
with a Llama-3-style split regex, BOS added by the post-processor, and the special tokens at
their real ids (0-13, 396-499).  Only the learned BPE vocabulary is small.

The BPE is trained with the ``tokenizers`` library on a built-in corpus.  Training is
deterministic (the corpus is fixed and the generated part uses a seeded RNG) and takes well
under a second for the default size.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

from ..tokenizer import LFM2_SPLIT_PATTERN

__all__ = [
    "SPECIAL_TOKEN_IDS",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "SPLIT_PATTERN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "MIN_VOCAB_SIZE",
    "write_tokenizer_files",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"

#: The smallest vocabulary the fixture supports (500 special tokens + 256 bytes + merges).
MIN_VOCAB_SIZE = 1024

#: Llama-3-style pre-tokenizer split regex (spec §6.1), used with behaviour "isolated".
SPLIT_PATTERN = LFM2_SPLIT_PATTERN


def _build_special_tokens() -> list[str]:
    """Special tokens in id order 0..499."""
    tokens = [
        "<|pad|>",  # 0
        "<|startoftext|>",  # 1
        "<|endoftext|>",  # 2
        "<|fim_pre|>",  # 3
        "<|fim_mid|>",  # 4
        "<|fim_suf|>",  # 5
        "<|im_start|>",  # 6
        "<|im_end|>",  # 7
        "<|tool_list_start|>",  # 8
        "<|tool_list_end|>",  # 9
        "<|tool_call_start|>",  # 10
        "<|tool_call_end|>",  # 11
        "<|tool_response_start|>",  # 12
        "<|tool_response_end|>",  # 13
    ]
    tokens += [f"<|reserved_{i}|>" for i in range(14, 396)]
    tokens.append("<image>")  # 396
    for r in range(1, 11):
        for c in range(1, 11):
            tokens.append(f"<|img_row_{r}_col_{c}|>")  # 397 + 10(r-1) + (c-1)
    tokens += ["<|img_thumbnail|>", "<|image_start|>", "<|image_end|>"]  # 497, 498, 499
    assert len(tokens) == 500
    return tokens


#: All fixture special tokens, index == token id.
SPECIAL_TOKENS: list[str] = _build_special_tokens()

#: Named special tokens and their (real LFM2) ids.
SPECIAL_TOKEN_IDS: dict[str, int] = {
    "<|pad|>": 0,
    "<|startoftext|>": 1,
    "<|endoftext|>": 2,
    "<|fim_pre|>": 3,
    "<|fim_mid|>": 4,
    "<|fim_suf|>": 5,
    "<|im_start|>": 6,
    "<|im_end|>": 7,
    "<|tool_list_start|>": 8,
    "<|tool_list_end|>": 9,
    "<|tool_call_start|>": 10,
    "<|tool_call_end|>": 11,
    "<|tool_response_start|>": 12,
    "<|tool_response_end|>": 13,
    "<image>": 396,
    **{f"<|img_row_{r}_col_{c}|>": 397 + 10 * (r - 1) + (c - 1) for r in range(1, 11) for c in range(1, 11)},
    "<|img_thumbnail|>": 497,
    "<|image_start|>": 498,
    "<|image_end|>": 499,
}
assert all(SPECIAL_TOKENS[i] == t for t, i in SPECIAL_TOKEN_IDS.items())

# The LFM2 chat template, written from the rules of spec §6.2 (plus list-of-parts content,
# so that it also serves LFM2-VL, §8.5).
CHAT_TEMPLATE = """\
{#- LFM2 chat template (fastlfm test fixture). -#}
{%- macro render_content(content) -%}
    {%- if content is not defined or content is none -%}
    {%- elif content is string -%}
        {{- content -}}
    {%- elif content is sequence and content is not mapping
          and (content | select("mapping") | selectattr("type", "defined") | list | length) == (content | length) -%}
        {%- for part in content -%}
            {%- if part["type"] == "text" -%}
                {{- part["text"] -}}
            {%- elif part["type"] == "image" -%}
                {{- "<image>" -}}
            {%- else -%}
                {{- raise_exception("Unsupported content part type: " + (part["type"] | string)) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- content | tojson -}}
    {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages and messages[0]["role"] == "system" -%}
    {%- set ns.system_prompt = render_content(messages[0]["content"]) -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
    {%- if ns.system_prompt -%}
        {%- set ns.system_prompt = ns.system_prompt + "\\n" -%}
    {%- endif -%}
    {%- set ns.system_prompt = ns.system_prompt + "List of tools: <|tool_list_start|>[" -%}
    {%- for tool in tools -%}
        {%- if tool is not string -%}
            {%- set tool = tool | tojson -%}
        {%- endif -%}
        {%- set ns.system_prompt = ns.system_prompt + tool -%}
        {%- if not loop.last -%}
            {%- set ns.system_prompt = ns.system_prompt + ", " -%}
        {%- endif -%}
    {%- endfor -%}
    {%- set ns.system_prompt = ns.system_prompt + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system_prompt -%}
    {{- "<|im_start|>system\\n" + ns.system_prompt + "<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
    {{- "<|im_start|>" + message["role"] + "\\n" -}}
    {%- if message["role"] == "tool" -%}
        {{- "<|tool_response_start|>" + render_content(message["content"]) + "<|tool_response_end|>" -}}
    {%- else -%}
        {{- render_content(message["content"]) -}}
    {%- endif -%}
    {{- "<|im_end|>\\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\\n" -}}
{%- endif -%}
"""

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. Liquid foundation models are hybrid networks that
mix short convolutions with grouped-query attention. They're small, fast and run on phones,
laptops and cars. We'll test the tokenizer with plain English, source code, numbers and text in
other scripts. It's important that every byte can be encoded: the byte-level alphabet covers all
256 values, so nothing is ever unknown. I've seen models that couldn't handle emoji; this one can.
Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.
Every morning they walked down to the harbour, pulled the boat into the water and sailed out
beyond the rocks, where the fish were plentiful and the wind was kind.
Question: What is the capital of France? Answer: Paris is the capital of France.
Please summarise the following document in three sentences, then list the key points.
"""

_CODE = '''\
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]


class Cache:
    def __init__(self, size=128):
        self.size = size
        self.items = {}

    def get(self, key, default=None):
        return self.items.get(key, default)

for i in range(10):
    if i % 2 == 0:
        print(f"even: {i}")
    else:
        print("odd:", i)

#include <stdio.h>
int main(void) {
    for (int i = 0; i < 42; ++i) { printf("%d\\n", i * i); }
    return 0;
}
{"name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}
SELECT id, name FROM users WHERE age >= 18 ORDER BY name;
'''

_DIGITS = """\
0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 512 1024 2048 4096 65536 3.14159 2.71828 1e-6 -42
2024-01-15 12:30:45 +33 6 12 34 56 78 $1,299.99 99% 1/2 3/4 0x1F 0b1010 v1.2.3
"""

_NON_ASCII = """\
Café, naïve, façade, über, Straße, jalapeño, smörgåsbord, déjà vu, résumé, Ærø, Œuvre.
Привет, как дела? Всё хорошо, спасибо. Γειά σου κόσμε. Καλημέρα.
你好，世界！今天天气很好。我们一起去公园吧。机器学习和自然语言处理。
こんにちは、世界。ありがとうございます。東京は日本の首都です。
안녕하세요, 세계! 감사합니다.
مرحبا بالعالم. שלום עולם. नमस्ते दुनिया।
Emoji: 😀 😂 🤖 🚀 ❤️ 👍🏽 🇫🇷 👨‍👩‍👧 ✨ 🎉 ☕ 🍕
Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ π θ λ μ → ← ⇒ ∀ ∃ ∈ ∉ ⊂ ∪ ∩ ° ± × ÷ € £ ¥ © ® ™
"""

_SYLLABLES = [
    "ka", "lo", "mi", "ne", "ta", "ri", "so", "vu", "pe", "da", "ge", "bo", "zi", "fa", "hu",
    "ja", "qu", "wy", "xe", "in", "on", "er", "an", "th", "st", "ing", "ion", "ed", "ly", "re",
]


def _generated_corpus(n_lines: int) -> list[str]:
    """Deterministic pseudo-text that gives the BPE trainer plenty of distinct pairs."""
    rng = random.Random(1234)
    lines = []
    for _ in range(n_lines):
        words = []
        for _ in range(rng.randint(4, 12)):
            kind = rng.random()
            if kind < 0.75:
                w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
                if rng.random() < 0.15:
                    w = w.capitalize()
                words.append(w)
            elif kind < 0.9:
                words.append(str(rng.randint(0, 99999)))
            else:
                words.append(rng.choice([",", ".", ":", ";", "!", "?", "()", "[]", "{}", "->", "==", "=", "+="]))
        lines.append(" ".join(words))
    return lines


def _corpus(vocab_size: int) -> list[str]:
    base = [_ENGLISH, _CODE, _DIGITS, _NON_ASCII]
    # Repeat the hand-written parts so that their merges win, then add generated text so that
    # larger vocabularies can still be filled with real merges.
    n_generated = max(200, (vocab_size - 700) // 2)
    return base * 4 + _generated_corpus(n_generated)


def _train_backend(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(vocab_size), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, SPECIAL_TOKEN_IDS[BOS_TOKEN])],
    )
    return tok


@functools.lru_cache(maxsize=4)
def _tokenizer_json_text(vocab_size: int) -> str:
    """Train, then make sure the vocabulary has exactly ``vocab_size`` entries.

    Cached: tests and benchmarks write many checkpoint folders in one process, and training
    is deterministic, so the result is reused (a 65,536-token vocabulary takes a few seconds).
    """
    data = json.loads(_train_backend(vocab_size).to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # If the corpus ran out of pairs, fill up with unreachable (merge-less) vocab entries,
    # so the total is exact.  Their text is plain ASCII, which is valid byte-level text.
    i = 0
    while len(vocab) < vocab_size:
        filler = f"<filler_{i}>"
        if filler not in vocab:
            vocab[filler] = len(vocab)
        i += 1
    assert sorted(vocab.values()) == list(range(vocab_size)), "vocabulary ids are not contiguous"
    for i, content in enumerate(SPECIAL_TOKENS):
        assert vocab[content] == i
    # Added tokens: every special token, special=True, matched verbatim.
    data["added_tokens"] = [
        {
            "id": i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, content in enumerate(SPECIAL_TOKENS)
    ]
    return json.dumps(data, ensure_ascii=False, indent=2)


def _added_tokens_decoder() -> dict[str, dict]:
    return {
        str(i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, content in enumerate(SPECIAL_TOKENS)
    }


def write_tokenizer_files(folder: str | os.PathLike, vocab_size: int = 1024) -> None:
    """Write an LFM2-like tokenizer (HF format) with exactly ``vocab_size`` tokens into ``folder``.

    Files: ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
    ``chat_template.jinja``.  Special tokens sit at the real LFM2 ids (see ``SPECIAL_TOKEN_IDS``).
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    with open(folder / "tokenizer.json", "w", encoding="utf-8") as f:
        f.write(_tokenizer_json_text(vocab_size))

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(),
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "extra_special_tokens": {},
        "legacy": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 32768,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "use_default_system_prompt": False,
    }
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)

    special_map = {
        "bos_token": {"content": BOS_TOKEN, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": {"content": EOS_TOKEN, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "pad_token": {"content": PAD_TOKEN, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    }
    with open(folder / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special_map, f, ensure_ascii=False, indent=2)

    with open(folder / "chat_template.jinja", "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
