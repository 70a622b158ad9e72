"""fastlfm's LFM2 against the numerical oracle, transformers' Lfm2ForCausalLM (fp32)."""

import pytest
import torch
import transformers

from fastlfm import Lfm2ForCausalLM
from fastlfm.models.lfm2 import Lfm2Cache
from fastlfm.testing import tiny_config, write_checkpoint

VARIANTS = {
    "350m-pattern": tiny_config("LFM2-350M"),
    "2.6b-pattern": tiny_config("LFM2-2.6B", hidden=64, heads=4, kv_heads=1),
    "conv-bias": tiny_config("LFM2-350M", conv_bias=True),
    "untied": tiny_config("LFM2-1.2B", tie_embedding=False),
    # transformers 5.x style: no legacy keys at all
    "current-keys": {
        "model_type": "lfm2", "vocab_size": 1024, "hidden_size": 96, "intermediate_size": 384,
        "num_hidden_layers": 5, "num_attention_heads": 6, "num_key_value_heads": 3,
        "layer_types": ["conv", "full_attention", "conv", "conv", "full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "norm_eps": 1e-6,
        "block_multiple_of": 64, "eos_token_id": 7, "tie_word_embeddings": True,
    },
    # legacy-only keys: block_dim/num_heads stand in for missing current keys
    "legacy-keys": {
        "model_type": "lfm2", "vocab_size": 1024, "block_dim": 64, "num_heads": 4, "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4, "block_ff_dim": 320,
        "full_attn_idxs": [1, 3], "tie_embedding": True,
        "rope_theta": 1000000.0, "conv_L_cache": 4,
    },
}


def load_pair(folder):
    ours = Lfm2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, ref


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp(request.param), VARIANTS[request.param], tokenizer=False)
    return load_pair(folder)


def test_logits_match_transformers(pair):
    ours, ref = pair
    ids = torch.randint(0, 1024, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-4
    # every layer's output, too
    with torch.no_grad():
        ha = ours(ids, output_hidden_states=True).hidden_states
        hb = ref(ids, output_hidden_states=True).hidden_states
    assert len(ha) == len(hb)
    assert max((x - y).abs().max().item() for x, y in zip(ha, hb)) <= 1e-4


def test_parameter_names_and_count_match(pair):
    ours, ref = pair
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_prefill_then_decode_equals_full_forward(pair):
    ours, ref = pair
    ids = torch.randint(0, 1024, (2, 30), generator=torch.Generator().manual_seed(1))
    expected = full_logits(ref, ids)
    cache = Lfm2Cache(ours.config)
    steps = [ours(ids[:, :12], past_key_values=cache, use_cache=True).logits]
    for t in range(12, 30):
        steps.append(ours(ids[:, t : t + 1], past_key_values=cache).logits)
    got = torch.cat(steps, dim=1)
    assert cache.get_seq_length() == 30
    assert (got - expected).abs().max() <= 1e-4


def test_multi_token_continuation_equals_full_forward(pair):
    """A second chat turn / chunked prefill: several new tokens on an existing cache."""
    ours, ref = pair
    ids = torch.randint(0, 1024, (2, 41), generator=torch.Generator().manual_seed(2))
    expected = full_logits(ref, ids)
    out = ours(ids[:, :9], use_cache=True)
    cache = out.past_key_values
    parts = [out.logits]
    for lo, hi in [(9, 10), (10, 25), (25, 27), (27, 41)]:
        parts.append(ours(ids[:, lo:hi], past_key_values=cache).logits)
    assert (torch.cat(parts, 1) - expected).abs().max() <= 1e-4


def test_left_padded_batch_equals_unpadded_rows(pair):
    ours, _ = pair
    gen = torch.Generator().manual_seed(3)
    lengths = [19, 7, 13]
    rows = [torch.randint(1, 1024, (n,), generator=gen) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # pad id 0 has a non-zero embedding
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    out = ours(ids, attention_mask=mask, use_cache=True)
    # decode two more tokens on the padded cache as well
    nxt = torch.randint(1, 1024, (len(rows), 2), generator=gen)
    mask2 = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
    step1 = ours(nxt[:, :1], attention_mask=mask2, past_key_values=out.past_key_values).logits
    mask3 = torch.cat([mask2, torch.ones(len(rows), 1, dtype=torch.long)], 1)
    step2 = ours(nxt[:, 1:], attention_mask=mask3, past_key_values=out.past_key_values).logits
    for i, r in enumerate(rows):
        alone = full_logits(ours, torch.cat([r, nxt[i]])[None])[0]
        n = len(r)
        assert (out.logits[i, T - n:] - alone[:n]).abs().max() <= 1e-4
        assert (step1[i, 0] - alone[n]).abs().max() <= 1e-4
        assert (step2[i, 0] - alone[n + 1]).abs().max() <= 1e-4


def test_loss_and_gradients_match_transformers(pair):
    ours, ref = pair
    ids = torch.randint(0, 1024, (2, 21), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 15:] = -100
    ours.zero_grad(), ref.zero_grad()
    la = ours(ids, labels=labels).loss
    lb = ref(ids, labels=labels).loss
    la.backward(), lb.backward()
    assert abs(la.item() - lb.item()) <= 1e-5
    grads_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - grads_ref[name].grad).abs().max() <= 1e-5, name
    # the loss is the shifted cross-entropy by hand
    logits = ours(ids).logits.detach()
    lp = torch.log_softmax(logits[:, :-1], -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    manual = -lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert abs(manual.item() - la.item()) <= 1e-5


def test_logits_to_keep(pair):
    ours, _ = pair
    ids = torch.randint(0, 1024, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(ids).logits
        assert torch.allclose(ours(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
        assert torch.allclose(ours(ids, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]], atol=1e-6)
        per_row = torch.tensor([[1, 2], [9, 3]])
        got = ours(ids, logits_to_keep=per_row).logits
        assert torch.allclose(got[1, 0], full[1, 9], atol=1e-6) and torch.allclose(got[0, 1], full[0, 2], atol=1e-6)
        sel = torch.zeros(2, 11, dtype=torch.bool)
        sel[0, 3] = sel[1, 10] = True
        assert torch.allclose(ours(ids, logits_to_keep=sel).logits, full[sel], atol=1e-6)


def test_beam_reorder_keeps_rows_consistent(pair):
    ours, _ = pair
    ids = torch.randint(0, 1024, (3, 10), generator=torch.Generator().manual_seed(6))
    out = ours(ids, use_cache=True)
    cache = out.past_key_values
    order = torch.tensor([2, 2, 0])
    cache.reorder(order)
    nxt = torch.tensor([[5], [6], [7]])
    got = ours(nxt, past_key_values=cache).logits[:, -1]
    for row, src in enumerate(order.tolist()):
        alone = full_logits(ours, torch.cat([ids[src], nxt[row]])[None])[0, -1]
        assert (got[row] - alone).abs().max() <= 1e-4


def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 1024, (1, 9))
    assert (full_logits(ref, ids) - full_logits(ours, ids)).abs().max() <= 1e-5


def test_fused_projections_match_transformers_and_save_unchanged(tmp_path):
    """fuse_projections (the engine's one-GEMM q/k/v and w1/w3) keeps transformers' logits,
    the parameter names and memory, and save_pretrained writes the same checkpoint."""
    from fastlfm.models.lfm2 import fuse_projections

    folder = write_checkpoint(tmp_path / "ckpt", VARIANTS["2.6b-pattern"], tokenizer=False)
    ours, ref = load_pair(folder)
    names, count = set(ours.state_dict()), sum(p.numel() for p in ours.parameters())
    fuse_projections(ours)
    attn = next(layer.self_attn for layer in ours.model.layers if layer.is_attention)
    assert attn.qkv_weight is not None and attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert set(ours.state_dict()) == names and sum(p.numel() for p in ours.parameters()) == count
    ids = torch.randint(0, 1024, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "resaved")
    again = Lfm2ForCausalLM.from_pretrained(tmp_path / "resaved", dtype=torch.float32)
    for (name, a), (_, b) in zip(sorted(again.state_dict().items()), sorted(ref.state_dict().items())):
        assert torch.equal(a, b), name
