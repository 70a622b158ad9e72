"""The batched sampler against independent oracles: transformers' logits processors, hand
computations, and the filtered softmax (chi-square on many seeded draws)."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fastlfm.sampling import (SamplingParams, SamplingTensors, apply_penalties, eos_token_ids, filter_logits, resolve_params,
                              sample)

V = 200


def tensors(params, prompts=None, outputs=None, vocab=V, steps=None):
    return SamplingTensors.from_requests(params, prompts, outputs, vocab, steps=steps)


def random_logits(rows, vocab=V, seed=0, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("temperature", -0.1), ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0),
    ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("seed", "x"), ("stop_strings", "abc"),
    ("stop_strings", [""]), ("stop_token_ids", [-1]), ("logprobs", 21), ("logit_bias", {-3: 1.0}),
    ("temperature", float("nan")),
])
def test_validate_names_field_and_value(field, value):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value}).validate()
    assert field in str(e.value) and repr(value) in str(e.value)


def test_validate_rejects_sampling_at_zero_temperature_and_ids_beyond_vocab():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(do_sample=True, temperature=0.0).validate()
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[500]).validate(vocab_size=100)
    assert SamplingParams(stop_token_ids=[99]).validate(vocab_size=100).stop_token_ids == [99]


def test_from_generation_config_defaults_and_overrides():
    cfg = {"bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0, "temperature": 0.3, "min_p": 0.15,
           "repetition_penalty": 1.05, "max_new_tokens": 99}
    p = SamplingParams.from_generation_config(cfg)
    assert p.stop_token_ids == [] and p.temperature == 0.3 and p.min_p == 0.15  # eos: the engine's (eos_token_ids)
    assert p.repetition_penalty == 1.05 and p.max_new_tokens == 99
    assert p.sampling is False  # like transformers: no do_sample in the config means greedy
    assert SamplingParams.from_generation_config({**cfg, "do_sample": True}).sampling is True
    assert SamplingParams.from_generation_config(cfg, temperature=0.7).sampling is True  # a knob was asked for
    assert SamplingParams.from_generation_config(cfg, temperature=0.7, do_sample=False).sampling is False
    assert SamplingParams.from_generation_config(cfg, temperature=0.0).sampling is False
    assert SamplingParams.from_generation_config(cfg, stop_token_ids=5).stop_token_ids == [5]
    assert SamplingParams.from_generation_config(None).stop_token_ids == []
    with pytest.raises(ValueError, match="top_q"):
        SamplingParams.from_generation_config(cfg, top_q=0.5)
    with pytest.raises(ValueError, match="skip_special_tokens"):
        SamplingParams.from_generation_config(cfg, skip_special_tokens="no")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config(cfg, top_p=2.0)


def test_eos_token_ids_one_rule():
    """generation_config.json's eos (an int or a list) first, then the model config's, then the
    tokenizer's."""
    assert eos_token_ids({"eos_token_id": [7, 2]}, 5, 9) == {7, 2}
    assert eos_token_ids({"eos_token_id": 7}, 5, 9) == {7}
    assert eos_token_ids({"bos_token_id": 1}, 5, 9) == {5}
    assert eos_token_ids(None, None, 9) == {9}
    assert eos_token_ids(None, [3, 4]) == {3, 4}
    assert eos_token_ids({}, None, None) == frozenset()


def test_resolve_params_hf_keywords():
    rows = resolve_params(None, {"temperature": 0.3}, 2, 100, max_tokens=5, stop="x", eos_token_id=[4, 5],
                          use_cache=True)
    assert len(rows) == 2 and rows[0] == rows[1]
    assert (rows[0].max_new_tokens, rows[0].stop_strings, rows[0].stop_token_ids) == (5, ["x"], [4, 5])
    # an explicit generation_config overrides what it sets, the rest stays the defaults' (transformers'
    # rule); its eos ends generation too
    p, = resolve_params(None, {"temperature": 0.3}, 1, 100, generation_config={"eos_token_id": 9, "top_k": 3})
    assert p.stop_token_ids == [9] and p.top_k == 3 and p.temperature == 0.3
    with pytest.raises(ValueError, match="num_beams is not supported"):
        resolve_params(None, None, 1, 100, num_beams=2)
    assert resolve_params(None, None, 1, 100, num_beams=1)[0] == SamplingParams.from_generation_config(None)
    with pytest.raises(ValueError, match="got 1 SamplingParams for a batch of 2"):
        resolve_params([SamplingParams()], None, 2)


# ----------------------------------------------------------------------------- filters vs transformers
def hf_filter(logits, temperature, top_k, top_p, min_p):
    """transformers' warpers in generate()'s order; -inf marks removed tokens."""
    x = logits.clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    if temperature != 1.0:
        x = TemperatureLogitsWarper(temperature)(ids, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(ids, x)
    x = MinPLogitsWarper(min_p)(ids, x)
    return x


SETTINGS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 10, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.1), (0.5, 40, 0.8, 0.05),
    (1.0, 0, 0.5, 0.0), (2.0, 5, 0.99, 0.3), (1.0, 0, 1.0, 0.0), (0.3, 0, 1.0, 0.15),
]


def test_filters_keep_the_token_sets_transformers_keeps_per_row():
    """One batch, a different setting per row: each row keeps exactly the tokens that
    transformers' warpers keep for that row's setting."""
    logits = random_logits(len(SETTINGS), seed=1)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, seed=0) for t, k, p, m in SETTINGS]
    ours = filter_logits(logits, tensors(params))
    for row, (t, k, p, m) in enumerate(SETTINGS):
        ref = hf_filter(logits[row : row + 1], t, k, p, m)[0]
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(ref)), SETTINGS[row]
        kept = torch.isfinite(ref)
        torch.testing.assert_close(ours[row][kept], ref[kept])


def test_filters_by_hand():
    # probabilities 0.4, 0.3, 0.2, 0.1 (already a distribution; logits = log p)
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    logits = probs.log()

    def kept(**kw):
        out = filter_logits(logits, tensors([SamplingParams(seed=0, **kw)], vocab=4))
        return set(torch.nonzero(torch.isfinite(out[0])).flatten().tolist())

    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=3) == {1, 2, 3}
    assert kept(top_p=0.5) == {1, 3}  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    assert kept(top_p=0.35) == {1}  # the top token alone reaches 0.35
    assert kept(top_p=0.75) == {1, 2, 3}
    assert kept(min_p=0.45) == {1, 3, 2}  # keep p >= 0.45 * 0.4 = 0.18
    assert kept(min_p=0.6) == {1, 3}  # keep p >= 0.24
    assert kept(top_k=3, top_p=0.6) == {1, 3}  # top_p on the renormalised top-3
    assert kept() == {0, 1, 2, 3}


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    out = filter_logits(logits, tensors([SamplingParams(top_k=2, seed=0)], vocab=5))
    assert torch.isfinite(out[0]).tolist() == [False, True, True, True, False]  # as transformers


# ----------------------------------------------------------------------------- penalties
def test_repetition_penalty_matches_transformers():
    logits = random_logits(3, seed=2)
    prompts = [[1, 5, 9, 5], [3, 4], [10]]
    outputs = [[9, 11], [12, 3, 3], []]
    penalties = [1.3, 0.8, 1.05]
    ours = apply_penalties(logits, tensors([SamplingParams(repetition_penalty=r) for r in penalties],
                                           prompts, outputs))
    for row in range(3):
        history = torch.tensor([prompts[row] + outputs[row]])
        ref = RepetitionPenaltyLogitsProcessor(penalties[row])(history, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], ref, rtol=0, atol=1e-6)


def test_presence_frequency_penalties_and_logit_bias_by_hand():
    logits = random_logits(1, vocab=10, seed=3)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={2: 3.0, 4: -100.0})
    out = apply_penalties(logits, tensors([p], [[1, 1, 6]], [[6, 6, 8, 1]], vocab=10))
    expected = logits.clone()
    expected[0, 2] += 3.0
    expected[0, 4] -= 100.0
    # OpenAI: generated tokens only (the prompt's 1s and 6 do not count), c * freq + (c > 0) * presence
    for tok, count in {6: 2, 8: 1, 1: 1}.items():
        expected[0, tok] -= count * 0.25 + 0.5
    torch.testing.assert_close(out, expected)


def test_advance_equals_rebuilding_from_the_history():
    params = [SamplingParams(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.1, seed=4)] * 2
    prompts, outputs = [[1, 2], [3]], [[], []]
    t = tensors(params, prompts, outputs)
    active = torch.tensor([True, False])
    for tok in ([5, 7], [5, 8], [9, 9]):
        t.advance(torch.tensor(tok), active)
        outputs[0].append(tok[0])  # row 1 is inactive: nothing recorded
    rebuilt = tensors(params, prompts, outputs)
    assert torch.equal(t.seen, rebuilt.seen) and torch.equal(t.output_counts, rebuilt.output_counts)
    assert t.step.tolist() == [3, 0] == rebuilt.step.tolist()


# ----------------------------------------------------------------------------- drawing
def test_greedy_rows_take_the_argmax_of_the_penalised_logits():
    logits = random_logits(4, seed=5)
    params = [SamplingParams(do_sample=False), SamplingParams(temperature=0.0),
              SamplingParams(do_sample=False, repetition_penalty=5.0), SamplingParams(temperature=1.0, seed=1)]
    top = logits.argmax(-1)
    out = sample(logits, tensors(params, [[], [], [top[2].item()], []]))
    assert out.token_ids[0] == top[0] and out.token_ids[1] == top[1]
    assert out.token_ids[2] == apply_penalties(logits[2:3], tensors(params[2:3], [[top[2].item()]], None)).argmax()
    assert out.token_ids[2] != top[2]


@pytest.mark.parametrize("kw", [dict(top_k=1, temperature=1.5), dict(temperature=1e-4, do_sample=True)])
def test_top_k_1_and_tiny_temperature_equal_greedy(kw):
    logits = random_logits(64, seed=6)
    out = sample(logits, tensors([SamplingParams(seed=s, **kw) for s in range(64)]))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_fixed_seed_reproduces_alone_and_in_any_batch_position():
    logits = random_logits(1, seed=7, scale=1.0)[0]
    mine = SamplingParams(seed=1234, temperature=0.9, top_p=0.95)
    others = [SamplingParams(seed=s, temperature=0.5 + 0.1 * s, top_k=5 * s) for s in range(5)]
    alone = [sample(logits[None], tensors([mine], steps=[step])).token_ids.item() for step in range(20)]
    assert len(set(alone)) > 5  # different steps draw different numbers
    for pos in (0, 3, 5):
        batch = others[:pos] + [mine] + others[pos:]
        got = [sample(logits.expand(len(batch), -1), tensors(batch, steps=[step] * len(batch))).token_ids[pos].item()
               for step in range(20)]
        assert got == alone
    # and a different seed gives a different sequence
    other = [sample(logits[None], tensors([SamplingParams(seed=99, temperature=0.9, top_p=0.95)],
                                          steps=[s])).token_ids.item() for s in range(20)]
    assert other != alone


def test_unseeded_rows_follow_torch_manual_seed():
    logits = random_logits(8, seed=8, scale=0.5)
    torch.manual_seed(0)
    a = sample(logits, tensors([SamplingParams()] * 8)).token_ids
    torch.manual_seed(0)
    b = sample(logits, tensors([SamplingParams()] * 8)).token_ids
    assert torch.equal(a, b)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = (probs > 0).sum() - 1
    return float(torch.special.gammaincc(dof.double() / 2, stat.double() / 2))  # chi2 survival function


@pytest.mark.parametrize("setting", [dict(), dict(temperature=0.7, top_k=6), dict(top_p=0.8),
                                     dict(temperature=1.5, min_p=0.1), dict(repetition_penalty=2.0)])
def test_draws_follow_the_filtered_softmax(setting):
    """Many seeded draws (one per row: seeds 0..N-1; and one per step: steps 0..N-1) have the
    frequencies of softmax(filtered logits), where the filter is transformers' own."""
    vocab, n = 12, 30000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(9))
    history = [[3, 4]]
    ref = logits.clone()
    if "repetition_penalty" in setting:
        ref = RepetitionPenaltyLogitsProcessor(setting["repetition_penalty"])(torch.tensor(history), ref)
    ref = hf_filter(ref, setting.get("temperature", 1.0), setting.get("top_k", 0), setting.get("top_p", 1.0),
                    setting.get("min_p", 0.0))
    probs = ref.softmax(-1)[0]
    support = probs > 0
    # across seeds, one batch
    params = [SamplingParams(seed=s, **setting) for s in range(n)]
    ids = sample(logits.expand(n, -1), tensors(params, history * n, vocab=vocab)).token_ids
    counts = torch.bincount(ids, minlength=vocab).double()
    assert counts[~support].sum() == 0  # never a filtered-out token
    assert chi_square_p_value(counts[support], probs[support].double()) > 1e-3
    # across steps, one seed
    t = tensors([SamplingParams(seed=5, **setting)] * n, history * n, vocab=vocab, steps=list(range(n)))
    ids = sample(logits.expand(n, -1), t).token_ids
    counts = torch.bincount(ids, minlength=vocab).double()
    assert counts[~support].sum() == 0
    assert chi_square_p_value(counts[support], probs[support].double()) > 1e-3


def test_chi_square_check_has_power():
    """The statistic used above does reject a wrong distribution (guards the test itself)."""
    vocab, n = 12, 30000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(9))
    ids = sample(logits.expand(n, -1), tensors([SamplingParams(seed=s, temperature=1.1) for s in range(n)],
                                               vocab=vocab)).token_ids
    counts = torch.bincount(ids, minlength=vocab).double()
    assert chi_square_p_value(counts, logits.softmax(-1)[0].double()) < 1e-6


def test_logprobs_are_the_raw_model_distribution():
    logits = random_logits(3, seed=10)
    params = [SamplingParams(seed=1, logprobs=3, temperature=0.5, top_k=4), SamplingParams(do_sample=False, logprobs=0),
              SamplingParams(seed=2)]
    out = sample(logits, tensors(params))
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    values, ids = ref.topk(3, dim=-1)
    assert torch.equal(out.top_token_ids, ids)
    torch.testing.assert_close(out.top_logprobs, values)
    assert math.isclose(out.top_logprobs[0].exp().sum().item(), ref[0].exp()[ids[0]].sum().item(), rel_tol=1e-5)


def test_select_keeps_rows():
    params = [SamplingParams(seed=s, temperature=0.5 + s / 10, repetition_penalty=1.1) for s in range(4)]
    t = tensors(params, [[1], [2], [3], [4]])
    sub = t.select(torch.tensor([3, 1]))
    ref = tensors([params[3], params[1]], [[4], [2]])
    for name in ("temperature", "seed_lo", "seed_hi", "step", "repetition_penalty", "seen"):
        assert torch.equal(getattr(sub, name), getattr(ref, name)), name


@pytest.mark.parametrize("temperature", [9e-6, 1e-30, 1e-38, 1e-45, 5e-324])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature):
    """Below MIN_TEMPERATURE the row is greedy: dividing float32 logits by 1e-38 gives inf (and by
    1e-45 or 5e-324, inf and nan), which drew garbage instead of the argmax."""
    from fastlfm.sampling import MIN_TEMPERATURE

    assert temperature < MIN_TEMPERATURE
    logits = random_logits(16, seed=8)
    for kw in ({}, {"do_sample": True}, {"top_p": 0.9, "top_k": 5}):
        params = [SamplingParams(temperature=temperature, seed=s, **kw) for s in range(16)]
        assert not any(p.validate().sampling for p in params)
        assert torch.equal(sample(logits, tensors(params)).token_ids, logits.argmax(-1))
    assert SamplingParams(temperature=MIN_TEMPERATURE).sampling


def test_uniforms_stay_inside_the_open_interval():
    """Every 32-bit hash maps into (0, 1): the largest one would round to 1.0 in float32, making the
    Gumbel noise +inf and a filtered-out (-inf) logit NaN, which argmax would pick."""
    from fastlfm.sampling import unit_interval

    bits = torch.tensor([0, 1, 255, 256, 2 ** 31, 2 ** 32 - 257, 2 ** 32 - 256, 2 ** 32 - 1], dtype=torch.int64)
    u = unit_interval(bits)
    assert bool((u > 0).all()) and bool((u < 1).all())
    gumbel = -torch.log(-torch.log(u))
    assert bool(torch.isfinite(gumbel).all())
    logits = torch.full((len(bits),), float("-inf"))
    logits[0] = 0.0  # the one allowed token wins against every noise value
    assert int((logits + gumbel).argmax()) == 0


def test_cpu_draw_among_kept_tokens_equals_the_full_pass():
    """On the CPU a draw hashes only the tokens the filters kept: the same token as the Gumbel-max
    over the whole row (uniforms of every id), for min_p / top_k / top_p rows, a row under an allowed
    mask, rows of tied logits, over many steps; and no shortcut when most tokens are kept."""
    from fastlfm.sampling import _draw_among_kept, uniforms

    params = [SamplingParams(seed=3, temperature=0.3, min_p=0.15), SamplingParams(seed=4, top_k=7),
              SamplingParams(seed=5, top_p=0.5), SamplingParams(seed=6, temperature=2.0, top_k=3)]
    logits = random_logits(len(params) + 1, seed=11)
    logits[-1] = 0.0  # all tied: the row below keeps 4 equal logits
    allowed = torch.zeros(len(params) + 1, V, dtype=torch.bool)
    allowed[:] = True
    allowed[-1] = False
    allowed[-1, [5, 17, 90, 150]] = True
    params = params + [SamplingParams(seed=7, top_k=50)]
    for step in range(40):
        t = tensors(params, steps=[step] * len(params))
        t.allowed = allowed
        filtered = filter_logits(apply_penalties(logits, t), t)
        u = uniforms(t.seed_lo, t.seed_hi, t.step, V)
        full = (filtered - torch.log(-torch.log(u))).argmax(-1)
        sparse = _draw_among_kept(filtered, t)
        assert sparse is not None and torch.equal(sparse, full), step
        assert sample(logits, t).token_ids.tolist() == full.tolist()
    wide = tensors([SamplingParams(seed=1, temperature=0.7)])  # nothing filtered: the full pass
    assert _draw_among_kept(filter_logits(random_logits(1), wide), wide) is None
