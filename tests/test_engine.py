"""Engine tests (CPU): continuous batching, chunked prefill, preemption and aborts must give
exactly the tokens of the reference model (Lfm2ForCausalLM + Lfm2Cache, parity-tested
against transformers), and every KV block and conv slot must come back."""

import asyncio
import os

import pytest
import torch

from fastlfm.engine import AsyncLLMEngine, LLMEngine, PagedContext
from fastlfm.engine.model_runner import ModelRunner
from fastlfm.models import Lfm2ForCausalLM
from fastlfm.models.lfm2 import RMSNorm
from fastlfm.sampling import SamplingParams
from fastlfm.testing import greedy_reference

NEW = 8


@pytest.fixture(scope="module")
def reference(model, prompts):
    """Greedy continuation of each prompt, one sequence at a time, token by token."""
    return [greedy_reference(model, p, NEW) for p in prompts]


GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)


def run_staggered(engine, prompts, arrive_at, params=GREEDY):
    """Add prompt i before step arrive_at[i]; run to completion; outputs by prompt index."""
    finals, step, pending = {}, 0, sorted(range(len(prompts)), key=lambda i: arrive_at[i])
    ids = {}
    while pending or engine.has_unfinished():
        while pending and arrive_at[pending[0]] <= step:
            i = pending.pop(0)
            ids[engine.add_request(prompts[i], params, f"r{i}").request_id] = i
        for out in engine.step():
            if out.finished:
                finals[ids[out.request_id]] = out
        step += 1
    return [finals[i] for i in range(len(prompts))]


def test_mixed_lengths_arriving_at_different_steps(model, prompts, reference, async_scheduling):
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=8, max_model_len=64)
    outs = run_staggered(engine, prompts, arrive_at=[0, 0, 2, 3, 7])
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" and o.num_prompt_tokens == len(p) for o, p in zip(outs, prompts))
    engine.check_no_leaks()


def test_chunked_prefill_tiny_budget(model, prompts, reference, async_scheduling):
    # 3 tokens a step: every prompt but the 1-token one is split, decodes share steps with chunks.
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=4, max_model_len=64,
                       max_num_batched_tokens=3, block_size=4)
    outs = run_staggered(engine, prompts, arrive_at=[0, 1, 1, 2, 4])
    assert [o.token_ids for o in outs] == reference
    engine.check_no_leaks()


def test_preemption_with_tiny_cache(model, prompts, reference, async_scheduling):
    # 12 blocks of 4 tokens hold 48 tokens in all: the batch cannot fit, sequences get preempted
    # and recomputed from prompt + outputs so far.
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=4, max_model_len=48, num_kv_blocks=12,
                       block_size=4,
                       max_num_batched_tokens=16)
    outs = run_staggered(engine, prompts, arrive_at=[0, 0, 0, 0, 0])
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference
    engine.check_no_leaks()


def test_aborts_free_everything_and_leave_others_exact(model, prompts, reference, async_scheduling):
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=8, max_model_len=64,
                       max_num_batched_tokens=8, block_size=4)
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY, f"r{i}")
    finals = {}
    for step in range(200):
        if step == 2:
            out = engine.abort("r3")  # mid-prefill (37 tokens, 8 a step)
            assert out.finished and out.finish_reason == "abort"
        if step == 6:
            engine.abort("r0")  # mid-decode
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if not engine.has_unfinished():
            break
    assert engine.abort("r0") is None  # aborting twice is a no-op, not a double free
    assert set(finals) == {"r1", "r2", "r4"}
    for i in (1, 2, 4):
        assert finals[f"r{i}"].token_ids == reference[i]
    engine.check_no_leaks()


def test_async_scheduling_launches_before_reading(model, prompts, reference):
    """Async: each step() launches the next forward before reading the previous step's ids,
    which reach the next forward on the device; outputs lag one call behind."""
    engine = LLMEngine(model, async_scheduling=True, max_num_seqs=4, max_model_len=64)
    engine.add_request(prompts[1], GREEDY, "r")
    assert engine.step() == [] and engine.in_flight is not None  # prefill launched, nothing read
    seq = engine.requests["r"]
    assert seq.token_ids[-1] == -1 and seq.in_flight_row == 0  # its first token is still on the device
    got = []
    while engine.has_unfinished():
        outs = engine.step()
        got += [t for o in outs for t in o.new_token_ids]
        if len(got) < NEW:
            assert engine.in_flight is not None  # the next step already runs while these are read
    assert got == reference[1]
    engine.check_no_leaks()


def test_static_decode_buffers_match_reference(model, prompts, reference, async_scheduling):
    """The CUDA-graph decode path (static input buffers, batch padded up the ladder, padding
    block/slot rows, block tables kept per slot on the device and uploaded incrementally,
    in-flight ids copied into the static ids) on CPU, with the graph replay done eagerly on
    the same buffers."""
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=8, max_model_len=64, block_size=4)
    engine.runner.capture_graphs(8)  # ladder 1, 2, 4, 8
    runner, batches = engine.runner, []
    run_graph = runner._run_graph
    runner._run_graph = lambda seqs, *a: (batches.append(len(seqs)), run_graph(seqs, *a))[1]
    outs = run_staggered(engine, prompts, arrive_at=[0, 0, 2, 3, 7])
    assert [o.token_ids for o in outs] == reference
    assert {3, 5} & set(batches)  # batches that are padded up to a graph size (4, 8) ran
    engine.check_no_leaks()


def test_graph_block_tables_follow_slot_reuse_and_preemption(model, prompts, reference, async_scheduling):
    """Per-slot device block tables stay right when a slot passes to a new request and when
    a preempted request comes back with new blocks (2 slots, 12 blocks of 4 tokens)."""
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=2, max_model_len=48,
                       num_kv_blocks=12, block_size=4, max_num_batched_tokens=16)
    engine.runner.capture_graphs(2)
    graph_steps = []
    run_graph = engine.runner._run_graph
    engine.runner._run_graph = lambda seqs, *a: (graph_steps.append(len(seqs)), run_graph(seqs, *a))[1]
    outs = run_staggered(engine, prompts, arrive_at=[0, 0, 0, 0, 0])
    assert engine.scheduler.num_preemptions > 0 and graph_steps
    assert [o.token_ids for o in outs] == reference
    engine.check_no_leaks()


@pytest.mark.parametrize("budget", [7, 16])
def test_prefill_graph_steps_match_reference(model, prompts, reference, async_scheduling, budget):
    """Steps that prefill (one prompt chunk alone, or chunks mixed with decodes) replay a prefill
    graph (on CPU: eagerly, on the same static buffers), padded up to the graph's rows and tokens by
    padding rows. Budget 7: chunks that continue mid-block (past 7, 14, ...); 16: chunks that fill
    the graph's tokens exactly (an empty padding row) and shorter ones; staggered arrivals: mixed
    steps, whose decode rows take their token of the step in flight on the device."""
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=8, max_model_len=64, block_size=4,
                       max_num_batched_tokens=budget)
    engine.runner.capture_graphs(8)
    engine.runner.enable_prefill_graphs(budget, lazy=budget == 7)  # 16: every size captured now
    if budget == 16:  # rows 2, 4, 8, 9 x tokens 16 (a row takes at least one token)
        assert sorted(engine.runner.prefill_graphs) == [(2, 16), (4, 16), (8, 16), (9, 16)]
    steps = []
    run_prefill = engine.runner._run_prefill_graph
    engine.runner._run_prefill_graph = lambda seqs, counts, *a: (steps.append(list(counts)),
                                                                 run_prefill(seqs, counts, *a))[1]
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert alone == reference
    assert [budget] in steps and any(len(c) == 1 and c[0] < budget for c in steps)
    steps.clear()
    outs = run_staggered(engine, prompts, arrive_at=[0, 0, 2, 3, 7])
    assert [o.token_ids for o in outs] == reference
    assert any(1 in c and max(c) > 1 for c in steps)  # a decode row beside a prompt chunk
    engine.check_no_leaks()


def test_stop_token_and_max_model_len(model, prompts, reference, async_scheduling):
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=4, max_model_len=40)
    stop_tok = reference[0][3]
    first = reference[0].index(stop_tok)
    outs = engine.generate([prompts[0], prompts[3]],
                           [SamplingParams(max_new_tokens=NEW, temperature=0.0, stop_token_ids=[stop_tok]), GREEDY])
    assert outs[0].finish_reason == "eos" and outs[0].token_ids == reference[0][: first + 1]
    # 37-token prompt, max_model_len 40: three new tokens, then "length".
    assert outs[1].finish_reason == "length" and outs[1].token_ids == reference[3][:3]
    with pytest.raises(ValueError, match="max_model_len=40"):
        engine.add_request(list(range(10, 51)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    engine.check_no_leaks()


def test_seeded_sampling_is_independent_of_batch(model, prompts, async_scheduling):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
    alone = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=4,
                      max_model_len=64).generate([prompts[1]], params)[0].token_ids
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=4, max_model_len=64,
                       max_num_batched_tokens=5)
    others = SamplingParams(max_new_tokens=6, temperature=0.7, seed=7, ignore_eos=True)
    outs = engine.generate([prompts[0], prompts[1], prompts[4]], [others, params, GREEDY])
    assert outs[1].token_ids == alone
    engine.check_no_leaks()


def test_graph_steps_with_sampled_and_greedy_rows(model, prompts, reference, async_scheduling):
    """Graph decode steps whose rows are sampled (the ids in flight come from the sampler, not from
    the graph's own argmax) next to greedy ones: each row gives what it gives without graphs."""
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
    alone = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=4,
                      max_model_len=64).generate([prompts[1]], params)[0].token_ids
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=4, max_model_len=64)
    engine.runner.capture_graphs(4)
    graph_steps = []
    run_graph = engine.runner._run_graph
    engine.runner._run_graph = lambda seqs, *a: (graph_steps.append(len(seqs)), run_graph(seqs, *a))[1]
    greedy6 = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    outs = engine.generate([prompts[4], prompts[1], prompts[0]], [greedy6, params, greedy6])
    assert graph_steps
    assert [o.token_ids for o in outs] == [reference[4][:6], alone, reference[0][:6]]
    outs = engine.generate([prompts[0]], greedy6)  # then greedy alone: the graph's own ids feed each step
    assert outs[0].token_ids == reference[0][:6]
    engine.check_no_leaks()


def test_paged_context_matches_full_forward(model):
    """Conv continuation from slot state + paged attention over blocks, chunk by chunk, gives
    the logits of one full-sequence forward (BatchContext, no cache)."""
    cfg = model.config
    runner = ModelRunner(model, block_size=4, num_blocks=16, num_conv_slots=3, max_model_len=32,
                         max_num_seqs=3, use_cuda_graphs=False, use_triton=False)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(10, 1000, (n,), generator=g) for n in (11, 7)]
    tables = torch.tensor([[5, 2, 9, 0], [1, 3, 15, 16]], dtype=torch.int32)  # scattered blocks
    slots = torch.tensor([2, 0])
    chunks = [(4, 3), (5, 1), (2, 3)]  # per step: tokens of seq 0, tokens of seq 1 (1 = a decode row)
    got, done = [[], []], [0, 0]
    with torch.no_grad():
        for n0, n1 in chunks:
            order = [1, 0] if n1 == 1 else [0, 1]  # single-token rows go first
            lens = {0: n0, 1: n1}
            ids = []
            for s in order:
                ids += seqs[s][done[s]: done[s] + lens[s]].tolist()
            ctx = PagedContext(kv_caches=runner.kv_caches, conv_states=runner.conv_states,
                               attn_index=runner.attn_index, conv_index=runner.conv_index,
                               past=torch.tensor([done[s] for s in order]), lens=torch.tensor([lens[s] for s in order]),
                               block_tables=tables[order], conv_slots=slots[order], num_tokens=len(ids),
                               num_decode=1 if n1 == 1 else 0)
            logits = model(input_ids=torch.tensor([ids]), context=ctx).logits[0]
            offset = 0
            for s in order:
                got[s].append(logits[offset: offset + lens[s]])
                offset += lens[s]
                done[s] += lens[s]
        for s in range(2):
            full = model(input_ids=seqs[s][None]).logits[0]
            torch.testing.assert_close(torch.cat(got[s]), full, rtol=1e-4, atol=1e-4)
    assert cfg.conv_L_cache == 3


def test_fused_projection_only_in_batch1_decode_of_tuned_plain_weights(model):
    """The engine's rule for its fused projection kernel (a CUDA path, so only the choice is
    checked here): batch-1 decode steps, weight shapes in the tuned set, plain bias-free weights,
    RMSNorm or no norm; anything else keeps the eager ops."""
    runner = ModelRunner(model, block_size=4, num_blocks=16, num_conv_slots=3, max_model_len=32,
                         max_num_seqs=3, use_cuda_graphs=False, use_triton=False)
    tuned = frozenset({(16, 8)})

    def ctx(lens, num_decode, shapes=tuned):
        S = len(lens)
        return PagedContext(kv_caches=runner.kv_caches, conv_states=runner.conv_states, attn_index=runner.attn_index,
                            conv_index=runner.conv_index, past=torch.full((S,), 3), lens=torch.tensor(lens),
                            block_tables=torch.zeros((S, 2), dtype=torch.int32), conv_slots=torch.arange(S),
                            num_tokens=sum(lens), num_decode=num_decode, fused_linear_shapes=shapes)

    plain = torch.nn.Linear(8, 16, bias=False)
    norm = RMSNorm(8, 1e-5)

    class Wrapped(torch.nn.Module):  # e.g. a LoRA adapter around a Linear: no plain weight
        def __init__(self):
            super().__init__()
            self.base = plain

    one = ctx([1], 1)
    assert one._fused_linear_weight(plain, None) is plain.weight
    assert one._fused_linear_weight(plain, norm) is plain.weight
    assert one._fused_linear_weight(plain.weight, None) is plain.weight
    assert one._fused_linear_weight(torch.nn.Linear(8, 16, bias=True), None) is None
    assert one._fused_linear_weight(Wrapped(), None) is None
    assert one._fused_linear_weight(plain, torch.nn.LayerNorm(8)) is None
    assert one._fused_linear_weight(torch.nn.Linear(8, 32, bias=False), None) is None  # not tuned
    assert ctx([1], 1, frozenset())._fused_linear_weight(plain, None) is None
    assert ctx([1, 1], 2)._fused_linear_weight(plain, None) is None  # batch 2
    assert ctx([4], 0)._fused_linear_weight(plain, None) is None  # prefill


def test_conv_block_kernel_only_in_batch1_decode_of_a_tuned_in_proj(tiny_ckpt, monkeypatch):
    """The engine's rule for its batch-1 conv block kernel (in_proj + conv step, a CUDA path: a
    stand-in for the kernel op records the calls): a batch-1 decode step whose in_proj shape is
    tuned, with a 3-tap conv without bias, and the kernel gets the layer's weights, norm and state;
    the eager path otherwise."""
    import sys
    import types

    import fastlfm.engine.kernels as kernels

    calls = []

    def fake_op(x, weight, norm_weight, eps, conv_weight, pool, slots, past):
        calls.append((weight, norm_weight, eps, conv_weight, pool, slots, past))
        return torch.zeros(x.shape[0], weight.shape[0] // 3)

    stub = types.ModuleType("fastlfm.engine.kernels.ops")
    stub.in_proj_gated_conv_op = fake_op
    monkeypatch.setitem(sys.modules, "fastlfm.engine.kernels.ops", stub)
    monkeypatch.setattr(kernels, "ops", stub, raising=False)
    model = Lfm2ForCausalLM.from_pretrained(tiny_ckpt)  # plain nn.Linear layers (an LLMEngine on CPU packs them)
    runner = ModelRunner(model, block_size=4, num_blocks=16, num_conv_slots=3, max_model_len=32,
                         max_num_seqs=3, use_cuda_graphs=False, use_triton=False)
    layer_idx = next(iter(runner.conv_index))
    layer = model.model.layers[layer_idx]
    block, norm = layer.conv, layer.operator_norm
    tuned = frozenset({tuple(block.in_proj.weight.shape)})

    def mix(S, shapes=tuned):
        ctx = PagedContext(kv_caches=runner.kv_caches, conv_states=runner.conv_states, attn_index=runner.attn_index,
                           conv_index=runner.conv_index, past=torch.full((S,), 3), lens=torch.ones(S, dtype=torch.long),
                           block_tables=torch.zeros((S, 2), dtype=torch.int32), conv_slots=torch.arange(S),
                           num_tokens=S, num_decode=S, fused_linear_shapes=shapes)
        x = torch.randn(1, S, model.config.hidden_size)
        with torch.no_grad():
            return ctx.in_proj_gated_conv(layer_idx, x, block.in_proj, block.conv.weight, block.conv.bias, norm=norm)

    mix(1)
    assert len(calls) == 1
    weight, norm_weight, eps, conv_weight, pool, slots, past = calls[0]
    assert weight is block.in_proj.weight and norm_weight is norm.weight and eps == norm.eps
    layer_pool = runner.conv_states[runner.conv_index[layer_idx]]  # the layer's state, in place
    assert conv_weight is block.conv.weight and pool.data_ptr() == layer_pool.data_ptr() and pool.shape == layer_pool.shape
    assert slots.tolist() == [0] and past.tolist() == [3]
    for S, shapes in ((2, tuned), (1, frozenset())):  # batch 2; an untuned shape: the eager path
        assert mix(S, shapes).shape == (1, S, model.config.hidden_size)
    assert len(calls) == 1


def test_async_engine_streams_aborts_and_stats(model, prompts, reference, async_scheduling):
    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=4, max_model_len=64,
                                          max_num_batched_tokens=8))

        async def collect(i):
            chunks = [o async for o in engine.generate(prompts[i], GREEDY, f"a{i}")]
            return chunks

        async def stop_early():
            got = []
            async for o in engine.generate(prompts[3], GREEDY, "early"):
                got.append(o)
                if len(o.token_ids) == 2:
                    break  # leaving the loop aborts the request
            return got

        full0, full2, early = await asyncio.gather(collect(0), collect(2), stop_early())
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in engine.generate(list(range(10, 80)), GREEDY, "toolong"):
                pass
        for _ in range(100):  # the abort is processed by the engine thread
            if engine.stats().num_running == 0 and engine.stats().num_waiting == 0:
                break
            await asyncio.sleep(0.02)
        stats = engine.stats()
        await engine.shutdown()
        return full0, full2, early, stats, engine

    full0, full2, early, stats, engine = asyncio.run(main())
    for chunks, ref in ((full0, reference[0]), (full2, reference[2])):
        assert [t for c in chunks for t in c.new_token_ids] == ref
        assert chunks[-1].finished and chunks[-1].token_ids == ref and not any(c.finished for c in chunks[:-1])
    assert [o.token_ids for o in early] == [reference[3][:1], reference[3][:2]]
    assert stats.kv_blocks_used == 0 and stats.conv_slots_used == 0 and stats.num_running == 0
    assert stats.generation_tokens_total >= 2 * NEW + 2
    engine.engine.check_no_leaks()


def test_text_and_stop_strings(tiny_ckpt, async_scheduling):
    """The engine's text is the tokenizer's decoding of the generated ids (the reference
    model's greedy tokens), and a stop string ends the request at the token that completes it,
    the text cut right before the stop string."""
    from fastlfm.tokenizer import Tokenizer

    engine = LLMEngine.from_pretrained(str(tiny_ckpt), max_num_seqs=4, max_model_len=128,
                                       async_scheduling=async_scheduling)
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    prompts = [tok.encode(t) for t in ("hello there", "the quick brown fox", "a b c d e f")]
    free = engine.generate(prompts, GREEDY)
    for p, o in zip(prompts, free):
        assert o.token_ids == greedy_reference(engine.model, p, NEW)
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True) and o.finish_reason == "length"
    text = free[1].text
    stop = next(text[i:i + 3] for i in range(2, len(text) - 3) if text.find(text[i:i + 3]) == i)
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True, stop_strings=[stop])
    outs = engine.generate(prompts, params)
    ids = free[1].token_ids
    ends = [k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k], skip_special_tokens=True)]
    assert outs[1].finish_reason == "stop" and outs[1].token_ids == ids[:ends[0]]
    assert outs[1].text == text[:text.find(stop)]
    for i in (0, 2):  # the others are untouched (unless the stop string shows up there too)
        if stop not in free[i].text:
            assert outs[i].token_ids == free[i].token_ids and outs[i].text == free[i].text
    engine.check_no_leaks()


def test_async_engine_merges_what_a_slow_consumer_missed(model, prompts, reference):
    """A consumer that falls behind gets the outputs it missed as one (their ids, text and
    logprobs in order), so a slow client costs one SSE event, not one per token."""
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=0)

    async def main():
        llm_engine = LLMEngine(model, max_num_seqs=4, max_model_len=64)
        engine = AsyncLLMEngine(llm_engine)
        got = []
        async for out in engine.generate(prompts[1], params, "slow"):
            got.append(out)
            # the engine thread runs ahead meanwhile: this consumer reads on only once the request has
            # ended there (a fixed 50 ms sleep per output was too short on a loaded CI machine)
            for _ in range(3000):
                if "slow" not in llm_engine.requests:
                    break
                await asyncio.sleep(0.01)
        await engine.shutdown()
        return got, engine

    got, engine = asyncio.run(main())
    assert [t for o in got for t in o.new_token_ids] == reference[1]
    assert [lp.token_id for o in got for lp in o.logprobs] == reference[1]
    assert len(got) < NEW and got[-1].finished and got[-1].token_ids == reference[1]
    engine.engine.check_no_leaks()


def test_async_engine_holds_tokens_of_many_streams_until_the_interval(model, prompts, reference):
    """Above `stream_every_step` live streams, a request's tokens after its first are held and merged
    until `stream_interval_s` passed (here: never before the end), so each stream gets its first
    token at once and the rest in its final output; nothing is lost or reordered."""
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=0)

    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, max_num_seqs=4, max_model_len=64), stream_every_step=0,
                                stream_interval_s=3600)

        async def collect(i):
            return [o async for o in engine.generate(prompts[i], params, f"r{i}")]

        got = await asyncio.gather(*(collect(i) for i in range(3)))
        await engine.shutdown()
        return got, engine

    got, engine = asyncio.run(main())
    for outs, ref in zip(got, reference):
        assert [len(o.new_token_ids) for o in outs] == [1, NEW - 1] and outs[-1].finished
        assert [t for o in outs for t in o.new_token_ids] == ref == outs[-1].token_ids
        assert [lp.token_id for o in outs for lp in o.logprobs] == ref
    assert engine.loop._held == {} and engine.loop._last_sent == {}
    engine.engine.check_no_leaks()
    with pytest.raises(ValueError, match="stream_interval_s"):
        AsyncLLMEngine(engine.engine, stream_interval_s=-1)
    with pytest.raises(ValueError, match="stream_events_per_s"):
        AsyncLLMEngine(engine.engine, stream_events_per_s=0)


def test_stream_interval_grows_with_the_streams_to_keep_the_event_rate(model):
    """The interval is the configured one until the streams together would get more than
    `stream_events_per_s` deliveries a second; beyond, streams / rate (100 streams at 2,000/s: 50 ms)."""
    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, max_num_seqs=2, max_model_len=32), stream_interval_s=0.01,
                                stream_events_per_s=2000)
        got = [engine.stream_interval(n) for n in (1, 20, 100, 400)]
        await engine.shutdown()
        return got

    assert asyncio.run(main()) == pytest.approx([0.01, 0.01, 0.05, 0.2])


def test_lazy_graphs_are_captured_mid_run_keeping_the_ids_in_flight(model, prompts, reference):
    """Lazy capture (the CUDA default): a batch size gets its graph when a step first needs it,
    in the middle of an asynchronous run, and the capture's warm-up must not clobber the ids of the
    step in flight (kept in g_greedy): the tokens equal the reference."""
    engine = LLMEngine(model, async_scheduling=True, max_num_seqs=8, max_model_len=64, block_size=4)
    engine.runner.capture_graphs(8, lazy=True)
    assert engine.runner.graphs == {}
    outs = run_staggered(engine, prompts, arrive_at=[0, 0, 2, 3, 7])
    assert [o.token_ids for o in outs] == reference
    assert len(engine.runner.graphs) >= 2  # sizes captured as they came
    engine.check_no_leaks()


def test_cpu_cache_pool_default_is_bounded(model, monkeypatch):
    """On CPU the default pool holds max_num_seqs full-length sequences only within CPU_CACHE_BYTES
    (zero-filled at start), and at least one: hand-computed from the config's cache sizes."""
    from fastlfm.engine import llm_engine

    cfg = model.config
    n_attn = sum(cfg.is_attention_layer(i) for i in range(cfg.num_hidden_layers))
    n_conv = cfg.num_hidden_layers - n_attn
    item = model.dtype.itemsize
    per_block = 2 * n_attn * 16 * cfg.num_key_value_heads * cfg.head_dim * item \
        + n_conv * (cfg.conv_L_cache - 1) * cfg.hidden_size * item / 4  # KV + a quarter snapshot
    monkeypatch.setattr(llm_engine, "CPU_CACHE_BYTES", int(per_block * 10))
    big = LLMEngine(model, max_num_seqs=8, max_model_len=64, block_size=16)  # 8 x 4 blocks wanted, 10 fit
    assert big.block_manager.num_blocks == 10
    small = LLMEngine(model, max_num_seqs=2, max_model_len=64, block_size=16)  # 2 x 4 = 8 fit
    assert small.block_manager.num_blocks == 8
    long = LLMEngine(model, max_num_seqs=2, max_model_len=320, block_size=16)  # one sequence needs 20
    assert long.block_manager.num_blocks == 20
    outs = big.generate([list(range(10, 60))] * 4, GREEDY)  # 4 sequences of 58 tokens in 10 blocks: preemption
    assert all(len(o.token_ids) == NEW for o in outs)
    big.check_no_leaks()


def test_bad_prefill_graph_tokens_is_named(model):
    for bad in (-1, 2.5, "all"):
        with pytest.raises(ValueError, match="prefill_graph_tokens"):
            LLMEngine(model, max_num_seqs=2, max_model_len=32, prefill_graph_tokens=bad)


def test_cpu_cache_pool_is_zeros_that_take_memory_only_as_they_fill():
    """The CPU pool (model_runner.zeros): reads as zeros, writes stick, and a 256 MiB pool does not
    raise the process's resident memory by its size up front (pages come zeroed on first touch)."""
    from fastlfm.engine.model_runner import zeros

    def resident_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident_bytes()
    pool = zeros((256, 16, 8, 64, 64), torch.bfloat16, torch.device("cpu"))  # 256 MiB
    assert resident_bytes() - before < 32 << 20
    assert pool.shape == (256, 16, 8, 64, 64) and pool.dtype == torch.bfloat16 and pool.is_contiguous()
    assert not pool[7].any() and not pool[-1].any()
    pool[3, 2, 1] = 1.5
    assert float(pool[3, 2, 1].sum()) == 1.5 * 64 * 64 and float(pool.sum()) == 1.5 * 64 * 64
    small = zeros((3, 5), torch.float32, torch.device("cpu"))
    assert torch.equal(small, torch.zeros(3, 5))


def test_merge_outputs_is_what_the_outputs_added_in_order():
    """Held outputs merged once equal the outputs laid end to end (tokens, text, logprobs), with the
    last one's state; a single output is itself."""
    from fastlfm.engine.llm_engine import RequestOutput, TokenLogprob, merge_outputs

    history = list(range(20))
    outs = [RequestOutput("r", [10 + i], f"t{i} ", i == 3, "length" if i == 3 else None, 10, 11 + i, history,
                          logprobs=[TokenLogprob(10 + i, -0.5 * i, [])]) for i in range(4)]
    merged = merge_outputs(outs)
    assert merged.new_token_ids == [10, 11, 12, 13] and merged.new_text == "t0 t1 t2 t3 "
    assert [lp.token_id for lp in merged.logprobs] == [10, 11, 12, 13]
    assert (merged.finished, merged.finish_reason, merged.num_tokens) == (True, "length", 14)
    assert merged.token_ids == history[10:14]
    assert outs[0].merged(outs[1]).new_token_ids == [10, 11] and merge_outputs(outs[:1]) is outs[0]
    assert outs[0].new_token_ids == [10]  # the inputs are left as they were
