"""LFM2-MoE in the engine (CPU): the tokens of the reference model (Lfm2MoeForCausalLM + Lfm2Cache,
parity-tested against transformers) through continuous batching, chunked prefill and the graph
decode path, on the grouped experts path (no per-expert loop); on CUDA every step's experts go
to the fused kernel op."""

import sys
import types

import pytest
import torch

from fastlfm import ops
from fastlfm.engine import LLMEngine, PagedContext
from fastlfm.models import load_model
from fastlfm.sampling import SamplingParams
from fastlfm.testing import tiny_moe_config, write_checkpoint

NEW = 6
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = tiny_moe_config(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=32, num_hidden_layers=5,
                             layer_types=["conv", "conv", "full_attention", "conv", "full_attention"])
    return load_model(write_checkpoint(tmp_path_factory.mktemp("moe-engine"), config, tokenizer=False))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 23, 1, 14)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    refs = []
    with torch.no_grad():
        for p in prompts:
            cache, ids, out = model.make_cache(), torch.tensor([p]), []
            for _ in range(NEW):
                out.append(int(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax()))
                ids = torch.tensor([[out[-1]]])
            refs.append(out)
    return refs


def test_engine_tokens_equal_reference_on_the_grouped_path(model, prompts, reference, async_scheduling,
                                                           monkeypatch):
    """A batch with a small token budget (chunked prefill, mixed steps), then decode steps on the graph
    path's static buffers (batches padded up the ladder); never the per-expert GEMM loop."""
    monkeypatch.setattr(ops, "grouped_linear_per_expert", lambda *a: pytest.fail("per-expert loop in the engine"))
    engine = LLMEngine(model, async_scheduling=async_scheduling, max_num_seqs=4, max_model_len=64, block_size=4,
                       max_num_batched_tokens=8)
    engine.runner.capture_graphs(4)  # ladder 1, 2, 4
    graph_batches = []
    run_graph = engine.runner._run_graph
    engine.runner._run_graph = lambda seqs, *a: (graph_batches.append(len(seqs)), run_graph(seqs, *a))[1]
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert graph_batches and 3 in graph_batches  # decode steps of 3 ran padded to the graph of 4
    assert [o.token_ids for o in engine.generate(prompts[1:2], GREEDY)] == reference[1:2]
    engine.check_no_leaks()


def test_every_step_uses_the_kernel_op_on_the_triton_path(model, monkeypatch):
    """With the Triton path (CUDA), decode, prefill and mixed steps all hand the routing and the experts
    to the fused ops (stand-ins here record the calls and compute the reference), with the layer's router
    and stacked weights; without it, the reference path."""
    import fastlfm.engine.kernels as kernels

    calls, routes = [], []

    def fake_op(x, expert_ids, expert_weights, gate_up, down):
        calls.append((x.shape[0], gate_up, down))
        return ops.moe_swiglu_experts(x, expert_ids, expert_weights, gate_up, down)

    def fake_route(x, gate_weight, expert_bias, top_k, normalize, scale):
        routes.append((x.shape[0], gate_weight, expert_bias, top_k))
        return ops.moe_route(x, gate_weight, expert_bias, top_k, normalize, scale)

    stub = types.ModuleType("fastlfm.engine.kernels.ops")
    stub.moe_experts_op, stub.moe_route_op = fake_op, fake_route
    monkeypatch.setitem(sys.modules, "fastlfm.engine.kernels.ops", stub)
    monkeypatch.setattr(kernels, "ops", stub, raising=False)
    engine = LLMEngine(model, max_num_seqs=3, max_model_len=32, block_size=4)
    runner = engine.runner
    layer = model.model.layers[3]
    experts = layer.feed_forward.experts

    def step(lens, past, use_triton):
        S, N = len(lens), sum(lens)
        num_decode = sum(1 for n in lens if n == 1)
        ctx = PagedContext(kv_caches=runner.kv_caches, conv_states=runner.conv_states, attn_index=runner.attn_index,
                           conv_index=runner.conv_index, past=torch.tensor(past), lens=torch.tensor(lens),
                           block_tables=torch.arange(S * 4, dtype=torch.int32).view(S, 4),
                           conv_slots=torch.arange(S), num_tokens=N, num_decode=num_decode, use_triton=use_triton)
        x = torch.randn(1, N, model.config.hidden_size)
        with torch.no_grad():
            return layer.feed_forward(x, ctx, norm=layer.ffn_norm, residual=x), \
                layer.feed_forward(x, None, norm=layer.ffn_norm, residual=x)

    for lens, past in (([1, 1, 1], [3, 0, 7]), ([5], [0]), ([1, 6], [2, 4])):  # decode, prefill, mixed
        got, want = step(lens, past, use_triton=True)
        assert torch.allclose(got, want, atol=1e-6)
        assert calls[-1][0] == sum(lens) and calls[-1][1] is experts.gate_up_proj and calls[-1][2] is experts.down_proj
        block = layer.feed_forward
        assert routes[-1] == (sum(lens), block.gate.weight, block.expert_bias, model.config.num_experts_per_tok)
    assert len(calls) == len(routes) == 3
    step([1, 1], [2, 2], use_triton=False)
    assert len(calls) == len(routes) == 3
