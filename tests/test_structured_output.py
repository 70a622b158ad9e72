"""Structured output (fastlfm.structured): json_schema / regex / choice through the engine, LLM and
the OpenAI server.

Oracles: the `jsonschema` validator and `json` (outputs must parse and validate), `re.fullmatch`,
the choice list, and properties: the fixture model is random, so its unconstrained output is not
JSON (asserted), and unconstrained requests get the same greedy tokens whether constrained ones
share their batches or not.
"""

from __future__ import annotations

import json
import re
import sys
import threading

import httpx
import jsonschema
import pytest
import torch

from fastlfm import LLM
from fastlfm.sampling import SamplingParams
from fastlfm.server.app import create_app
from server_helpers import cpu_engine, openai_client, running_server

PROMPTS = ["Hello there", "1, 2, 3,", "The weather today", "{", "Write JSON:"]

SCHEMAS = {
    "nested_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 10},
                                       "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, "XL", None]}},
        "required": ["color", "size"], "additionalProperties": False,
    },
    "array_bounds": {
        "type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 4,
    },
    "number_bounds": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 65},
                       "score": {"type": "number", "minimum": -1.5, "exclusiveMaximum": 2.5, "multipleOf": 0.25},
                       "flag": {"type": "boolean"}},
        "required": ["age", "score", "flag"], "additionalProperties": False,
    },
    "strings": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                       "note": {"type": "string", "minLength": 2, "maxLength": 8}},
        "required": ["code", "note"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9},
                                                  "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                           "maxItems": 2}},
                  "required": ["id", "tags"], "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def llm_sync(tiny_ckpt):
    return LLM(tiny_ckpt, device="cpu", dtype="float32", engine_options={"async_scheduling": False})


@pytest.fixture(scope="module")
def llm_async(tiny_ckpt):
    return LLM(tiny_ckpt, device="cpu", dtype="float32", engine_options={"async_scheduling": True})


@pytest.fixture
def llm(async_scheduling, llm_sync, llm_async):
    return llm_async if async_scheduling else llm_sync


def _special_ids(llm) -> set[int]:
    return set(llm.tokenizer.special_token_ids)


def test_unconstrained_output_is_not_json(llm_sync):
    """The property the other tests rely on: without a grammar the random model writes no JSON."""
    for r in llm_sync.generate(PROMPTS, max_new_tokens=40):
        with pytest.raises(ValueError):
            json.loads(r.text)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_json_schema_outputs_validate(llm, name, sampled):
    schema = SCHEMAS[name]
    kwargs = {"temperature": 1.0, "seed": 11} if sampled else {}
    results = llm.generate(PROMPTS, max_new_tokens=200, json_schema=schema, **kwargs)
    for r in results:
        assert r.finish_reason in ("stop", "eos"), (r.finish_reason, r.text)
        jsonschema.validate(json.loads(r.text), schema)
        # no special token (they are never part of grammar text), except an eos that ended it
        body = r.token_ids[:-1] if r.finish_reason == "eos" else r.token_ids
        assert not set(body) & _special_ids(llm), r.token_ids
    llm.engine.check_no_leaks()


def test_json_object_regex_and_choice(llm):
    # any object: keys and values are unbounded, so some random-model outputs run to the length limit
    objs = llm.generate(PROMPTS, max_new_tokens=120, json_schema={"type": "object"})
    finished = [r for r in objs if r.finish_reason in ("stop", "eos")]
    assert len(finished) >= 3, [(r.finish_reason, r.text) for r in objs]
    for r in objs:
        assert r.text.startswith("{")
    for r in finished:
        assert isinstance(json.loads(r.text), dict)
    pattern = r"(\+33|0)[1-9]( [0-9]{2}){4}"
    for r in llm.generate(PROMPTS, max_new_tokens=40, regex=pattern):
        assert re.fullmatch(pattern, r.text), r.text
        assert r.finish_reason in ("stop", "eos")
    choices = ["yes", "no", 'maybe "later"', "ünïcode ✓"]
    seen = set()
    for seed in range(8):
        for r in llm.generate(PROMPTS[:2], max_new_tokens=20, choice=choices, temperature=1.0, seed=seed):
            assert r.text in choices and r.finish_reason in ("stop", "eos")
            seen.add(r.text)
    assert len(seen) >= 2  # sampling reaches more than one choice: the mask is not a fixed answer


def test_mixed_batch_keeps_unconstrained_tokens(llm):
    """Constrained rows change nothing for the unconstrained rows of the same steps (greedy)."""
    alone = llm.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)
    schema = SCHEMAS["nested_object"]
    params = [llm.sampling_params(max_new_tokens=24, ignore_eos=True) if i % 2 == 0
              else llm.sampling_params(max_new_tokens=200, json_schema=schema) for i in range(len(PROMPTS))]
    mixed = llm.generate(PROMPTS, params)
    for i, (a, m) in enumerate(zip(alone, mixed)):
        if i % 2 == 0:
            assert m.token_ids == a.token_ids
        else:
            jsonschema.validate(json.loads(m.text), schema)


def test_graph_steps_and_preemption(tiny_ckpt, async_scheduling):
    """Decode graphs (replayed eagerly on the CPU) with the ids of a masked step fed back on the device,
    and preemption (recompute from prompt + outputs) while grammars hold their parse state."""
    from fastlfm.engine import LLMEngine

    def run(constrained: bool):
        engine = LLMEngine.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", async_scheduling=async_scheduling,
                                           max_num_seqs=4, max_model_len=96, num_kv_blocks=30, block_size=4,
                                           max_num_batched_tokens=16)
        engine.runner.capture_graphs(4)
        run_graph = engine.runner._run_graph
        engine.runner._run_graph = lambda seqs, *a: (graph_rows.extend(s.grammar is not None for s in seqs),
                                                     run_graph(seqs, *a))[1]
        plain = SamplingParams(max_new_tokens=40, do_sample=False, ignore_eos=True)
        schema = SCHEMAS["array_of_objects"]
        params = [SamplingParams(max_new_tokens=80, do_sample=False, json_schema=schema) if constrained and i % 2
                  else plain for i in range(len(PROMPTS))]
        outs = engine.generate(PROMPTS, params)
        engine.check_no_leaks()
        return engine, outs

    graph_rows = []
    engine, outs = run(constrained=True)
    assert engine.scheduler.num_preemptions > 0 and any(graph_rows)  # constrained rows ran in graph steps
    _, reference = run(constrained=False)
    for i, (o, ref) in enumerate(zip(outs, reference)):
        if i % 2:
            assert o.finish_reason in ("stop", "eos"), o.text
            jsonschema.validate(json.loads(o.text), SCHEMAS["array_of_objects"])
        else:
            assert o.token_ids == ref.token_ids


def test_grammar_ends_the_request_despite_ignore_eos(llm_sync):
    r = llm_sync.generate("Hi", max_new_tokens=300, ignore_eos=True, choice=["alpha", "beta"])[0]
    assert r.text in ("alpha", "beta") and r.finish_reason in ("stop", "eos")


def test_grammar_error_aborts_only_its_request(tiny_ckpt):
    from fastlfm.engine import LLMEngine

    engine = LLMEngine.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
    schema = SCHEMAS["enums"]
    good = engine.add_request("Hello", SamplingParams(max_new_tokens=100, do_sample=False, json_schema=schema))
    bad = engine.add_request("Hello", SamplingParams(max_new_tokens=100, do_sample=False, json_schema=schema))
    bad.grammar.consume_token(engine.tokenizer.encode("]", add_special_tokens=False)[0])  # a JSON object cannot start so
    assert bad.grammar.is_error()
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[bad.request_id].finish_reason == "abort"
    assert "grammar rejected" in str(finals[bad.request_id].error)
    assert finals[good.request_id].finish_reason in ("stop", "eos")
    jsonschema.validate(json.loads(finals[good.request_id].text), schema)
    engine.check_no_leaks()


def test_bad_constraints_are_refused_by_name(llm_sync):
    with pytest.raises(ValueError, match="invalid json_schema: .*objekt"):
        llm_sync.generate("x", json_schema={"type": "objekt"})
    with pytest.raises(ValueError, match="invalid json_schema: .*minimum"):
        llm_sync.generate("x", json_schema={"type": "integer", "minimum": 5, "maximum": 2})
    with pytest.raises(ValueError, match="invalid regex"):
        llm_sync.generate("x", regex="([a-z")
    with pytest.raises(ValueError, match="only one of json_schema, regex and choice"):
        llm_sync.generate("x", regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice"):
        llm_sync.generate("x", choice=[])
    with pytest.raises(ValueError, match="at most"):
        llm_sync.generate("x", choice=["x" * 1000] * 100)
    llm_sync.engine.check_no_leaks()


def test_grammars_compile_once_per_schema(llm_sync):
    cache = llm_sync.engine.grammars
    a = cache.compile(SamplingParams(json_schema={"type": "object", "required": ["a"]}))
    b = cache.compile(SamplingParams(json_schema={"type": "object", "required": ["a"]}))
    c = cache.compile(SamplingParams(json_schema=json.dumps({"type": "object", "required": ["a"]})))  # its text
    assert a is b and a is c
    assert cache.compile(SamplingParams(regex="a+")) is not a
    with pytest.raises(ValueError, match="no json_schema, regex or choice"):
        cache.compile(SamplingParams())
    # another lane: the same grammar compiled on its own (copies of one template share its lexer)
    lane1 = cache.compile(SamplingParams(json_schema={"type": "object", "required": ["a"]}), lane=1)
    assert lane1 is not a and lane1 is cache.compile(SamplingParams(json_schema=json.dumps(
        {"type": "object", "required": ["a"]})), lane=1)
    assert lane1.compute_bitmask() == a.compute_bitmask()


def test_a_new_lane_compiles_in_the_background(llm_sync):
    """lane_matcher: a lane not compiled yet is compiled on another thread while its request takes
    lane 0 (the engine's thread compiles nothing but lane 0); once compiled, the lane is used."""
    import time

    from fastlfm.structured import GrammarCache

    tok = llm_sync.tokenizer
    cache = GrammarCache(tok, tok.vocab_size, {7})
    params = SamplingParams(json_schema=SCHEMAS["enums"])
    compiled = []
    compile_lane = cache.compile
    cache.compile = lambda p, lane=0: compiled.append((lane, threading.current_thread().name)) or compile_lane(p, lane)
    first = cache.lane_matcher(params, 1)  # nothing compiled: lane 0, here
    assert first[1] == 0 and compiled[0][0] == 0
    second = cache.lane_matcher(params, 1)  # lane 1 compiles on the other thread meanwhile
    assert second[1] == 0
    deadline = time.monotonic() + 30
    while cache.lane_matcher(params, 1)[1] != 1:
        assert time.monotonic() < deadline, "lane 1 never compiled"
        time.sleep(0.01)
    lane1 = [name for lane, name in compiled if lane == 1]  # compiled there; looked up here once ready
    assert lane1[0].startswith("fastlfm-grammar-lanes") and set(lane1[1:]) <= {"MainThread"}
    assert cache.compile(params, 1) is not cache.compile(params, 0)
    m, lane = cache.lane_matcher(params, 1)
    assert m.compute_bitmask() == first[0].compute_bitmask()  # same grammar, same start state


def test_finer_string_slices_change_no_mask(llm_sync):
    """STRING_SLICES only speed masks up: inside strings bounded by maxLength, at every length,
    and in the other states of a schema, the bits equal those of llguidance's default slices."""
    import llguidance

    from fastlfm.structured import GrammarCache, _grammar

    tok = llm_sync.tokenizer
    cache = GrammarCache(tok, tok.vocab_size, {7})
    schema = {"type": "array", "items": {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 11}, "t": {"type": "string", "minLength": 3, "maxLength": 5}},
        "required": ["s", "t"], "additionalProperties": False}}
    ours = cache.matcher(SamplingParams(json_schema=schema))
    default_tok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=[7])
    theirs = llguidance.LLMatcher(default_tok, _grammar(llguidance, "json_schema", json.dumps(schema)), log_level=0)
    text = '[{"s": "abcdefghijk", "t": "xyzuv"}, {"s": "", "t": "q r"}]'
    ids = [t for c in text for t in tok.encode(c, add_special_tokens=False)]  # one character at a time
    assert len(ids) == len(text)
    compared = 0
    for t in ids:
        assert ours.compute_bitmask() == theirs.compute_bitmask(), tok.decode(ids[:compared])
        assert ours.consume_token(t) and theirs.consume_token(t)
        compared += 1
    assert ours.is_accepting() and compared == len(text)


def test_mask_never_allows_special_or_padding_ids(llm_sync):
    """Inside a JSON string: the allowed ids are exactly the tokens whose bytes may stand there
    (checked by hand from the byte table); no special token, no id past the tokenizer (a model
    vocabulary padded beyond it)."""
    from fastlfm.structured import GrammarCache, fill_bitmask, unpack_bitmask

    tok = llm_sync.tokenizer
    vocab = tok.vocab_size + 64
    cache = GrammarCache(tok, vocab, {7})
    matcher = cache.matcher(SamplingParams(json_schema={"type": "string"}))
    assert matcher.consume_token(tok.encode('"', add_special_tokens=False)[0])
    allowed = unpack_bitmask(fill_bitmask([(matcher, 0)], 1, vocab, pin=False), vocab)[0]
    assert not allowed[tok.vocab_size:].any()
    assert not allowed[sorted(tok.special_token_ids)].any()

    def plain_string_bytes(b: bytes) -> bool:  # no quote, backslash or control byte (DEL too): a literal run
        return bool(b) and all(c >= 0x20 and c not in (0x22, 0x5C, 0x7F) for c in b)

    table, checked = tok.token_bytes, 0
    for i in range(tok.vocab_size):
        if i not in tok.special_token_ids and plain_string_bytes(table[i]):
            try:  # a token of whole UTF-8 characters (a partial one may not continue every string)
                table[i].decode()
            except UnicodeDecodeError:
                continue
            assert allowed[i], (i, table[i])
            checked += 1
    assert checked > 200


def test_missing_library_names_the_extra(tiny_ckpt, monkeypatch):
    from fastlfm.engine import LLMEngine

    engine = LLMEngine.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    with pytest.raises(ValueError, match=r'pip install "fastlfm\[structured\]"'):
        engine.add_request("x", SamplingParams(regex="a+"))
    out = engine.generate(["x"], SamplingParams(max_new_tokens=3))  # plain requests still work
    assert len(out[0].token_ids) == 3


# ----------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def base_url(tiny_ckpt):
    with cpu_engine(tiny_ckpt, max_num_seqs=8, max_model_len=512) as eng:
        with running_server(create_app(eng, "tiny")) as url:
            yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url, timeout=60)


def _chat_stream_text(stream) -> tuple[str, str]:
    text, finish = "", None
    for chunk in stream:
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish


def test_server_response_format_json_schema(client):
    schema = SCHEMAS["number_bounds"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Describe a person"}]
    r = client.chat.completions.create(model="tiny", messages=messages, response_format=fmt, max_tokens=200,
                                       temperature=0)
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    assert r.choices[0].finish_reason == "stop"
    streamed, finish = _chat_stream_text(client.chat.completions.create(
        model="tiny", messages=messages, response_format=fmt, max_tokens=200, temperature=0, stream=True))
    assert streamed == text and finish == "stop"
    # json_object on a text completion (LLM.generate ends this greedy prompt's object: test above)
    r = client.completions.create(model="tiny", prompt="1, 2, 3,", max_tokens=120, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].text), dict)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    with pytest.raises(ValueError):
        json.loads(plain.choices[0].message.content)


def test_server_guided_extras(client):
    r = client.completions.create(model="tiny", prompt="Pick one:", max_tokens=20,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    r = client.completions.create(model="tiny", prompt="Date:", max_tokens=30, stream=False,
                                  extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", r.choices[0].text)
    schema = SCHEMAS["array_bounds"]
    stream = client.completions.create(model="tiny", prompt="List:", max_tokens=100, stream=True,
                                       extra_body={"guided_json": schema})
    text = "".join(c.choices[0].text for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "?"}], max_tokens=100,
                                       extra_body={"extra_body": {"guided_json": json.dumps(schema)}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "objekt"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"guided_regex": "([a-z"}, "guided_regex", "regex"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one"),
    ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, "guided_json", "only one"),
    ({"response_format": {"type": "xml"}}, "response_format.type", None),
])
def test_server_bad_structured_requests_are_400(base_url, body, param, message):
    r = httpx.post(base_url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    if message is not None:
        assert message in err["message"], err


def test_thread_pool_masks_and_advances_match_the_loop(llm_sync):
    """llguidance's pool (LLExecutor) fills the same bits as one matcher after the other, on memory
    full of garbage (every byte of a constrained row is written; the other rows are all ones), and
    advances the same way, a rejected token included."""
    from fastlfm.structured import PAR_MIN_ROWS, GrammarCache, advance_all, fill_bitmask

    tok = llm_sync.tokenizer
    vocab = tok.vocab_size
    cache = GrammarCache(tok, vocab, {7})
    pool = cache.executor(2)
    assert cache.executor(2) is pool and cache.executor(1) is None and cache.executor(0) is None
    n = PAR_MIN_ROWS + 4
    schemas = [SCHEMAS[k] for k in sorted(SCHEMAS)]
    texts = ['{"name": "ab', '[{"id": 3, "tags": ["a"', '{"color": "re', '{"age": 2', '[', '{"code": "AB1']
    states = []
    for copy in range(2):  # two identical sets of matchers: one for the loop, one for the pool
        ms = []
        for i in range(n):
            m = cache.matcher(SamplingParams(json_schema=schemas[i % len(schemas)]))
            for t in tok.encode(texts[i % len(texts)], add_special_tokens=False):
                if m.validate_tokens([t]) == 1:
                    m.consume_token(t)
            ms.append(m)
        states.append(ms)
    rows = list(range(1, n + 1))  # constrained rows 1..n of n + 2: rows 0 and n + 1 unconstrained
    for m in states[0][:len(texts)]:  # fill_bitmask leaves a constrained row's memory to llguidance
        garbage = torch.full(((vocab + 31) // 32,), 0x5A5A5A5A, dtype=torch.int32)
        m.unsafe_compute_mask_ptr(garbage.data_ptr(), garbage.numel() * 4)
        assert garbage.numpy().tobytes() == m.compute_bitmask()[: garbage.numel() * 4]
    masks = [fill_bitmask(list(zip(ms, rows)), n + 2, vocab, pin=False, executor=ex)
             for ms, ex in zip(states, [None, pool])]
    assert torch.equal(masks[0], masks[1])
    assert (masks[0][0] == -1).all() and (masks[0][n + 1] == -1).all()
    assert not (masks[0][1:n + 1] == -1).all(dim=1).any()  # every constrained row forbids something
    # one token each: the first allowed one, except row 0 which takes a forbidden one
    bits = masks[0][1:n + 1]
    toks = []
    for i in range(n):
        words = bits[i].tolist()
        allowed = [32 * w + b for w, x in enumerate(words) for b in range(32) if (x >> b) & 1]
        toks.append(allowed[0] if i else next(t for t in range(vocab) if t not in set(allowed)))
    got = [advance_all(list(zip(ms, toks)), ex) for ms, ex in zip(states, [None, pool])]
    assert isinstance(got[0][0], ValueError) and isinstance(got[1][0], ValueError)
    assert "grammar rejected" in str(got[1][0])
    assert got[0][1:] == got[1][1:] and all(isinstance(r, bool) for r in got[1][1:])
    assert torch.equal(fill_bitmask(list(zip(states[0][1:], rows[1:])), n + 2, vocab, False),
                       fill_bitmask(list(zip(states[1][1:], rows[1:])), n + 2, vocab, False, executor=pool))


def test_pool_choice_takes_the_faster_way_and_looks_again():
    """PoolChoice: each way measured once, then the one cheaper per row (its recent average), the
    other tried every `explore` steps, so a change in costs turns it around."""
    from fastlfm.structured import PoolChoice

    choice = PoolChoice(explore=4, weight=0.5)
    cost = {False: 3.0, True: 1.0}  # seconds per row of each way: the pool is faster
    picks = []
    for _ in range(12):
        pooled = choice.use_pool()
        picks.append(pooled)
        choice.record(pooled, cost[pooled] * 64, 64)
    assert picks[:2] == [False, True]  # measure both
    assert picks[2:] == [True, False, True, True, True, False, True, True, True, False]  # steps 4, 8, 12: explore
    cost = {False: 0.1, True: 1.0}  # now the loop is faster: the averages follow within a few looks
    picks = []
    for _ in range(40):
        pooled = choice.use_pool()
        picks.append(pooled)
        choice.record(pooled, cost[pooled] * 64, 64)
    assert picks[-8:] == [False, False, False, True, False, False, False, True]  # steps 48, 52: explore


def test_engine_with_grammar_threads_gives_the_same_tokens(tiny_ckpt):
    """The engine with llguidance's pool and asynchronous steps (as on CUDA) writes the same tokens
    as one matcher after the other in synchronous steps, in a batch of constrained rows (enough for
    the pool) and unconstrained ones."""
    from fastlfm.engine import LLMEngine
    from fastlfm.structured import PAR_MIN_ROWS

    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS][: PAR_MIN_ROWS + 4]
    outs = []
    for threads, async_scheduling in ((0, False), (2, True)):
        engine = LLMEngine.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", max_num_seqs=len(prompts) + 2,
                                           grammar_threads=threads, async_scheduling=async_scheduling)
        assert engine.grammar_threads == threads
        if threads:  # requests dealt over the lanes, each lane's grammar compiled on its own
            compiled = [engine.grammars.compile(SamplingParams(json_schema=SCHEMAS["array_of_objects"]), lane)
                        for lane in range(threads)]
            assert compiled[0] is not compiled[1]
        ps = [SamplingParams(max_new_tokens=80, do_sample=False, json_schema=SCHEMAS["array_of_objects"])] * len(prompts)
        ps += [SamplingParams(max_new_tokens=20, do_sample=False)] * 2
        seqs = [engine.add_request(prompt, p, request_id=str(i))
                for i, (prompt, p) in enumerate(zip(prompts + PROMPTS[:2], ps))]
        assert [s.grammar_lane for s in seqs[:4]] == ([0, 1, 0, 1] if threads else [0] * 4)
        done = {}
        while engine.has_unfinished():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        res = [done[str(i)] for i in range(len(ps))]
        outs.append([r.token_ids for r in res])
        for r in res[: len(prompts)]:
            if r.finish_reason == "length":  # a random model may write the longest strings allowed
                continue
            jsonschema.validate(json.loads(engine.tokenizer.decode(r.token_ids, skip_special_tokens=True)),
                                SCHEMAS["array_of_objects"])
        engine.check_no_leaks()
    assert outs[0] == outs[1]
    assert sum(r.finish_reason != "length" for r in res) >= len(prompts) // 2


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_argmax_first_gives_the_same_tokens_with_fewer_masks(tiny_ckpt, monkeypatch, async_scheduling):
    """Greedy steps skip the mask of a row whose grammar accepts its argmax (grammar_argmax_first): the
    tokens are those of masking every row (the masked argmax of an accepted argmax is itself), with
    fewer masks filled, for every schema and a regex at once."""
    from fastlfm.engine import LLMEngine, llm_engine

    filled = []
    real = llm_engine.fill_bitmask
    monkeypatch.setattr(llm_engine, "fill_bitmask", lambda rows, *a, **k: (filled.append(len(rows)), real(rows, *a, **k))[1])
    params = [SamplingParams(max_new_tokens=40, do_sample=False, json_schema=s) for s in SCHEMAS.values()]
    params.append(SamplingParams(max_new_tokens=40, do_sample=False, regex=r"[a-z ]{3,30}\.[0-9]{2}"))
    outs, masks = [], []
    for first in (False, True):
        engine = LLMEngine.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", max_num_seqs=len(params),
                                           async_scheduling=async_scheduling)
        engine.grammar_argmax_first = first
        filled.clear()
        outs.append([o.token_ids for o in engine.generate(["Write JSON:"] * len(params), params)])
        masks.append(sum(filled))
    assert outs[0] == outs[1]
    assert 0 < masks[1] < masks[0]
