"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 driven by the
official ``openai`` client (and httpx for raw error cases).

Oracles: transformers (AutoTokenizer renders the prompt, AutoModelForCausalLM computes
greedy tokens and log-probabilities), hand-written expectations for the tool call the
fixture model is built to emit (see tests/server_helpers.py), and properties (streamed
text == non-streamed text, same seed == same text, stop == truncation of the unstopped
text, no cache left in use after aborts).
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from fastlfm.server.app import create_app
from server_helpers import (TOOL_CALL_START_ID, cpu_engine, openai_client, parse_metrics, running_server,
                            write_tool_calling_checkpoint)

MODEL = "lfm2-tiny"
API_KEY = "sk-test-123"
MAX_MODEL_LEN = 384
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a place",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
FORCE_TOOL_CALL = {"logit_bias": {str(TOOL_CALL_START_ID): 30}}  # starts the fixture's call chain
USER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tool_ckpt")
    info = write_tool_calling_checkpoint(folder)
    return folder, info


@pytest.fixture(scope="module")
def engine(checkpoint):
    with cpu_engine(checkpoint[0], max_num_seqs=16, max_model_len=MAX_MODEL_LEN) as eng:
        yield eng


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(create_app(engine, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url, timeout=60)


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint[0]))


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(checkpoint[0]), dtype=torch.float32).eval()


def wait_idle(engine, timeout: float = 10.0):
    """Wait until the engine holds no request, then return its stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0 and s.conv_slots_used == 0:
            return s
        if time.monotonic() > deadline:
            return s
        time.sleep(0.02)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = "any", code: str | None = "any"):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "any":
        assert err["param"] == param, err
    if code != "any":
        assert err["code"] == code, err
    return err


def hf_prompt_ids(hf_tokenizer, messages, **kwargs) -> list[int]:
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                eos_token_id=7, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def collect_chat_stream(stream):
    """Concatenate a chat stream per choice: content, tool calls, finish reasons, usage."""
    content, calls, finish, usage, logprobs = {}, {}, {}, None, {}
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            content.setdefault(ch.index, "")
            content[ch.index] += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(ch.index, {}).setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            if ch.logprobs is not None and ch.logprobs.content:
                logprobs.setdefault(ch.index, []).extend(ch.logprobs.content)
            if ch.finish_reason is not None:
                assert ch.index not in finish, "two finish reasons for one choice"
                finish[ch.index] = ch.finish_reason
    return content, calls, finish, usage, logprobs


# ----------------------------------------------------------------------------- basics


def test_models_health_and_localhost_binding(client, base_url):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(base_url + "/health").status_code == 200
    assert base_url.startswith("http://127.0.0.1:")


def test_chat_greedy_matches_transformers(client, hf_tokenizer, hf_model):
    """Prompt rendering, generation and detokenization agree with transformers."""
    resp = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    prompt_ids = hf_prompt_ids(hf_tokenizer, USER)
    expected_ids = hf_greedy(hf_model, prompt_ids, 12)
    if 7 in expected_ids:
        expected_ids = expected_ids[: expected_ids.index(7) + 1]
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == hf_tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(expected_ids)
    assert resp.usage.total_tokens == len(prompt_ids) + len(expected_ids)
    assert choice.finish_reason == ("stop" if expected_ids[-1] == 7 else "length")
    assert resp.object == "chat.completion" and resp.model == MODEL and resp.id.startswith("chatcmpl-")


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.95, seed=1234)])
def test_chat_streaming_equals_non_streaming(client, sampling):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=24, **sampling)
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    content, calls, finish, usage, _ = collect_chat_stream(stream)
    assert content[0] == full.choices[0].message.content
    assert finish[0] == full.choices[0].finish_reason
    assert usage.model_dump() == full.usage.model_dump()
    assert not calls


def test_completions_streaming_equals_non_streaming_and_echo(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0.8, seed=99)
    full = client.completions.create(**kwargs)
    text = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert text == full.choices[0].text and full.object == "text_completion"
    echoed = client.completions.create(**kwargs, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + full.choices[0].text


def test_completions_prompt_forms(client, hf_tokenizer):
    ids = hf_tokenizer("The quick brown fox")["input_ids"]
    by_text = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=MODEL, prompt=["The quick brown fox", "Hello"], max_tokens=8,
                                      temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == by_text.choices[0].text  # greedy: n copies agree
    assert batch.usage.prompt_tokens == len(ids) + len(hf_tokenizer("Hello")["input_ids"])


def test_n_choices_streaming_and_not(client):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=16, temperature=1.0, seed=7, n=3)
    full = client.chat.completions.create(**kwargs)
    assert [c.index for c in full.choices] == [0, 1, 2]
    texts = [c.message.content for c in full.choices]
    assert len(set(texts)) > 1, "n choices from one seed must differ"
    content, _, finish, usage, _ = collect_chat_stream(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert [content[i] for i in range(3)] == texts
    assert [finish[i] for i in range(3)] == [c.finish_reason for c in full.choices]
    assert usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.prompt_tokens == usage.prompt_tokens  # the prompt is counted once


def test_seed_reproducibility(client):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=16, temperature=1.0)
    a = client.chat.completions.create(**kwargs, seed=42).choices[0].message.content
    b = client.chat.completions.create(**kwargs, seed=42).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(**kwargs, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1


def test_stop_strings_truncate_the_unstopped_text(client):
    kwargs = dict(model=MODEL, prompt="abc", max_tokens=24, temperature=0.9, seed=5, ignore_eos=True)
    # ignore_eos goes through extra_body, as LFM2 users pass top_k / min_p.
    base = client.completions.create(**{k: v for k, v in kwargs.items() if k != "ignore_eos"},
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) >= 8
    stop = base[4:7]
    expected = base[: base.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(**{k: v for k, v in kwargs.items() if k != "ignore_eos"},
                                                    extra_body={"ignore_eos": True}, stop=[stop], stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][0]
        else:
            r = client.completions.create(**{k: v for k, v in kwargs.items() if k != "ignore_eos"},
                                          extra_body={"ignore_eos": True}, stop=stop)
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert text == expected
        assert reason == "stop"


def test_lfm2_sampling_extras_at_top_level_and_in_extra_body(base_url):
    body = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0.7, seed=3)
    r1 = httpx.post(base_url + "/v1/chat/completions",
                    json={**body, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3})
    r2 = httpx.post(base_url + "/v1/chat/completions",
                    json={**body, "extra_body": {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3}})
    r3 = httpx.post(base_url + "/v1/chat/completions", json=body)
    assert r1.status_code == r2.status_code == r3.status_code == 200
    text = [r.json()["choices"][0]["message"]["content"] for r in (r1, r2, r3)]
    assert text[0] == text[1]
    assert text[0] != text[2]  # the knobs did something
    bad = httpx.post(base_url + "/v1/chat/completions", json={**body, "extra_body": {"top_k": "many"}})
    assert_openai_error(bad, 400, param="top_k")


def test_sampling_defaults_come_from_generation_config(checkpoint, tmp_path):
    """A request without sampling fields samples with the checkpoint's generation_config.json."""
    import shutil

    folder = tmp_path / "sampling_ckpt"
    shutil.copytree(checkpoint[0], folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.8, top_k=20, min_p=0.05, repetition_penalty=1.1)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    with cpu_engine(folder, max_num_seqs=4, max_model_len=MAX_MODEL_LEN) as eng, \
            running_server(create_app(eng, MODEL)) as url:
        c = openai_client(url)
        kwargs = dict(model=MODEL, messages=USER, max_tokens=16, seed=11)
        default = c.chat.completions.create(**kwargs).choices[0].message.content
        explicit = c.chat.completions.create(**kwargs, temperature=0.8, extra_body={
            "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}).choices[0].message.content
        greedy = c.chat.completions.create(**kwargs, temperature=0).choices[0].message.content
    assert default == explicit
    assert default != greedy


# ----------------------------------------------------------------------------- logprobs


def test_chat_logprobs_match_transformers(client, hf_tokenizer, hf_model):
    resp = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=3)
    choice = resp.choices[0]
    entries = choice.logprobs.content
    prompt_ids = hf_prompt_ids(hf_tokenizer, USER)
    expected_ids = hf_greedy(hf_model, prompt_ids, 10)
    if 7 in expected_ids:  # the eos token is not part of the text, nor of its logprobs
        expected_ids = expected_ids[: expected_ids.index(7)]
    assert len(entries) == len(expected_ids)
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + expected_ids])).logits[0, len(prompt_ids) - 1: -1]
    ref = torch.log_softmax(logits.float(), -1)
    for k, (entry, tid) in enumerate(zip(entries, expected_ids)):
        assert entry.token == hf_tokenizer.decode([tid])
        assert entry.logprob == pytest.approx(ref[k, tid].item(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        top_vals, top_ids = ref[k].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_vals.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy took the top
    visible = "".join(e.token for e in entries if not e.token.startswith("<|"))
    assert visible == choice.message.content


def test_completion_logprobs_shape_and_streaming(client):
    kwargs = dict(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0, logprobs=2)
    full = client.completions.create(**kwargs)
    lp = full.choices[0].logprobs
    n = len(lp.tokens)
    assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    streamed = []
    for chunk in client.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(lp.token_logprobs)


# ----------------------------------------------------------------------------- tools


def test_tool_call_non_streaming(client, hf_tokenizer):
    resp = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0,
                                          max_tokens=40, **FORCE_TOOL_CALL)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris"}
    # The template received the tools: the prompt is the transformers rendering with them.
    prompt = hf_tokenizer.apply_chat_template(USER, tools=[WEATHER_TOOL["function"]], add_generation_prompt=True,
                                              tokenize=False)
    assert "<|tool_list_start|>" in prompt and "get_weather" in prompt
    assert resp.usage.prompt_tokens == len(hf_tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_tool_call_streaming(client):
    stream = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0,
                                            max_tokens=40, stream=True, **FORCE_TOOL_CALL)
    content, calls, finish, _, _ = collect_chat_stream(stream)
    assert content[0] == ""
    assert finish[0] == "tool_calls"
    (call,) = calls[0].values()
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"location": "Paris"}
    assert call["id"].startswith("call_")


def test_tool_choice_none_returns_plain_text(client):
    resp = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="none",
                                          temperature=0, max_tokens=40, **FORCE_TOOL_CALL)
    choice = resp.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content == '[get_weather(location= "Paris")]'  # markers are special tokens
    assert choice.finish_reason == "stop"


def test_malformed_tool_call_falls_back_to_content(client, hf_tokenizer):
    """Block the chain's "Paris" token: the call never closes, so it must come back as text."""
    paris_piece = hf_tokenizer.convert_tokens_to_ids("P")
    bias = {**FORCE_TOOL_CALL["logit_bias"], str(paris_piece): -100}
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0, max_tokens=30,
                      logit_bias=bias)
        if stream:
            content, calls, finish, _, _ = collect_chat_stream(client.chat.completions.create(**kwargs, stream=True))
            text, reason = content[0], finish[0]
            assert not calls
        else:
            r = client.chat.completions.create(**kwargs)
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
            assert r.choices[0].message.tool_calls is None
        assert text.startswith('<|tool_call_start|>[get_weather(location= "')
        assert reason == "length"


def test_stop_string_inside_a_tool_call(client):
    """The stop string cuts the call: what is left is an unterminated block, i.e. content,
    the same streamed (with the stop's prefixes held back) and not."""
    kwargs = dict(model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0, max_tokens=40, stop=["Paris"],
                  **FORCE_TOOL_CALL)
    full = client.chat.completions.create(**kwargs).choices[0]
    assert full.message.content == '<|tool_call_start|>[get_weather(location= "'
    assert full.message.tool_calls is None and full.finish_reason == "stop"
    content, calls, finish, _, _ = collect_chat_stream(client.chat.completions.create(**kwargs, stream=True))
    assert (content[0], calls, finish[0]) == (full.message.content, {}, "stop")


def test_tool_conversation_history_is_accepted(client):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"location": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    resp = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                          max_tokens=8)
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert resp.usage.prompt_tokens > 0


# ----------------------------------------------------------------------------- errors


def test_invalid_json_and_fields_are_400_naming_the_field(base_url):
    url = base_url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json")
    assert_openai_error(httpx.post(url, json={"model": MODEL}), 400, param="messages",
                        code="missing_required_parameter")
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": USER, "temperature": -1}), 400,
                        param="temperature")
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}),
                        400, param="messages.0.role")
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": USER, "stop": [1]}), 400, param="stop.0")
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": USER, "n": 0}), 400, param="n")
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": USER, "logit_bias": {"99999": 1}}),
                        400, param="logit_bias")
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": USER, "top_logprobs": 2}), 400,
                        param="top_logprobs")
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": USER, "stream_options": {}}), 400,
                        param="stream_options")
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": USER, "tools": [WEATHER_TOOL],
                                              "tool_choice": "required"}), 400, param="tool_choice")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": image}), 400,
                        param="messages.0.content.0.type")
    assert_openai_error(httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    cmpl = base_url + "/v1/completions"
    assert_openai_error(httpx.post(cmpl, json={"model": MODEL, "prompt": [5, 99999]}), 400, param="prompt")
    assert_openai_error(httpx.post(cmpl, json={"model": MODEL, "prompt": []}), 400, param="prompt")
    assert_openai_error(httpx.post(cmpl, json={"model": MODEL, "prompt": "x", "max_tokens": 0}), 400,
                        param="max_tokens")


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # prompt longer than the context
        client.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN + 1), max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens longer than the context
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=MAX_MODEL_LEN)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"


def test_unknown_route_and_method_are_openai_shaped(base_url):
    assert_openai_error(httpx.get(base_url + "/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(base_url + "/v1/chat/completions"), 405)
    assert_openai_error(httpx.get(base_url + "/v1/models/gpt-4o"), 404, param="model", code="model_not_found")


def test_api_key(engine):
    with running_server(create_app(engine, MODEL, api_key=API_KEY)) as url:
        assert_openai_error(httpx.get(url + "/v1/models"), 401, code="invalid_api_key")
        assert_openai_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert_openai_error(httpx.post(url + "/v1/chat/completions", content=b"{bad json",
                                       headers={"Authorization": "Basic " + API_KEY}), 401)
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).usage.completion_tokens >= 1


def test_queue_full_is_429_and_capacity_comes_back(engine):
    app = create_app(engine, MODEL, max_concurrent=1, max_queue_len=0)
    with running_server(app) as url:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as held:
                assert held.status_code == 200
                lines = held.iter_lines()  # keep a reference: a dropped iterator closes the connection
                next(lines)  # the first request is generating
                err = assert_openai_error(http.post(url + "/v1/completions", json={**body, "stream": False}), 429,
                                          code="queue_full")
                assert "capacity" in err["message"]
                assert_openai_error(http.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": USER}),
                                    429)
            # The held stream was closed by the client: its slot is free again.
            deadline = time.monotonic() + 10
            while app.state.serving.pending and time.monotonic() < deadline:
                time.sleep(0.02)
            r = http.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert r.status_code == 200, r.text
            # More generations than the server ever runs at once is the client's error, not a busy server.
            assert_openai_error(http.post(url + "/v1/completions", json={**body, "stream": False, "n": 2}), 400,
                                param="n")


# ----------------------------------------------------------------------------- disconnects, metrics


def test_disconnect_mid_stream_aborts_and_frees_cache(client, engine, base_url):
    before = wait_idle(engine)
    aborted_before = parse_metrics(httpx.get(base_url + "/metrics").text).get(
        "fastlfm_request_success_total{finished_reason=abort}", 0)
    body = {"model": MODEL, "messages": USER, "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", base_url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert engine.stats().kv_blocks_used > 0 and engine.stats().conv_slots_used == 1
    after = wait_idle(engine)
    assert after.kv_blocks_used == 0 and after.conv_slots_used == 0 and after.num_running == 0
    generated = after.generation_tokens_total - before.generation_tokens_total
    assert generated < 300, "the request ran to the end instead of being aborted"
    metrics = parse_metrics(httpx.get(base_url + "/metrics").text)
    assert metrics["fastlfm_request_success_total{finished_reason=abort}"] == aborted_before + 1
    assert metrics["fastlfm_server_requests_in_flight"] == 0


def test_disconnect_during_non_streaming_request_aborts(engine, base_url):
    before = wait_idle(engine)
    body = {"model": MODEL, "messages": USER, "max_tokens": 300, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/chat/completions", json=body, timeout=0.3)
    after = wait_idle(engine)
    assert after.kv_blocks_used == 0 and after.conv_slots_used == 0
    assert after.generation_tokens_total - before.generation_tokens_total < 300


def test_metrics_endpoint(client, base_url, engine):
    before = parse_metrics(httpx.get(base_url + "/metrics").text)
    errors_before = before.get("fastlfm_request_errors_total{status=400}", 0)
    httpx.post(base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": -1})
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    text = httpx.get(base_url + "/metrics").text
    m = parse_metrics(text)
    stats = wait_idle(engine)
    for name in ("fastlfm_num_requests_running", "fastlfm_num_requests_waiting", "fastlfm_kv_cache_usage_ratio",
                 "fastlfm_kv_blocks_used", "fastlfm_conv_slots_used"):
        assert m[name] == 0, name
    assert m["fastlfm_kv_blocks_total"] == stats.kv_blocks_total > 0
    assert m["fastlfm_conv_slots_total"] == stats.conv_slots_total == 16
    assert m["fastlfm_prompt_tokens_total"] == stats.prompt_tokens_total > 0
    assert m["fastlfm_generation_tokens_total"] == stats.generation_tokens_total > 0
    assert m["fastlfm_time_to_first_token_seconds_count"] >= 1
    assert m["fastlfm_time_per_output_token_seconds_count"] >= 3
    assert m["fastlfm_e2e_request_latency_seconds_count"] >= 1
    assert m["fastlfm_request_errors_total{status=400}"] == errors_before + 1
    assert m["fastlfm_request_success_total{finished_reason=length}"] >= 1


def test_prefix_cache_usage_and_metrics(client, base_url, engine, hf_tokenizer, hf_model):
    """Requests sharing a system prompt: the later ones report the shared block-aligned start as
    `prompt_tokens_details.cached_tokens` (chat and completions, streamed usage too), answer as
    transformers does, and /metrics counts the hits."""
    bs = engine.engine.block_manager.block_size
    system = {"role": "system", "content": "You answer questions about otters, rivers and the moon, briefly. " * 3}
    convs = [[system, {"role": "user", "content": q}] for q in ("Where do otters sleep?", "Is the moon a river?")]
    ids = [hf_prompt_ids(hf_tokenizer, c) for c in convs]
    common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    before = parse_metrics(httpx.get(base_url + "/metrics").text)
    kwargs = {"model": MODEL, "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    first = client.chat.completions.create(messages=convs[0], **kwargs)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(messages=convs[1], **kwargs)
    assert second.usage.prompt_tokens == len(ids[1])
    assert second.usage.prompt_tokens_details.cached_tokens == common // bs * bs > 0
    assert second.choices[0].message.content == hf_tokenizer.decode(hf_greedy(hf_model, ids[1], 5)[:5],
                                                                    skip_special_tokens=True)
    *_, usage, _ = collect_chat_stream(client.chat.completions.create(
        messages=convs[0], stream=True, stream_options={"include_usage": True}, **kwargs))
    assert usage.prompt_tokens_details.cached_tokens == (len(ids[0]) - 1) // bs * bs  # all but the last token
    comp = client.completions.create(prompt=ids[1], **kwargs)
    assert comp.usage.prompt_tokens_details.cached_tokens == (len(ids[1]) - 1) // bs * bs
    after = parse_metrics(httpx.get(base_url + "/metrics").text)
    hits = after["fastlfm_prefix_cache_hits_total"] - before["fastlfm_prefix_cache_hits_total"]
    queries = after["fastlfm_prefix_cache_queries_total"] - before["fastlfm_prefix_cache_queries_total"]
    assert hits == common // bs * bs + (len(ids[0]) - 1) // bs * bs + (len(ids[1]) - 1) // bs * bs
    assert queries == 2 * len(ids[0]) + 2 * len(ids[1])
    assert after["fastlfm_prefix_cache_hit_rate"] == pytest.approx(
        after["fastlfm_prefix_cache_hits_total"] / after["fastlfm_prefix_cache_queries_total"])
    assert wait_idle(engine).kv_blocks_used == 0


def test_serve_cli(monkeypatch, capsys):
    from fastlfm.server import build_parser, main

    monkeypatch.delenv("FASTLFM_API_KEY", raising=False)
    args = build_parser().parse_args(["some/model"])
    assert (args.host, args.port, args.api_key, args.served_model_name) == ("127.0.0.1", 8000, None, None)
    args = build_parser().parse_args(["m", "--host", "0.0.0.0", "--port", "9", "--api-key", "k",
                                      "--served-model-name", "a", "b", "--max-num-seqs", "4", "--max-model-len", "64"])
    assert (args.host, args.port, args.api_key, args.served_model_name, args.max_num_seqs, args.max_model_len) == \
        ("0.0.0.0", 9, "k", ["a", "b"], 4, 64)
    monkeypatch.setenv("FASTLFM_API_KEY", "from-env")
    assert build_parser().parse_args(["m"]).api_key == "from-env"
    assert build_parser().parse_args(["m"]).compile and not build_parser().parse_args(["m", "--no-compile"]).compile
    assert build_parser().parse_args(["m"]).prefix_caching
    assert not build_parser().parse_args(["m", "--no-prefix-caching"]).prefix_caching
    assert main(["/nonexistent/checkpoint", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastlfm serve: error:") and "/nonexistent/checkpoint" in err and "\n" not in err


# ----------------------------------------------------------------------------- fuzzing


def test_schemathesis_fuzz_no_server_errors(base_url, engine):
    """Fuzz every operation of the server's own OpenAPI schema (valid and invalid data)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    failures, examples = [], {}
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                              "/metrics"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = (op.method.upper(), op.path, mode.name)

            @settings(max_examples=25 if op.method.upper() == "POST" else 5, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                examples[key] = examples.get(key, 0) + 1
                if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = MODEL  # a random name is a 404: let valid requests reach the engine
                response = case.call(base_url=base_url, timeout=60)
                if response.status_code >= 500:
                    failures.append((case.method, case.path, response.status_code, case.body, response.text[:300]))

            try:
                check()
            except Unsatisfiable:  # an operation without inputs has no invalid input to generate
                assert mode is GenerationMode.NEGATIVE and op.method.upper() == "GET", key
    for path in ("/v1/chat/completions", "/v1/completions"):
        for mode in ("POSITIVE", "NEGATIVE"):
            assert examples.get(("POST", path, mode), 0) >= 10, (path, mode, examples)
    assert not failures, failures[:3]
    idle = wait_idle(engine, timeout=30)
    assert idle.kv_blocks_used == 0 and idle.conv_slots_used == 0
