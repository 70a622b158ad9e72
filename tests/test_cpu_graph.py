"""Recorded steps (engine/cpu_graph.py): a replay must compute what running the step again computes,
for any values in its static inputs, and a step that reads tensors on the host must not be recorded.
The engine's batch-1 decode steps on the CPU replay one: their tokens must be the eager engine's and
the reference model's."""

import pytest
import torch

from fastlfm import cpu_gemv
from fastlfm.cpu_linear import prepare_for_cpu
from fastlfm.engine import LLMEngine
from fastlfm.engine.cpu_graph import NotReplayable, StepGraph
from fastlfm.models import Lfm2ForCausalLM
from fastlfm.sampling import SamplingParams
from fastlfm.testing import anon_huge_page_bytes, greedy_reference

needs_kernels = pytest.mark.skipif(not cpu_gemv.available(), reason="fastlfm's CPU kernels do not run here")


def _step(x, w, ids, state):
    """Ops of every kind a replay handles: functional ones with and without an `out=` form, several
    outputs, `to` and `reshape` that copy, views, in-place updates of a buffer, integer indexing."""
    h = torch.relu(x @ w)  # mm, relu: out= forms
    top = torch.topk(h, 3, dim=-1)  # two outputs
    flat = h.t().reshape(-1)  # reshape of a transposed tensor: a copy
    half = h.to(torch.bfloat16)  # a conversion: a copy
    state.mul_(0.5).add_(h[:, :4])  # in place, through a view
    picked = w[ids]  # indexing by an integer tensor
    gathered = torch.gather(h, 1, top.indices)
    return (top.values * 2, flat[:5], half.float().sum(-1), picked.sum(0), gathered, state.clone())


def test_a_replay_equals_running_the_step_again_for_new_inputs():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 8, generator=g), torch.randn(8, 16, generator=g)
    ids, state = torch.tensor([1, 5]), torch.zeros(3, 4)
    graph = StepGraph(lambda: _step(x, w, ids, state))
    for trial in range(4):  # new values in the static inputs, then replay
        x.copy_(torch.randn(3, 8, generator=g))
        w.copy_(torch.randn(8, 16, generator=g))
        ids.copy_(torch.randint(0, 8, (2,), generator=g))
        expected_state = state.clone()
        expected = _step(x.clone(), w.clone(), ids.clone(), expected_state)
        graph.replay()
        for got, want in zip(graph.output, expected):
            assert torch.equal(got, want)
        assert torch.equal(state, expected_state)
    assert len(graph.program) < graph.num_recorded  # views are not replayed


@pytest.mark.parametrize("step", [
    lambda x: x * int(x.sum()),  # .item()
    lambda x: x[x > 0],  # a boolean mask: the output's shape depends on the values
    lambda x: x.nonzero(),
    lambda x: x * 2 if torch.equal(x, x) else x,  # a bool returned to the host
], ids=["item", "mask", "nonzero", "equal"])
def test_a_step_that_reads_tensors_on_the_host_is_not_recorded(step):
    x = torch.randn(4)
    with pytest.raises(NotReplayable):
        StepGraph(lambda: step(x))


@needs_kernels
def test_an_op_that_updates_a_buffer_and_returns_a_new_tensor_replays_both():
    """conv_step writes its slot's state and returns the block's output: the replay must refill the
    recorded output, and read the slot and length from their tensors each time."""
    D, K = 64, 3
    g = torch.Generator().manual_seed(1)
    bcx, w = torch.randn(3 * D, generator=g), torch.randn(D, 1, K, generator=g)
    states, slot, past = torch.randn(3, K - 1, D, generator=g), torch.tensor([0]), torch.tensor([4])
    graph = StepGraph(lambda: cpu_gemv.conv_step(bcx, w, None, states, slot, past) * 1.0)
    for s, p in [(1, 7), (2, 0), (1, 8)]:
        bcx.copy_(torch.randn(3 * D, generator=g))
        slot.fill_(s), past.fill_(p)
        expected_states = states.clone()
        expected = cpu_gemv.conv_step(bcx, w, None, expected_states, slot, past)
        graph.replay()
        assert torch.equal(graph.output, expected) and torch.equal(states, expected_states)


GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def _run(engine, prompt):
    [out] = engine.generate([prompt], GREEDY)
    return out


@needs_kernels
@pytest.mark.parametrize("dtype, quantization", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.float32, "int8"), (torch.float32, "int4")])
def test_batch1_decode_replays_a_recorded_step_with_the_eager_tokens(wandering_ckpt, dtype, quantization):
    """One request after another in one slot (each new sequence must start from a zero conv state),
    past several KV blocks, and one that resumes a cached prefix (its conv state restored): the
    recorded step gives the eager engine's tokens (bit-equal steps: prompts run eagerly in both), and
    for an fp32 model the reference's."""
    model = Lfm2ForCausalLM.from_pretrained(wandering_ckpt, dtype=dtype)
    if quantization is not None:
        prepare_for_cpu(model, quantization)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    options = dict(max_num_seqs=1, max_model_len=96, block_size=4, num_kv_blocks=64)
    recorded, eager = LLMEngine(model, **options), LLMEngine(model, enforce_eager=True, **options)
    g = torch.Generator().manual_seed(3)
    first = torch.randint(10, 1000, (13,), generator=g).tolist()
    prompts = [first, torch.randint(10, 1000, (1,), generator=g).tolist(), first + [17, 99, 250]]
    for i, prompt in enumerate(prompts):
        forwards.clear()
        got = _run(recorded, prompt)
        # the prompt's step (and, the first time, the recording); each of the 23 decode steps is a replay,
        # and so is the step of a one-token prompt (a decode row whose sequence starts there)
        assert len(forwards) == (len(prompt) > 1) + (i == 0)
        assert got.token_ids == _run(eager, prompt).token_ids
        if quantization is None and dtype == torch.float32:
            assert got.token_ids == greedy_reference(model, prompt, GREEDY.max_new_tokens)
        if i == 2:
            assert got.num_cached_tokens == 12  # three blocks of the first prompt
    assert isinstance(recorded.runner.graphs[1], StepGraph) and not recorded.runner.prefill_sizes
    recorded.check_no_leaks()


@needs_kernels
def test_changed_weights_are_recorded_again(wandering_ckpt):
    """train() gives a packed model its nn.Linear layers back; changed there, the weights are packed
    again by the next step, which records the step again: the tokens are the new weights'."""
    model = Lfm2ForCausalLM.from_pretrained(wandering_ckpt)
    engine = LLMEngine(model, max_num_seqs=1, max_model_len=64)
    prompt = list(range(20, 31))
    assert _run(engine, prompt).token_ids == greedy_reference(model, prompt, GREEDY.max_new_tokens)
    before = engine.runner.graphs[1]
    model.train()
    with torch.no_grad():
        model.model.layers[0].feed_forward.w2.weight.mul_(-3.0)
    model.eval()
    expected = greedy_reference(model, prompt, GREEDY.max_new_tokens)
    assert _run(engine, prompt).token_ids == expected
    assert engine.runner.graphs[1] is not before


@needs_kernels
def test_a_recording_whose_replay_differs_is_not_used(wandering_ckpt, monkeypatch, caplog):
    """The runner replays a new recording once on the inputs it was recorded with: a replay that does not
    give the recorded logits (here: one that does nothing) is refused, and the step runs eagerly."""
    from fastlfm.engine import model_runner

    monkeypatch.setattr(model_runner.StepGraph, "replay", lambda self: self.output.zero_())
    model = Lfm2ForCausalLM.from_pretrained(wandering_ckpt)
    engine = LLMEngine(model, max_num_seqs=1, max_model_len=64)
    prompt = list(range(40, 52))
    assert _run(engine, prompt).token_ids == greedy_reference(model, prompt, GREEDY.max_new_tokens)
    assert isinstance(engine.runner.graphs[1], model_runner.EagerReplay)
    assert "did not give the recorded logits" in caplog.text



@needs_kernels
@pytest.mark.skipif(not cpu_gemv.huge_pages_usable(), reason="no transparent huge pages here")
def test_float_weights_move_onto_huge_pages_once_decoding_begins(tmp_path):
    """An engine moves its float weights onto huge pages from the first decode step on, not on the first
    token's path: fp32 weights (converted at load: anonymous memory) in place, the bf16 table of a bf16
    checkpoint (read in place from the file) as a copy that the head and the tied embedding both read
    between steps; the values do not change and the tokens are the eager engine's."""
    from fastlfm.cpu_linear import PlainLinear
    from fastlfm.testing import tiny_config, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_config("LFM2-350M", hidden=256, vocab_size=8192,
                                                           initializer_range=0.2), dtype=torch.bfloat16)
    prompt = list(range(60, 75))
    for dtype in (torch.float32, torch.bfloat16):
        eager = _run(LLMEngine(Lfm2ForCausalLM.from_pretrained(ckpt, dtype=dtype), max_num_seqs=1, max_model_len=64,
                               enforce_eager=True), prompt).token_ids
        model = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=dtype)
        engine = LLMEngine(model, max_num_seqs=1, max_model_len=64)
        heads = lambda: [m.weight for m in model.modules() if isinstance(m, PlainLinear) and m.weight.numel() == 8192 * 256]
        [head] = heads()
        before, table = head.clone(), model.model.embed_tokens.weight
        assert cpu_gemv.file_backed([head]) == [dtype == torch.bfloat16] and head.data_ptr() == table.data_ptr()
        engine.add_request(prompt, GREEDY)
        engine.step()  # the prompt: its first token
        assert engine.huge_page_move is None
        engine.step()  # the first decode step
        engine.huge_page_move.thread.join()
        while engine.has_unfinished():
            engine.step()
        assert _run(engine, prompt).token_ids == eager  # (its steps swap in the copies: replays recorded again)
        [head] = heads()
        assert cpu_gemv.file_backed([head]) == [False] and anon_huge_page_bytes(head) >= 2 * cpu_gemv.HUGE_PAGE
        assert torch.equal(head, before) and model.model.embed_tokens.weight.data_ptr() == head.data_ptr()
        assert not engine.huge_page_move.copies


@needs_kernels
@pytest.mark.skipif(not cpu_gemv.huge_pages_usable(), reason="no transparent huge pages here")
def test_weights_changed_while_a_move_waits_are_not_replaced_by_its_copies(tmp_path):
    """A move's copies are of the weights it started from: weights changed (train(), in place) before
    the engine took the copies are prepared again and the copies dropped, so the tokens are the
    changed model's (as an eager engine gives them: bf16 steps, bit-equal)."""
    from fastlfm.testing import tiny_config, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_config("LFM2-350M", hidden=256, vocab_size=8192,
                                                           initializer_range=0.2), dtype=torch.bfloat16)
    model = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    engine = LLMEngine(model, max_num_seqs=1, max_model_len=64)
    prompt = list(range(80, 95))
    engine.add_request(prompt, SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True))
    engine.step(), engine.step()  # the first token, then the first decode step starts the move
    engine.huge_page_move.thread.join()
    assert engine.huge_page_move.copies  # the tied table's copy, not taken yet
    model.train()
    changed = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    with torch.no_grad():
        for m in (model, changed):
            m.model.embed_tokens.weight[:, :64].mul_(-2.0)
    model.eval()
    expected = _run(LLMEngine(changed, max_num_seqs=1, max_model_len=64, enforce_eager=True), prompt).token_ids
    while engine.has_unfinished():
        engine.step()
    assert _run(engine, prompt).token_ids == expected
