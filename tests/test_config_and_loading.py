"""Config rules (spec §1-2) and checkpoint loading errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlfm import CheckpointError, Lfm2Config, Lfm2ForCausalLM, load_model
from fastlfm.models.config import ConfigError
from fastlfm.testing import real_config, tiny_config, write_checkpoint


@pytest.mark.parametrize("name,count", [
    ("LFM2-350M", 354_483_968), ("LFM2-700M", 742_489_344),
    ("LFM2-1.2B", 1_170_340_608), ("LFM2-2.6B", 2_569_272_320),
])
def test_parameter_counts_of_released_models(name, count):
    with torch.device("meta"):
        model = Lfm2ForCausalLM(Lfm2Config.from_dict(real_config(name)))
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("ff,expected", [(6656, 4608), (10240, 6912), (12288, 8192), (16128, 10752)])
def test_ffn_auto_adjust_worked_values(ff, expected):
    assert Lfm2Config.from_dict({"block_ff_dim": ff, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}).ffn_dim == expected


def test_ffn_rules_without_multiplier_and_without_adjust():
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert Lfm2Config.from_dict({**base, "intermediate_size": 1000, "block_ffn_dim_multiplier": None}).ffn_dim == 666
    assert Lfm2Config.from_dict({**base, "intermediate_size": 1000, "block_auto_adjust_ff_dim": False}).ffn_dim == 1000


def test_legacy_keys_and_layer_types():
    cfg = Lfm2Config.from_dict({"block_ff_dim": 300, "intermediate_size": 999, "tie_embedding": False,
                                "tie_word_embeddings": True, "num_hidden_layers": 4, "full_attn_idxs": [1],
                                "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 5e5})
    assert cfg.intermediate_size == 300 and cfg.tie_word_embeddings is False
    assert cfg.layer_types == ["conv", "full_attention", "conv", "conv"]
    assert cfg.rope_theta == 5e5
    assert Lfm2Config.from_dict({"num_hidden_layers": 3}).layer_types == ["full_attention"] * 3
    cfg = Lfm2Config.from_dict({"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"],
                                "full_attn_idxs": [0], "rope_parameters": {"rope_theta": 10.0}})
    assert cfg.layer_types == ["conv", "full_attention"] and cfg.rope_theta == 10.0


@pytest.mark.parametrize("rope", [{"rope_scaling": {"type": "linear", "factor": 2.0}},
                                  {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                                  {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                                   "rope_scaling": {"type": "dynamic", "factor": 2.0}}])
def test_scaled_rope_is_refused_not_ignored(rope):
    with pytest.raises(ConfigError, match="unsupported RoPE scaling"):
        Lfm2Config.from_dict({"num_hidden_layers": 2, **rope})


def test_a_rope_entry_that_is_not_an_object_is_named():
    with pytest.raises(ConfigError, match="rope_scaling must be an object"):
        Lfm2Config.from_dict({"rope_scaling": "linear"})


def test_default_rope_in_either_place_gives_its_theta():
    assert Lfm2Config.from_dict({"rope_scaling": {"rope_type": "default", "rope_theta": 5.0}}).rope_theta == 5.0
    assert Lfm2Config.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 7.0},
                                 "rope_scaling": None, "rope_theta": 9.0}).rope_theta == 7.0
    assert Lfm2Config.from_dict({"rope_theta": 9.0}).rope_theta == 9.0


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Lfm2Config.from_dict({"num_attention_heads": 6, "num_key_value_heads": 4, "hidden_size": 60})
    with pytest.raises(ValueError, match="layer_types"):
        Lfm2Config.from_dict({"num_hidden_layers": 3, "layer_types": ["conv"]})


@pytest.fixture()
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "m", tiny_config(), tokenizer=False)


def test_load_model_dtype_and_generation_config(ckpt):
    model = load_model(ckpt, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.generation_config["eos_token_id"] == 7
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert load_model(ckpt, dtype="float32").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        load_model(ckpt, dtype="int3")


def test_sharded_checkpoint_loads(ckpt, tmp_path):
    from fastlfm.loading import save_safetensors

    model = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    out = tmp_path / "sharded"
    shutil.copytree(ckpt, out)
    (out / "model.safetensors").unlink()
    save_safetensors(model, out, skip={"lm_head.weight"}, max_shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 2
    again = Lfm2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(10)[None]
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        load_model(ckpt)
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        Lfm2ForCausalLM.from_pretrained(ckpt)


def rewrite_weights(ckpt, edit):
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_wrong_shape_names_tensor_and_shapes(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(8, 64)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.2.self_attn.k_proj.weight' has shape \(8, 64\).*\(32, 64\)"):
        load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    rewrite_weights(ckpt, lambda t: t.pop("model.layers.0.conv.conv.weight"))
    with pytest.raises(CheckpointError, match="missing from the checkpoint: model.layers.0.conv.conv.weight"):
        load_model(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"model.layers.0.conv.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="does not have: model.layers.0.conv.extra"):
        load_model(ckpt)


def test_untied_checkpoint_without_head_is_an_error(tmp_path):
    folder = write_checkpoint(tmp_path / "u", tiny_config(tie_embedding=False), tokenizer=False)
    rewrite_weights(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_model(folder)


def test_hub_id_offline_says_how_to_pass_a_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the local cache.*local folder"):
        load_model("LiquidAI/LFM2-350M", local_files_only=True)


def test_hub_id_resolves_from_local_cache(monkeypatch, tmp_path, ckpt):
    """A model already in the huggingface_hub cache loads offline by its id."""
    cache = tmp_path / "hub"
    snap = cache / "models--LiquidAI--LFM2-350M" / "snapshots" / ("a" * 40)
    shutil.copytree(ckpt, snap)
    (cache / "models--LiquidAI--LFM2-350M" / "refs").mkdir()
    (cache / "models--LiquidAI--LFM2-350M" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    model = load_model("LiquidAI/LFM2-350M", local_files_only=True)
    assert model.config.hidden_size == 64


def test_nonexistent_local_path(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(str(tmp_path / "nope" / "deeper" / "x"))


def test_cpu_load_and_generate_do_not_import_the_compiler(tiny_ckpt):
    """A CPU process that never compiles does not import torch._dynamo (~1 s of its cold start):
    not at `import fastlfm`, not while loading a checkpoint (meta-device init), not in the engine."""
    import os
    import subprocess
    import sys

    code = ("import sys, fastlfm; assert 'torch._dynamo' not in sys.modules, 'import'; "
            f"llm = fastlfm.LLM({str(tiny_ckpt)!r}); assert 'torch._dynamo' not in sys.modules, 'load'; "
            "llm.generate('Hello', max_new_tokens=2); assert 'torch._dynamo' not in sys.modules, 'generate'; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_garbage_collection_while_a_model_and_its_tokenizer_load(tiny_ckpt, monkeypatch):
    """The collector is off while LLM() reads the weights and the tokenizer (a full collection there
    walked ~200k objects for nothing: ~0.1 s of a cold start), and comes back as it was."""
    import gc

    from fastlfm import LLM, loading, tokenizer

    seen = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            seen.append((fn.__name__, gc.isenabled()))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(loading, "load_state_dict_into", recording(loading.load_state_dict_into))
    monkeypatch.setattr(tokenizer.Tokenizer, "from_pretrained", classmethod(recording(tokenizer.Tokenizer.from_pretrained.__func__)))
    assert gc.isenabled()
    LLM(str(tiny_ckpt))
    assert seen == [("load_state_dict_into", False), ("from_pretrained", False)] and gc.isenabled()
    Lfm2ForCausalLM.from_pretrained(tiny_ckpt)  # the transformers-style load too
    assert seen[-1] == ("load_state_dict_into", False) and gc.isenabled()
    gc.disable()  # a caller that keeps the collector off finds it off after
    try:
        LLM(str(tiny_ckpt))
        assert not gc.isenabled()
    finally:
        gc.enable()
