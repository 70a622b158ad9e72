"""LFM2-MoE against transformers' Lfm2MoeForCausalLM (fp32, random weights)."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fastlfm import CheckpointError
from fastlfm.models import Lfm2MoeForCausalLM, load_model
from fastlfm.testing import tiny_moe_config, write_checkpoint


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("moe"), tiny_moe_config(), tokenizer=False)
    ours = load_model(folder, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, ours, ref


def test_logits_loss_and_decode_match(moe_pair):
    _, ours, ref = moe_pair
    assert isinstance(ours, Lfm2MoeForCausalLM)
    ids = torch.randint(0, 1024, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids, labels=ids), ref(ids, labels=ids)
    assert (a.logits - b.logits).abs().max() <= 1e-4
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    cache = ours.make_cache()
    with torch.no_grad():
        parts = [ours(ids[:, :20], past_key_values=cache, use_cache=True).logits]
        parts += [ours(ids[:, t : t + 1], past_key_values=cache).logits for t in range(20, 29)]
    assert (torch.cat(parts, 1) - b.logits).abs().max() <= 1e-4
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_routing_uses_bias_for_choice_only(moe_pair):
    """Hand computation of one MoE block for one token."""
    _, ours, _ = moe_pair
    block = ours.model.layers[3].feed_forward
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = torch.sigmoid(x @ block.gate.weight.t())[0]
        chosen = torch.topk(scores + block.expert_bias, 3).indices
        w = scores[chosen] / (scores[chosen].sum() + 1e-6)
        expected = sum(w[i] * block.experts[int(e)](x)[0] for i, e in enumerate(chosen))
        assert torch.allclose(block(x)[0], expected, atol=1e-6)


def test_stacked_expert_layout_loads(moe_pair, tmp_path):
    folder, ours, _ = moe_pair
    tensors = load_file(folder / "model.safetensors")
    stacked = {}
    for layer in range(2, 8):
        base = f"model.layers.{layer}.feed_forward.experts"
        w1 = torch.stack([tensors.pop(f"{base}.{e}.w1.weight") for e in range(8)])
        w3 = torch.stack([tensors.pop(f"{base}.{e}.w3.weight") for e in range(8)])
        stacked[f"{base}.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        stacked[f"{base}.down_proj"] = torch.stack([tensors.pop(f"{base}.{e}.w2.weight") for e in range(8)])
    save_file({**tensors, **stacked}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    again = load_model(tmp_path, dtype=torch.float32)
    ids = torch.arange(12)[None]
    assert torch.equal(again(ids).logits, ours(ids).logits)


def test_moe_config_without_layer_types_is_an_error(tmp_path):
    cfg = tiny_moe_config()
    cfg.pop("layer_types")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="needs `layer_types`"):
        load_model(tmp_path)


def test_saved_moe_checkpoint_loads_in_transformers(moe_pair, tmp_path):
    _, ours, ref = moe_pair
    ours.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.arange(15)[None]
    with torch.no_grad():
        assert (again(ids).logits - ours(ids).logits).abs().max() <= 1e-5
