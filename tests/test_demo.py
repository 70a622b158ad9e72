"""The bundled demo model (`--model demo`): a real tiny LFM2 that answers its synthetic tasks.

Oracles: the task generator's own Python answers (a + b, reversed word lists, the expected
call), Python's `ast` for parsing tool calls, transformers for the logits, and the held-out
questions regenerated from their seed and checked to be absent from the training data.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from fastlfm import Lfm2ForCausalLM
from fastlfm.llm import LLM
from fastlfm.loading import DEMO_MODEL_DIR, resolve_model_dir
from fastlfm.testing.demo_tasks import (
    TOOLS, WEATHER_PROMPTS, heldout_items, parse_tool_calls, score_replies, training_conversations,
)
from fastlfm.testing.tokenizer_files import SPECIAL_TOKEN_IDS
from fastlfm.tokenizer import Tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_demo.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    model = Lfm2ForCausalLM.from_pretrained("demo", dtype=torch.float32)
    return model, Tokenizer.from_pretrained(resolve_model_dir("demo"))


def test_demo_is_a_small_real_lfm2_with_lfm2_tokens(demo):
    model, tok = demo
    assert resolve_model_dir("demo") == DEMO_MODEL_DIR
    cfg = model.config
    assert cfg.conv_layer_ids and cfg.attention_layer_ids  # both kinds of LFM2 layer
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 10e6
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 12 * 2**20
    for name in ["<|startoftext|>", "<|im_start|>", "<|im_end|>", "<|tool_call_start|>", "<|tool_call_end|>",
                 "<|tool_list_start|>", "<|tool_response_start|>", "<|pad|>"]:
        assert tok.token_to_id(name) == SPECIAL_TOKEN_IDS[name], name
    assert tok.eos_token_id == SPECIAL_TOKEN_IDS["<|im_end|>"]
    assert model.generation_config["eos_token_id"] == SPECIAL_TOKEN_IDS["<|im_end|>"]
    # transformers reads it as an LFM2 and computes the same logits.
    ref = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                                add_generation_prompt=True)])
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() <= 1e-4


def test_heldout_questions_are_absent_from_the_training_data():
    script = load_script()
    items = heldout_items(script.HELDOUT_SEED)
    records = training_conversations(script.TRAIN["n_train"], seed=script.DATA_SEED,
                                     exclude={i.key for i in items})
    pairs, word_lists, tool_questions = set(), set(), set()
    for r in records:
        for m in r["messages"]:
            if m["role"] == "assistant" and (hit := re.fullmatch(r"(\d+) \+ (\d+) = \d+", m["content"])):
                pairs.add((int(hit[1]), int(hit[2])))
            if m["role"] == "assistant":
                word_lists.add(m["content"])
            if m["role"] == "user":
                tool_questions.add(m["content"])
    for item in items:
        if item.task == "add":
            assert item.key[1:] not in pairs, item
        elif item.task == "reverse":
            assert item.answer not in word_lists, item
        else:
            assert item.messages[-1][1] not in tool_questions, item
    assert {i.task for i in items} == {"add", "reverse", "weather", "time"}


def test_demo_answers_heldout_questions_greedily(demo):
    """100 held-out questions through the chat template and LLM.generate(), greedy, each reply
    ending at <|im_end|>; exact match against the Python answer."""
    model, tok = demo
    items = heldout_items(load_script().HELDOUT_SEED)
    prompts = [tok.apply_chat_template(i.chat(), tools=i.tools_list(), add_generation_prompt=True) for i in items]
    out = LLM(model, tokenizer=tok).generate(prompts, max_new_tokens=48, do_sample=False, skip_special_tokens=False)
    assert [r.finish_reason for r in out] == ["eos"] * len(items)
    assert all(r.token_ids[-1] == SPECIAL_TOKEN_IDS["<|im_end|>"] for r in out)
    scores = score_replies(items, [r.text for r in out])
    assert scores["all"] >= 0.9, scores
    assert min(scores[t] for t in ("add", "reverse", "weather", "time")) >= 0.8, scores
    assert scores["tool_call_parsed"] >= 0.9, scores


def test_demo_tool_call_round_trip_through_llm_chat():
    """The high-level API: a pythonic tool call that parses, then, given the tool's result,
    an answer that reads it."""
    llm = LLM("demo", dtype="float32")
    city = "Lisbon"
    messages = [{"role": "user", "content": WEATHER_PROMPTS[0].format(c=city)}]
    first = llm.chat(messages, tools=TOOLS)
    assert first.finish_reason == "eos"
    call = llm.tokenizer.decode(first.token_ids[:-1], skip_special_tokens=False)
    assert parse_tool_calls(call) == [("get_weather", {"location": city})]

    result = json.dumps({"location": city, "temperature": 21, "condition": "sunny"})
    messages += [{"role": "assistant", "content": call}, {"role": "tool", "content": result}]
    second = llm.chat(messages, tools=TOOLS)
    assert second.text == f"It is 21 degrees and sunny in {city}."
