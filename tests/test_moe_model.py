"""LFM2-MoE against transformers' Lfm2MoeForCausalLM (fp32, random weights), on scaled-down layouts
of LFM2-8B-A1B (32 experts, top-4) and LFM2-24B-A2B (64 experts, top-4) and a variant with another k
and the router's other options; checkpoint forms; the grouped experts path."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fastlfm import CheckpointError
from fastlfm import ops
from fastlfm.models import Lfm2MoeForCausalLM, load_model
from fastlfm.testing import tiny_moe_config, write_checkpoint

LAYOUTS = {
    # 8B-A1B: 32 experts, top-4, two dense layers first
    "8b-a1b": tiny_moe_config(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=32, num_hidden_layers=6,
                              layer_types=["conv", "conv", "full_attention", "conv", "conv", "full_attention"]),
    # 24B-A2B: 64 experts, top-4, two dense layers first
    "24b-a2b": tiny_moe_config(num_experts=64, num_experts_per_tok=4, moe_intermediate_size=32, num_hidden_layers=5,
                               layer_types=["conv", "conv", "full_attention", "conv", "conv"]),
    # another k, one dense layer, no expert bias, no renormalisation, a routing scale
    "k6-plain-router": tiny_moe_config(num_experts=16, num_experts_per_tok=6, num_dense_layers=1, num_hidden_layers=4,
                                       layer_types=["conv", "full_attention", "conv", "conv"], use_expert_bias=False,
                                       norm_topk_prob=False, routed_scaling_factor=2.5),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request, tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp(request.param), LAYOUTS[request.param], tokenizer=False)
    ours = load_model(folder, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, ours, ref


def test_logits_hidden_states_and_loss_match(pair):
    _, ours, ref = pair
    assert isinstance(ours, Lfm2MoeForCausalLM)
    ids = torch.randint(0, 1024, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids, labels=ids, output_hidden_states=True), ref(ids, labels=ids, output_hidden_states=True)
    assert (a.logits - b.logits).abs().max() <= 1e-4
    assert max((x - y).abs().max().item() for x, y in zip(a.hidden_states, b.hidden_states, strict=True)) <= 1e-4
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_cached_decode_matches_full_forward(pair):
    _, ours, ref = pair
    ids = torch.randint(0, 1024, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        cache = ours.make_cache()
        parts = [ours(ids[:, :20], past_key_values=cache, use_cache=True).logits]
        parts += [ours(ids[:, t:t + 1], past_key_values=cache).logits for t in range(20, 29)]
    assert (torch.cat(parts, 1) - expected).abs().max() <= 1e-4


def test_greedy_tokens_match_transformers_generate(pair):
    _, ours, ref = pair
    prompt = torch.randint(10, 1024, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)[0, 9:]
        cache, ids, got = ours.make_cache(), prompt, []
        for _ in range(12):
            got.append(int(ours(ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax()))
            ids = torch.tensor([[got[-1]]])
    assert got == want.tolist()


def test_left_padded_batch_matches_transformers(pair):
    """A left-padded batch (prefill, then two decode steps) against transformers with the same mask:
    pad tokens must not reach the real tokens through the conv layers or the experts."""
    _, ours, ref = pair
    gen = torch.Generator().manual_seed(3)
    lengths = [17, 6, 11]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T + 2, dtype=torch.long)
    mask = torch.zeros(len(lengths), T + 2, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(1, 1024, (n + 2,), generator=gen)
        mask[i, T - n:] = 1
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        out = ours(ids[:, :T], attention_mask=mask[:, :T], use_cache=True)
        steps = [ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values).logits
                 for t in (T, T + 1)]
    got = torch.cat([out.logits, *steps], 1)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4


def test_gradients_match_transformers(pair):
    """Training goes through the per-expert GEMMs (torch's grouped GEMM has no CPU backward); the
    oracle runs transformers' per-expert loop."""
    folder, ours, _ = pair
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            experts_implementation="eager").eval()
    ids = torch.randint(0, 1024, (2, 13), generator=torch.Generator().manual_seed(4))
    ours.zero_grad()
    la, lb = ours(ids, labels=ids).loss, ref(ids, labels=ids).loss
    la.backward(), lb.backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - grads[name].grad).abs().max() <= 1e-5, name
    ours.zero_grad()


def test_routing_uses_bias_for_choice_only(pair):
    """Hand computation of one MoE block for a few tokens from the stacked weights (spec §7)."""
    _, ours, _ = pair
    cfg = ours.config
    block = ours.model.layers[cfg.num_dense_layers].feed_forward
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    w13, w2 = block.experts.gate_up_proj, block.experts.down_proj
    inter = cfg.moe_intermediate_size
    with torch.no_grad():
        got = block(x)
        for t in range(3):
            scores = torch.sigmoid(x[t] @ block.gate.weight.t())
            bias = block.expert_bias if cfg.use_expert_bias else 0
            chosen = torch.topk(scores + bias, cfg.num_experts_per_tok).indices
            w = scores[chosen] / (scores[chosen].sum() + 1e-6) if cfg.norm_topk_prob else scores[chosen]
            w = w * cfg.routed_scaling_factor
            expected = 0
            for wi, e in zip(w, chosen.tolist()):
                g, u = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
                expected = expected + wi * (w2[e] @ (torch.nn.functional.silu(g) * u))
            assert torch.allclose(got[t], expected, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 6, 40])
def test_grouped_experts_path(tokens, monkeypatch):
    """ops.moe_swiglu_experts (sort by expert + two grouped GEMMs) against a pair-by-pair loop, with an
    expert that no token chooses and with every token on one expert; at inference it takes torch's
    grouped GEMM, never the per-expert fallback."""
    g = torch.Generator().manual_seed(tokens)
    E, k, D, inter = 16, 4, 24, 20
    gate_up, down = torch.randn(E, 2 * inter, D, generator=g), torch.randn(E, D, inter, generator=g)
    x = torch.randn(tokens, D, generator=g)
    scores = torch.rand(tokens, E, generator=g)
    scores[:, 5] = -1  # never chosen
    unused = scores.topk(k, dim=-1).indices
    scores[:, 2] = 2  # chosen by every token
    for ids in (unused, scores.topk(k, dim=-1).indices):
        weights = torch.rand(tokens, k, generator=g)
        expected = torch.stack([torch.stack([w * (down[e] @ (torch.nn.functional.silu(gate_up[e, :inter] @ x[t])
                                                             * (gate_up[e, inter:] @ x[t])))
                                             for e, w in zip(ids[t].tolist(), weights[t])]) for t in range(tokens)])
        # training (autograd): one GEMM per expert
        trained = ops.moe_swiglu_experts(x, ids, weights, gate_up.requires_grad_(), down)
        assert torch.allclose(trained, expected, atol=1e-4, rtol=1e-5)
        gate_up.requires_grad_(False)
        with monkeypatch.context() as m, torch.inference_mode():
            m.setattr(ops, "grouped_linear_per_expert", lambda *a: pytest.fail("per-expert loop at inference"))
            got = ops.moe_swiglu_experts(x, ids, weights, gate_up, down)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


def per_expert_tensors(folder):
    return {k: v for k, v in load_file(folder / "model.safetensors").items()}


def test_save_writes_released_per_expert_form(pair, tmp_path):
    folder, ours, ref = pair
    ours.save_pretrained(tmp_path)
    saved = per_expert_tensors(tmp_path)
    cfg = ours.config
    layer = cfg.num_dense_layers
    assert not [k for k in saved if k.endswith(("gate_up_proj", "down_proj"))]
    w13 = ours.model.layers[layer].feed_forward.experts.gate_up_proj
    inter = cfg.moe_intermediate_size
    base = f"model.layers.{layer}.feed_forward.experts"
    for e in (0, cfg.num_experts - 1):
        assert torch.equal(saved[f"{base}.{e}.w1.weight"], w13[e, :inter])
        assert torch.equal(saved[f"{base}.{e}.w3.weight"], w13[e, inter:])
    assert set(saved) == set(per_expert_tensors(folder))  # the factory's (released) names
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.arange(15)[None]
    with torch.no_grad():
        assert (again(ids).logits - ref(ids).logits).abs().max() <= 1e-5


def test_transformers5_stacked_form_loads(pair, tmp_path):
    folder, ours, _ = pair
    cfg = ours.config
    tensors = per_expert_tensors(folder)
    for layer in range(cfg.num_dense_layers, cfg.num_hidden_layers):
        base = f"model.layers.{layer}.feed_forward.experts"
        w1 = torch.stack([tensors.pop(f"{base}.{e}.w1.weight") for e in range(cfg.num_experts)])
        w3 = torch.stack([tensors.pop(f"{base}.{e}.w3.weight") for e in range(cfg.num_experts)])
        tensors[f"{base}.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        tensors[f"{base}.down_proj"] = torch.stack([tensors.pop(f"{base}.{e}.w2.weight")
                                                    for e in range(cfg.num_experts)])
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    again = load_model(tmp_path, dtype=torch.float32)
    for name, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("moe-small"), tiny_moe_config(), tokenizer=False)


def rewrite(folder, tmp_path, edit):
    tensors = per_expert_tensors(folder)
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    return tmp_path


def test_missing_expert_tensor_is_named(small_folder, tmp_path):
    folder = rewrite(small_folder, tmp_path, lambda t: t.pop("model.layers.4.feed_forward.experts.3.w3.weight"))
    with pytest.raises(CheckpointError, match=r"gate_up_proj.*missing from the checkpoint: model\.layers\.4\.feed_forward\.experts\.3\.w3\.weight$"):
        load_model(folder)


def test_wrong_expert_shape_is_named(small_folder, tmp_path):
    name = "model.layers.2.feed_forward.experts.5.w2.weight"
    folder = rewrite(small_folder, tmp_path, lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match=r"experts\.5\.w2\.weight.*shape"):
        load_model(folder)


def test_expert_beyond_num_experts_is_named(small_folder, tmp_path):
    def add(t):
        t["model.layers.2.feed_forward.experts.8.w1.weight"] = t["model.layers.2.feed_forward.experts.0.w1.weight"].clone()
    with pytest.raises(CheckpointError, match=r"does not have: .*experts\.8\.w1\.weight"):
        load_model(rewrite(small_folder, tmp_path, add))


def test_moe_config_without_layer_types_is_an_error(tmp_path):
    cfg = tiny_moe_config()
    cfg.pop("layer_types")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="needs `layer_types`"):
        load_model(tmp_path)


def test_bf16_model_keeps_fp32_expert_bias_and_routes_in_fp32(small_folder):
    """The expert bias is a float32 buffer in any dtype (spec §5.2), and the choice of experts is made in
    float32 from the bf16 weights: bf16 rounding of near-equal scores does not pick the experts."""
    model = load_model(small_folder, dtype=torch.bfloat16)
    block = model.model.layers[2].feed_forward
    assert block.expert_bias.dtype == torch.float32 and block.gate.weight.dtype == torch.bfloat16
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with torch.no_grad():
        ids, weights = block.route(x)
        scores = torch.sigmoid(x.float() @ block.gate.weight.float().t())
        want = torch.topk(scores + block.expert_bias, model.config.num_experts_per_tok).indices
        w = scores.gather(1, want)
    assert torch.equal(ids, want)
    assert weights.dtype == torch.bfloat16 and torch.equal(weights, (w / (w.sum(-1, keepdim=True) + 1e-6)).bfloat16())
