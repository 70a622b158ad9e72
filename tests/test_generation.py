"""generate(), stop strings, streaming, batching and multi-turn chat.

Oracles: transformers' generate() on the same fp32 weights (greedy), one-at-a-time runs,
from-scratch runs over the whole token history, and hand-built token streams."""

import threading

import pytest
import torch
import transformers

from fastlfm import Lfm2ForCausalLM
from fastlfm.generation import (
    StopStringTracker,
    TextIteratorStreamer,
    TextStreamer,
    generate,
)
from fastlfm.llm import LLM
from fastlfm.models.lfm2 import Lfm2Cache
from fastlfm.sampling import SamplingParams
from fastlfm.testing import tiny_config, write_checkpoint
from fastlfm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # A larger init scale than training uses: greedy outputs of a random model then wander
    # over the vocabulary instead of repeating one token, so parity checks have teeth.
    return write_checkpoint(tmp_path_factory.mktemp("gen"), tiny_config("LFM2-350M", initializer_range=0.2))


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


def hf_greedy(ref, rows, n, **kw):
    """transformers' greedy generate; rows that hit eos are cut after it (HF pads them)."""
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    new = out[:, ids.shape[1]:].tolist()
    return [r[: r.index(7) + 1] if 7 in r else r for r in new]


NO_EOS = {7: float("-inf")}  # ours: eos can never be drawn; transformers: min_new_tokens=n does the same


# ----------------------------------------------------------------------------- greedy parity
def test_greedy_matches_transformers_single(ours, ref):
    for prompt in prompts_of([7, 23, 1]):
        got = ours.generate([prompt], max_new_tokens=80, logit_bias=NO_EOS)
        assert got.finish_reason == ["length"] and len(got.token_ids[0]) == 80
        assert got.token_ids[0] == hf_greedy(ref, [prompt], 80, min_new_tokens=80)[0]
        # and with eos allowed: both stop at the same eos (or run to the limit)
        natural = ours.generate([prompt], max_new_tokens=80)[0]
        assert natural.token_ids == hf_greedy(ref, [prompt], 80)[0]
        assert natural.finish_reason == ("eos" if natural.token_ids[-1] == 7 else "length")


def test_greedy_batched_matches_transformers_and_single_runs(ours, ref):
    rows = prompts_of([3, 17, 9, 30, 1], seed=1)
    batched = ours.generate(rows, max_new_tokens=64, logit_bias=NO_EOS)
    assert batched.finish_reason == ["length"] * 5
    assert batched.token_ids == hf_greedy(ref, rows, 64, min_new_tokens=64)
    assert batched.token_ids == [ours.generate([r], max_new_tokens=64, logit_bias=NO_EOS).token_ids[0] for r in rows]
    # the same batch given as a left-padded tensor and mask
    ids, mask = left_pad(rows)
    assert ours.generate(ids, attention_mask=mask, max_new_tokens=64, logit_bias=NO_EOS).token_ids == batched.token_ids
    assert [r.num_prompt_tokens for r in batched.results] == [3, 17, 9, 30, 1]
    # eos allowed: rows finish at different steps, exactly where transformers' rows do
    natural = ours.generate(rows, max_new_tokens=64)
    assert natural.token_ids == hf_greedy(ref, rows, 64)


def test_repetition_penalty_greedy_matches_transformers(tiny_ckpt):
    # The default-init fixture repeats tokens greedily, so the penalty has work to do.
    ours = Lfm2ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    rows = prompts_of([12, 5], seed=2)
    for prompt in rows:
        got = ours.generate([prompt], max_new_tokens=40, repetition_penalty=1.3).token_ids[0]
        assert got == hf_greedy(ref, [prompt], 40, repetition_penalty=1.3)[0]
        plain = ours.generate([prompt], max_new_tokens=40).token_ids[0]
        assert got != plain  # the penalty changed the output, identically in both


def test_finished_rows_drop_out_without_changing_the_others(ours, monkeypatch):
    rows = prompts_of([4, 11, 6, 20], seed=3)
    free = ours.generate(rows, max_new_tokens=40).token_ids
    eos_for_row2 = free[2][7]  # first occurrence decides where row 2 must stop
    params = [SamplingParams(do_sample=False, max_new_tokens=5), SamplingParams(do_sample=False, max_new_tokens=40),
              SamplingParams(do_sample=False, max_new_tokens=40, stop_token_ids=[eos_for_row2]),
              SamplingParams(do_sample=False, max_new_tokens=33)]
    reorders = []
    original = Lfm2Cache.reorder
    monkeypatch.setattr(Lfm2Cache, "reorder", lambda self, idx: (reorders.append(idx.tolist()), original(self, idx)))
    out = ours.generate(rows, params=params)
    assert reorders, "finished rows were never dropped from the batch"
    monkeypatch.undo()
    k = free[2].index(eos_for_row2)
    assert out.token_ids[0] == free[0][:5] and out.finish_reason[0] == "length"
    assert out.token_ids[1] == free[1] and out.finish_reason[1] == "length"
    assert out.token_ids[2] == free[2][: k + 1] and out.finish_reason[2] == "eos"
    assert out.token_ids[3] == free[3][:33]
    for r, p in zip(rows, params):
        assert ours.generate([r], params=p).token_ids[0] == out.token_ids[params.index(p)]


def test_eos_ends_generation_and_is_left_out_of_the_text(ours, tok):
    prompt = prompts_of([9], seed=4)[0]
    free = ours.generate([prompt], max_new_tokens=30, tokenizer=tok).token_ids[0]
    eos = next(t for t in free[3:] if t >= 500)  # an ordinary (non-special) token as eos
    k = free.index(eos)
    res = ours.generate([prompt], max_new_tokens=30, eos_token_id=eos, tokenizer=tok)[0]
    assert res.token_ids == free[: k + 1] and res.finish_reason == "eos"
    assert res.text == tok.decode(free[:k], skip_special_tokens=True)
    ignoring = ours.generate([prompt], max_new_tokens=30, eos_token_id=eos, ignore_eos=True, tokenizer=tok)[0]
    assert ignoring.token_ids == free and ignoring.finish_reason == "length"


def test_sampling_is_batch_independent_and_top_k_1_is_greedy(ours):
    rows = prompts_of([5, 14, 9], seed=5)
    mine = SamplingParams(seed=11, temperature=0.9, top_p=0.95, max_new_tokens=24)
    alone = ours.generate([rows[1]], params=mine).token_ids[0]
    others = [SamplingParams(seed=1, temperature=1.2, max_new_tokens=10), mine,
              SamplingParams(do_sample=False, max_new_tokens=30)]
    assert ours.generate(rows, params=others).token_ids[1] == alone
    assert ours.generate([rows[1]], params=mine).token_ids[0] == alone  # reproducible
    assert ours.generate([rows[1]], params=mine.merged(seed=12)).token_ids[0] != alone
    greedy = ours.generate(rows, max_new_tokens=20).token_ids
    assert ours.generate(rows, max_new_tokens=20, do_sample=True, top_k=1, seed=3).token_ids == greedy
    assert ours.generate(rows, max_new_tokens=20, temperature=0.0).token_ids == greedy


def test_logprobs_are_the_model_distribution(ours):
    prompt = prompts_of([6], seed=6)[0]
    res = ours.generate([prompt], max_new_tokens=8, logprobs=2, do_sample=True, seed=0)[0]
    with torch.no_grad():
        logits = ours(torch.tensor([prompt + res.token_ids])).logits[0, len(prompt) - 1 : -1]
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(torch.tensor(res.logprobs), ref.gather(1, torch.tensor(res.token_ids)[:, None])[:, 0],
                               atol=1e-4, rtol=0)
    for step, top in enumerate(res.top_logprobs):
        values, ids = ref[step].topk(2)
        assert list(top) == ids.tolist()
        torch.testing.assert_close(torch.tensor(list(top.values())), values, atol=1e-4, rtol=0)


def test_argument_errors_are_clear(ours, tok):
    with pytest.raises(ValueError, match="top_p"):
        ours.generate([[5, 6]], top_p=0.0)
    with pytest.raises(ValueError, match="unknown sampling parameter.*beam_width"):
        ours.generate([[5, 6]], beam_width=3)
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="single prompt"):
        ours.generate([[5], [6]], streamer=TextStreamer(tok), tokenizer=tok)
    with pytest.raises(ValueError, match="2 SamplingParams for a batch of 3"):
        ours.generate([[5], [6], [7]], params=[SamplingParams()] * 2)
    with pytest.raises(ValueError, match="num_beams is not supported"):
        ours.generate([[5, 6]], num_beams=4)


def test_generation_config_keyword_replaces_the_checkpoint_defaults(ours):
    prompt = prompts_of([5], seed=8)[0]
    free = ours.generate([prompt], max_new_tokens=12).token_ids[0]
    res = ours.generate([prompt], generation_config={"eos_token_id": free[3], "max_new_tokens": 12})[0]
    assert res.token_ids == free[: free.index(free[3]) + 1] and res.finish_reason == "eos"


def test_cpu_weight_layout_switch_keeps_weights_names_and_ties(tmp_path, ckpt):
    model = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = list(model.parameters())
    ids = torch.tensor([[1, 600, 700, 800]])
    with torch.no_grad():
        logits_standard = model(ids).logits
    model.generate(ids, max_new_tokens=2)  # one row: input-major storage
    assert not model.model.layers[0].feed_forward.w1.weight.is_contiguous()
    assert model.lm_head.weight is model.model.embed_tokens.weight and list(model.parameters()) == params_before
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits_standard, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)  # saving writes the usual layout
    reloaded = Lfm2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(torch.equal(reloaded.state_dict()[k], before[k]) for k in before)
    model.generate(torch.cat([ids, ids]), max_new_tokens=2)  # several rows: standard storage again
    assert all(p.is_contiguous() for p in model.parameters())


# ----------------------------------------------------------------------------- stop strings
class PieceTokenizer:
    """A hand-made tokenizer: id i decodes to pieces[i] (an independent oracle)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def feed(tracker, ids):
    deltas = [tracker.add(i) for i in ids]
    return deltas + [tracker.finish()]


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    pieces = ["He", "llo", " wo", "rld", "!"]
    tr = StopStringTracker(PieceTokenizer(pieces), ["o wor"])
    deltas = [tr.add(i) for i in range(4)]
    assert deltas == ["He", "ll", "", ""]  # "o" and then "o wo" are held: they may start the stop string
    assert tr.stopped and tr.text == "Hell" and tr.finish() == ""


def test_held_prefix_is_released_when_the_stop_string_does_not_complete():
    tr = StopStringTracker(PieceTokenizer(["ab", "cx", "yq", "xy"]), ["xyz"])
    assert feed(tr, [0, 1, 2, 3]) == ["ab", "c", "xyq", "", "xy"]
    assert not tr.stopped and tr.text == "abcxyqxy"


def test_earliest_of_several_stop_strings_wins():
    tr = StopStringTracker(PieceTokenizer(["a", "bcd", "ef"]), ["def", "cd", "zzz"])
    feed(tr, [0, 1, 2])
    assert tr.stopped and tr.text == "ab"


def test_streamed_text_never_splits_utf8(tok):
    text = "héllo wörld 🙂 naïve — 日本語"
    ids = tok.encode(text, add_special_tokens=False)
    tr = StopStringTracker(tok, [])
    deltas = feed(tr, ids)
    assert "\ufffd" not in "".join(deltas) and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == tr.text


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


def test_generate_stops_at_a_stop_string_that_spans_tokens(ours, tok):
    prompt = prompts_of([8], seed=7)[0]
    free = ours.generate([prompt], max_new_tokens=48, tokenizer=tok)[0]
    stop, n_tokens = find_spanning_stop(tok, free.token_ids)
    res = ours.generate([prompt], max_new_tokens=48, stop_strings=[stop, "\u2603never"], tokenizer=tok)[0]
    assert res.finish_reason == "stop"
    assert res.token_ids == free.token_ids[:n_tokens]
    assert res.text == free.text[: free.text.find(stop)] and stop not in res.text
    # streamed: the deltas add up to the final text, so no part of the stop string leaked
    streamer = TextIteratorStreamer(tok)
    worker = threading.Thread(target=ours.generate, kwargs=dict(
        input_ids=[prompt], max_new_tokens=48, stop_strings=[stop], tokenizer=tok, streamer=streamer))
    worker.start()
    deltas = list(streamer)
    worker.join()
    assert "".join(deltas) == res.text and len(deltas) > 1


def test_llm_stream_yields_the_final_text(llm):
    deltas = list(llm.stream("Hello there", max_new_tokens=20))
    assert "".join(deltas) == llm.last_result.text
    assert llm.last_result.text == llm.generate("Hello there", max_new_tokens=20)[0].text


def test_text_streamer_prints_prompt_and_text(ours, tok, capsys):
    prompt = tok.encode("Once upon a time")
    res = ours.generate([prompt], max_new_tokens=12, tokenizer=tok, streamer=TextStreamer(tok))[0]
    assert capsys.readouterr().out == tok.decode(prompt, skip_special_tokens=True) + res.text + "\n"
    ours.generate([prompt], max_new_tokens=12, tokenizer=tok, streamer=TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out == res.text + "\n"


def test_transformers_style_streamer_gets_token_ids(ours, tok):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    s = Collect()
    res = ours.generate([[1, 600, 700]], max_new_tokens=6, streamer=s, tokenizer=tok)[0]
    assert s.chunks[0] == [1, 600, 700] and s.chunks[1:] == [[t] for t in res.token_ids] and s.ended


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
    assert res.token_ids == ours.generate([ids], max_new_tokens=10).token_ids[0]


def check_turn(conv, ours, tok, params):
    """The last reply equals a from-scratch run on the whole token history, and that history
    is exactly the rendered conversation."""
    history = conv.last_input_ids
    scratch = ours.generate([history], params=params, tokenizer=tok)[0]
    assert conv.last_result.token_ids == scratch.token_ids
    assert conv.last_result.text == scratch.text
    rendered = tok.apply_chat_template(conv.messages[:-1], add_generation_prompt=True, tokenize=False)
    assert tok.decode(history, skip_special_tokens=False) == rendered


def test_conversation_cached_turns_equal_from_scratch_runs(llm, ours, tok):
    params = SamplingParams(do_sample=False, max_new_tokens=12)
    conv = llm.conversation(system="You are terse.", params=params)
    conv.send("Hello, who are you?")
    assert conv.last_result.finish_reason == "length"
    check_turn(conv, ours, tok, params)
    assert conv.last_turn_tokens == len(conv.last_input_ids)  # first turn: everything is new

    # turn 2 ends on an eos (a token of its own free-running reply), turn 3 continues after it
    probe = llm.conversation(system="You are terse.", params=params)
    probe.send("Hello, who are you?")
    probe.send("Tell me more.", max_new_tokens=30)
    eos = next(t for t in probe.last_result.token_ids[4:] if t >= 500)
    p2 = params.merged(max_new_tokens=30, stop_token_ids=[eos])
    conv.send("Tell me more.", params=p2)
    assert conv.last_result.finish_reason == "eos"
    check_turn(conv, ours, tok, p2)
    assert conv.last_turn_tokens < len(conv.last_input_ids) // 2  # only the new turn was fed

    conv.send("And then?")
    check_turn(conv, ours, tok, params)
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
    check_turn(conv, ours, tok, params)
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
