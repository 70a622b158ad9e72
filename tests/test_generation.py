"""Generation through the user-facing APIs (model.generate, LLM, streamers, Conversation),
all on the engine.

Oracles: transformers' generate() and TextStreamer on the same fp32 weights (greedy), the
tokenizer's decode(), one-at-a-time runs, and from-scratch runs over the whole token history."""

import io
import threading
from contextlib import redirect_stdout

import pytest
import torch
import transformers

from fastlfm import Lfm2ForCausalLM
from fastlfm.generation import TextIteratorStreamer, TextStreamer
from fastlfm.llm import LLM
from fastlfm.sampling import SamplingParams
from fastlfm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(wandering_ckpt):
    return wandering_ckpt


@pytest.fixture(scope="module")
def ours(ckpt):
    return Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def ref(ckpt):
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def llm(ours, tok):
    return LLM(ours, tokenizer=tok)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(14, 1024, (n,), generator=g).tolist() for n in lengths]


def left_pad(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def hf_generate(ref, ids, mask, n, **kw):
    with torch.no_grad():
        return ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def hf_greedy(ref, rows, n, **kw):
    """transformers' greedy new tokens per row; rows that hit eos are cut after it (HF pads them)."""
    ids, mask = left_pad(rows)
    new = hf_generate(ref, ids, mask, n, **kw)[:, ids.shape[1]:].tolist()
    return [r[: r.index(7) + 1] if 7 in r else r for r in new]


NO_EOS = {7: float("-inf")}  # ours: eos can never be drawn; transformers: min_new_tokens=n does the same


# ----------------------------------------------------------------------------- model.generate
def test_model_generate_returns_what_transformers_returns(ours, ref):
    """prompt + new ids as a tensor, one prompt or a left-padded batch (rows that end early
    padded with the pad id), with and without eos."""
    for prompt in prompts_of([7, 23, 1]):
        ids = torch.tensor([prompt])
        forced = ours.generate(ids, max_new_tokens=80, logit_bias=NO_EOS)
        assert torch.equal(forced, hf_generate(ref, ids, None, 80, min_new_tokens=80))
        assert torch.equal(ours.generate(ids, max_new_tokens=80), hf_generate(ref, ids, None, 80))
    rows = prompts_of([3, 17, 9, 30, 1], seed=1)
    ids, mask = left_pad(rows)
    expected = hf_generate(ref, ids, mask, 64)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=64), expected)
    # rows that end early (a token of row 2 as eos) are padded after it, as transformers pads them
    eos = int(expected[2, ids.shape[1] + 10])
    expected = hf_generate(ref, ids, mask, 64, eos_token_id=eos)
    assert expected.shape[1] == ids.shape[1] + 64 and (expected[2, ids.shape[1] + 11:] == 0).all()
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=eos)
    assert torch.equal(got, expected)
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, eos_token_id=eos,
                        return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    # the same prompts as a list of id lists (left-padded here)
    assert torch.equal(ours.generate(rows, max_new_tokens=64, eos_token_id=eos), expected)


def test_greedy_rows_match_transformers_and_single_runs(llm, ref):
    rows = prompts_of([3, 17, 9, 30, 1], seed=1)
    batched = llm.generate(rows, max_new_tokens=64, logit_bias=NO_EOS)
    assert [r.finish_reason for r in batched] == ["length"] * 5
    assert [r.token_ids for r in batched] == hf_greedy(ref, rows, 64, min_new_tokens=64)
    assert [r.token_ids for r in batched] == [llm.generate([r], max_new_tokens=64, logit_bias=NO_EOS)[0].token_ids
                                             for r in rows]
    assert [r.num_prompt_tokens for r in batched] == [3, 17, 9, 30, 1]
    natural = llm.generate(rows, max_new_tokens=64)
    assert [r.token_ids for r in natural] == hf_greedy(ref, rows, 64)
    assert all(r.finish_reason == ("eos" if r.token_ids[-1] == 7 else "length") for r in natural)


def test_repetition_penalty_greedy_matches_transformers(tiny_ckpt):
    # The default-init fixture repeats tokens greedily, so the penalty has work to do.
    ours = Lfm2ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    for prompt in prompts_of([12, 5], seed=2):
        got = ours.generate(torch.tensor([prompt]), max_new_tokens=40, repetition_penalty=1.3)[0, len(prompt):]
        assert got.tolist() == hf_greedy(ref, [prompt], 40, repetition_penalty=1.3)[0]
        plain = ours.generate(torch.tensor([prompt]), max_new_tokens=40)[0, len(prompt):]
        assert got.tolist() != plain.tolist()  # the penalty changed the output, identically in both


def test_rows_with_their_own_params_equal_single_runs(llm):
    rows = prompts_of([4, 11, 6, 20], seed=3)
    free = [r.token_ids for r in llm.generate(rows, max_new_tokens=40)]
    eos_for_row2 = free[2][7]  # first occurrence decides where row 2 must stop
    params = [SamplingParams(do_sample=False, max_new_tokens=5), SamplingParams(do_sample=False, max_new_tokens=40),
              SamplingParams(do_sample=False, max_new_tokens=40, stop_token_ids=[eos_for_row2]),
              SamplingParams(do_sample=False, max_new_tokens=33)]
    out = llm.generate(rows, params=params)
    k = free[2].index(eos_for_row2)
    assert out[0].token_ids == free[0][:5] and out[0].finish_reason == "length"
    assert out[1].token_ids == free[1] and out[1].finish_reason == "length"
    assert out[2].token_ids == free[2][: k + 1] and out[2].finish_reason == "eos"
    assert out[3].token_ids == free[3][:33]
    for r, p, o in zip(rows, params, out):
        assert llm.generate([r], params=p)[0].token_ids == o.token_ids


def test_eos_ends_generation_and_is_left_out_of_the_text(llm, tok):
    prompt = prompts_of([9], seed=4)[0]
    free = llm.generate([prompt], max_new_tokens=30)[0].token_ids
    eos = next(t for t in free[3:] if t >= 500)  # an ordinary (non-special) token as eos
    k = free.index(eos)
    res = llm.generate([prompt], max_new_tokens=30, eos_token_id=eos)[0]
    assert res.token_ids == free[: k + 1] and res.finish_reason == "eos"
    assert res.text == tok.decode(free[:k], skip_special_tokens=True)
    ignoring = llm.generate([prompt], max_new_tokens=30, eos_token_id=eos, ignore_eos=True)[0]
    assert ignoring.token_ids == free and ignoring.finish_reason == "length"


def test_sampling_is_batch_independent_and_top_k_1_is_greedy(llm):
    rows = prompts_of([5, 14, 9], seed=5)
    mine = SamplingParams(seed=11, temperature=0.9, top_p=0.95, max_new_tokens=24)
    alone = llm.generate([rows[1]], params=mine)[0].token_ids
    others = [SamplingParams(seed=1, temperature=1.2, max_new_tokens=10), mine,
              SamplingParams(do_sample=False, max_new_tokens=30)]
    assert llm.generate(rows, params=others)[1].token_ids == alone
    assert llm.generate([rows[1]], params=mine)[0].token_ids == alone  # reproducible
    assert llm.generate([rows[1]], params=mine.merged(seed=12))[0].token_ids != alone
    greedy = [r.token_ids for r in llm.generate(rows, max_new_tokens=20)]
    assert [r.token_ids for r in llm.generate(rows, max_new_tokens=20, do_sample=True, top_k=1, seed=3)] == greedy
    assert [r.token_ids for r in llm.generate(rows, max_new_tokens=20, temperature=0.0)] == greedy


def test_logprobs_are_the_model_distribution(llm, ours):
    prompt = prompts_of([6], seed=6)[0]
    res = llm.generate([prompt], max_new_tokens=8, logprobs=2, do_sample=True, seed=0)[0]
    with torch.no_grad():
        logits = ours(torch.tensor([prompt + res.token_ids])).logits[0, len(prompt) - 1 : -1]
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(torch.tensor(res.logprobs), ref.gather(1, torch.tensor(res.token_ids)[:, None])[:, 0],
                               atol=1e-4, rtol=0)
    for step, top in enumerate(res.top_logprobs):
        values, ids = ref[step].topk(2)
        assert list(top) == ids.tolist()
        torch.testing.assert_close(torch.tensor(list(top.values())), values, atol=1e-4, rtol=0)


def test_argument_errors_are_clear(ours, llm, tok):
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(torch.tensor([[5, 6]]), top_p=0.0)
    with pytest.raises(ValueError, match="unknown sampling parameter.*beam_width"):
        ours.generate(torch.tensor([[5, 6]]), beam_width=3)
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match=r"padded shape \(2, 3\).*padding=True"):  # tokenizer(texts) unpadded
        ours.generate(input_ids=[[5, 6, 7], [8]], attention_mask=[[1, 1, 1], [1]])
    with pytest.raises(ValueError, match="single prompt"):
        ours.generate(torch.tensor([[5], [6]]), streamer=TextStreamer(tok))
    with pytest.raises(ValueError, match="2 SamplingParams for a batch of 3"):
        llm.generate([[5], [6], [7]], params=[SamplingParams()] * 2)
    with pytest.raises(ValueError, match="num_beams is not supported"):
        ours.generate(torch.tensor([[5, 6]]), num_beams=4)
    with pytest.raises(ValueError, match="output_scores is not supported"):
        ours.generate(torch.tensor([[5, 6]]), output_scores=True)
    with pytest.raises(ValueError, match="input_ids must be integer ids"):
        ours.generate(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        Lfm2ForCausalLM.from_pretrained(ours.name_or_path).generate(torch.tensor([[5, 6]]), stop_strings=["x"])
    assert not ours.get_engine().has_unfinished()  # nothing was left queued by a refused call


def test_generation_config_keyword_replaces_the_checkpoint_defaults(llm):
    prompt = prompts_of([5], seed=8)[0]
    free = llm.generate([prompt], max_new_tokens=12)[0].token_ids
    res = llm.generate([prompt], generation_config={"eos_token_id": free[3], "max_new_tokens": 12})[0]
    assert res.token_ids == free[: free.index(free[3]) + 1] and res.finish_reason == "eos"


# ----------------------------------------------------------------------------- stop strings
def find_spanning_stop(tok, ids):
    """A stop string that starts inside one generated token's text and ends in the next one."""
    texts = [tok.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    full = texts[-1]
    for k in range(2, len(ids) - 2):
        a, b, c = texts[k - 1], texts[k], texts[k + 1]
        if len(b) - len(a) >= 2 and len(c) > len(b) and full.startswith(c) and c.startswith(b) and b.startswith(a):
            stop = c[len(a) + 1 : len(b) + 1]
            if full.find(stop) == len(a) + 1 and "\ufffd" not in stop:
                return stop, k + 1  # the token that completes it is ids[k]
    raise AssertionError("no suitable stop string in this generation")


def test_generate_stops_at_a_stop_string_that_spans_tokens(ours, llm, tok):
    prompt = prompts_of([8], seed=7)[0]
    free = llm.generate([prompt], max_new_tokens=48)[0]
    stop, n_tokens = find_spanning_stop(tok, free.token_ids)
    res = llm.generate([prompt], max_new_tokens=48, stop_strings=[stop, "\u2603never"])[0]
    assert res.finish_reason == "stop"
    assert res.token_ids == free.token_ids[:n_tokens]
    assert res.text == free.text[: free.text.find(stop)] and stop not in res.text
    # model.generate with stop_strings and a tokenizer, streamed: the deltas add up to the text
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=ours.generate, kwargs=dict(
        input_ids=torch.tensor([prompt]), max_new_tokens=48, stop_strings=[stop], tokenizer=tok, streamer=streamer))
    worker.start()
    deltas = list(streamer)
    worker.join()
    assert len(deltas) > 1
    streamed = "".join(deltas)  # the streamer prints every token it was given, the stop string's last too
    assert streamed == tok.decode(free.token_ids[:n_tokens], skip_special_tokens=True)


def test_llm_stream_yields_the_final_text(llm):
    deltas = list(llm.stream("Hello there", max_new_tokens=20))
    assert "".join(deltas) == llm.last_result.text
    assert llm.last_result.text == llm.generate("Hello there", max_new_tokens=20)[0].text


def test_two_streams_consumed_in_turns(llm):
    a, b = llm.stream("Hello there", max_new_tokens=12), llm.stream("The capital", max_new_tokens=12)
    got = {"a": [], "b": []}
    for da, db in zip(a, b):
        got["a"].append(da)
        got["b"].append(db)
    got["a"] += list(a)
    got["b"] += list(b)
    assert "".join(got["a"]) == llm.generate("Hello there", max_new_tokens=12)[0].text
    assert "".join(got["b"]) == llm.generate("The capital", max_new_tokens=12)[0].text
    llm.engine.check_no_leaks()


def test_leaving_a_stream_early_aborts_its_request(llm):
    for _ in llm.stream("Hello there", max_new_tokens=50):
        break
    assert not llm.engine.has_unfinished()
    llm.engine.check_no_leaks()


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_text_streamer_prints_what_transformers_prints(ours, ref, tok, ckpt, skip_prompt):
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    prompt = tok.encode("Once upon a time")
    for kwargs in ({}, {"skip_special_tokens": True}):
        expected, got = io.StringIO(), io.StringIO()
        with redirect_stdout(expected), torch.no_grad():
            ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0,
                         streamer=transformers.TextStreamer(hf_tok, skip_prompt=skip_prompt, **kwargs))
        with redirect_stdout(got):
            ours.generate(torch.tensor([prompt]), max_new_tokens=24, streamer=TextStreamer(tok, skip_prompt, **kwargs))
        assert got.getvalue() == expected.getvalue() and len(expected.getvalue()) > 5


def test_transformers_style_streamer_gets_token_ids(ours):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    s = Collect()
    out = ours.generate(torch.tensor([[1, 600, 700]]), max_new_tokens=6, streamer=s)
    assert s.chunks[0] == [1, 600, 700] and s.chunks[1:] == [[t] for t in out[0, 3:].tolist()] and s.ended


# ----------------------------------------------------------------------------- LLM and chat
def test_llm_generate_batch_equals_single_prompts(llm):
    prompts = ["The capital of France", "Hi", "def fibonacci(n):\n    "]
    batch = llm.generate(prompts, max_new_tokens=16)
    assert [r.text for r in batch] == [llm.generate(p, max_new_tokens=16)[0].text for p in prompts]
    assert batch[1].num_prompt_tokens == len(llm.tokenizer.encode("Hi"))


def test_llm_engine_options_reach_the_engine(ours, tok):
    """LLM(engine_options=...) configures the engine that batches run on; a small max_num_seqs
    still gives every prompt its own result (the rest wait their turn)."""
    llm = LLM(ours, tokenizer=tok, engine_options={"max_num_seqs": 2, "max_model_len": 128})
    prompts = ["The capital of France", "Hi", "def fibonacci(n):\n    "]
    batch = llm.generate(prompts, max_new_tokens=8)
    assert (llm.engine.max_num_seqs, llm.engine.max_model_len) == (2, 128)
    assert [r.text for r in batch] == [llm.generate(p, max_new_tokens=8)[0].text for p in prompts]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_num_seq'\]"):
        LLM(ours, tokenizer=tok, engine_options={"max_num_seq": 2})


def test_llm_chat_uses_the_chat_template(llm, ours, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    res = llm.chat(messages, max_new_tokens=10)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert res.num_prompt_tokens == len(ids)
    assert res.token_ids == ours.generate(torch.tensor([ids]), max_new_tokens=10)[0, len(ids):].tolist()


def check_turn(conv, llm, tok, params):
    """The last reply equals a from-scratch run on the whole token history, and that history
    is exactly the rendered conversation."""
    history = conv.last_input_ids
    scratch = llm.generate([history], params=params)[0]
    assert conv.last_result.token_ids == scratch.token_ids
    assert conv.last_result.text == scratch.text
    rendered = tok.apply_chat_template(conv.messages[:-1], add_generation_prompt=True, tokenize=False)
    assert tok.decode(history, skip_special_tokens=False) == rendered


def test_conversation_cached_turns_equal_from_scratch_runs(llm, ours, tok):
    params = SamplingParams(do_sample=False, max_new_tokens=12)
    conv = llm.conversation(system="You are terse.", params=params)
    conv.send("Hello, who are you?")
    assert conv.last_result.finish_reason == "length"
    check_turn(conv, llm, tok, params)
    assert conv.last_turn_tokens == len(conv.last_input_ids)  # first turn: everything is new

    # turn 2 ends on an eos (a token of its own free-running reply), turn 3 continues after it
    probe = llm.conversation(system="You are terse.", params=params)
    probe.send("Hello, who are you?")
    probe.send("Tell me more.", max_new_tokens=30)
    eos = next(t for t in probe.last_result.token_ids[4:] if t >= 500)
    p2 = params.merged(max_new_tokens=30, stop_token_ids=[eos])
    conv.send("Tell me more.", params=p2)
    assert conv.last_result.finish_reason == "eos"
    check_turn(conv, llm, tok, p2)
    assert conv.last_turn_tokens < len(conv.last_input_ids) // 2  # only the new turn was fed

    conv.send("And then?")
    check_turn(conv, llm, tok, params)
    assert conv.last_turn_tokens < len(conv.last_input_ids) // 2
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


def test_conversation_after_a_stop_string_rebuilds_and_stays_exact(llm, ours, tok):
    params = SamplingParams(do_sample=False, max_new_tokens=24)
    conv = llm.conversation(params=params)
    conv.send("Write something.")
    text = conv.last_result.text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    conv.reset()
    conv.send("Write something.", stop_strings=[stop])
    assert conv.last_result.finish_reason == "stop"
    conv.send("Go on.")
    check_turn(conv, llm, tok, params)
    assert conv.last_turn_tokens == len(conv.last_input_ids)  # cache rebuilt from the rendered chat


def test_conversation_stream_and_reset(llm):
    conv = llm.conversation(max_new_tokens=10, do_sample=False)
    deltas = list(conv.stream("Hi"))
    assert "".join(deltas) == conv.last_result.text
    first = conv.last_result.token_ids
    conv.send("More")
    conv.reset()
    assert conv.messages == [] and conv.send("Hi") == conv.last_result.text
    assert conv.last_result.token_ids == first


def test_model_generate_and_llm_share_one_engine(ckpt, tok):
    """LLM(model, engine_options=...) and model.generate() run on one engine (one cache pool):
    generate() without options takes the engine as it is; explicit different options rebuild it."""
    model = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    llm = LLM(model, tokenizer=tok, engine_options={"max_num_seqs": 3, "max_model_len": 96})
    engine = llm.engine
    llm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4)
    model.generate(torch.tensor([[1, 600, 700]]), max_new_tokens=4)
    llm.generate(["a", "b"], max_new_tokens=4)
    assert llm.engine is engine and model.get_engine() is engine and engine.max_num_seqs == 3
    rebuilt = model.get_engine(max_num_seqs=2)
    assert rebuilt is not engine and rebuilt.max_num_seqs == 2 and model.get_engine() is rebuilt


def test_a_generation_config_overrides_only_what_it_sets_on_every_api(tmp_path, tok):
    """As in transformers: a caller's generation config replaces the checkpoint's values it sets and
    leaves the others (LLM.generate and model.generate alike); the checkpoint's own extra keys (here
    num_beams=1, a no-op, and an unknown name) are not the caller's error."""
    import json

    from fastlfm.sampling import GenerationConfig
    from fastlfm.testing import tiny_config, write_checkpoint

    folder = write_checkpoint(tmp_path / "ck", tiny_config())
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05, "num_beams": 1,
         "some_future_key": 3}))
    llm = LLM(str(folder))
    for given in ({"max_new_tokens": 7}, GenerationConfig(max_new_tokens=7)):
        p = llm.sampling_params(generation_config=given)
        assert (p.max_new_tokens, p.temperature, p.min_p, p.repetition_penalty) == (7, 0.3, 0.15, 1.05)
    p = llm.sampling_params(generation_config={"do_sample": False})
    assert not p.sampling and p.min_p == 0.15 and p.repetition_penalty == 1.05
    with pytest.raises(ValueError, match="generation_config: num_beams"):
        llm.sampling_params(generation_config={"num_beams": 4})
    # model.generate resolves through the same merge: a seeded sampled run equals LLM.generate's
    prompt = prompts_of([6], seed=3)[0]
    want = llm.generate([prompt], generation_config={"max_new_tokens": 7}, seed=11)[0].token_ids
    got = llm.model.generate(torch.tensor([prompt]), generation_config={"max_new_tokens": 7}, seed=11)
    assert got[0, len(prompt):].tolist() == want


def test_a_model_converted_after_generating_generates_as_a_fresh_one(wandering_ckpt):
    """`.to(dtype)` after generate(): the next generate() builds a new engine for the new dtype (the
    old one's cache pool and recorded steps were made for the old weights), and the projections an
    engine packed for the CPU convert with the rest: the tokens of a model converted before any engine."""
    used, fresh = Lfm2ForCausalLM.from_pretrained(wandering_ckpt), Lfm2ForCausalLM.from_pretrained(wandering_ckpt)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    used.generate(ids, max_new_tokens=6, do_sample=False)
    first = used.get_engine()
    used.to(torch.bfloat16)
    fresh.to(torch.bfloat16)
    got = used.generate(ids, max_new_tokens=16, do_sample=False)
    assert used.get_engine() is not first and used.get_engine().dtype == torch.bfloat16
    assert got.tolist() == fresh.generate(ids, max_new_tokens=16, do_sample=False).tolist()
