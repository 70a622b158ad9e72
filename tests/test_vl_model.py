"""LFM2-VL model against transformers' Lfm2VlForConditionalGeneration (fp32, random weights)."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fastlfm.models import Lfm2VlForConditionalGeneration, load_model
from fastlfm.testing import tiny_vl_config, write_vl_checkpoint

PATCHES = 1024


@pytest.fixture(scope="module")
def vl_pair(tmp_path_factory):
    folder = write_vl_checkpoint(tmp_path_factory.mktemp("vl"), tokenizer=False)
    ours = load_model(folder, dtype=torch.float32)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, ours, ref


def views(*grids, seed=0):
    """Random patchified views with the given (h, w) patch grids, zero-padded to 1024 patches."""
    gen = torch.Generator().manual_seed(seed)
    pv = torch.zeros(len(grids), PATCHES, 768)
    mask = torch.zeros(len(grids), PATCHES, dtype=torch.long)
    for i, (h, w) in enumerate(grids):
        pv[i, : h * w] = torch.rand(h * w, 768, generator=gen) * 2 - 1
        mask[i, : h * w] = 1
    return pv, mask, torch.tensor(grids)


def prompt_with_images(n_image_tokens: int, seed=0, before=5, after=7):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(500, 1024, (before + after,), generator=gen)
    return torch.cat([text[:before], torch.full((n_image_tokens,), 396), text[before:]])[None]


@pytest.mark.parametrize("grids", [[(16, 16)], [(32, 32), (8, 12)], [(14, 22)]])
def test_vision_projector_and_logits_match(vl_pair, grids):
    _, ours, ref = vl_pair
    pv, mask, ss = views(*grids)
    with torch.no_grad():
        a = ours.model.vision_tower(pv, mask, ss)
        b = ref.model.vision_tower(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).last_hidden_state
        for i, (h, w) in enumerate(grids):
            assert (a[i, : h * w] - b[i, : h * w]).abs().max() <= 1e-4
        fa = ours.model.get_image_features(pv, mask, ss)
        fb = ref.model.get_image_features(pixel_values=pv, spatial_shapes=ss, pixel_attention_mask=mask).pooler_output
        assert [f.shape for f in fa] == [f.shape for f in fb]
        assert max((x - y).abs().max().item() for x, y in zip(fa, fb)) <= 1e-4
        ids = prompt_with_images(sum(h * w // 4 for h, w in grids))
        la = ours(ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).logits
        lb = ref(input_ids=ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).logits
        assert (la - lb).abs().max() <= 1e-4


def test_greedy_generation_with_cache_matches_transformers(vl_pair):
    _, ours, ref = vl_pair
    pv, mask, ss = views((16, 16), (8, 8), seed=3)
    ids = prompt_with_images(64 + 16, seed=3)
    expected = ref.generate(input_ids=ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss,
                            max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
    with torch.no_grad():
        out = ours(ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss, use_cache=True,
                   logits_to_keep=1)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(31):
            out = ours(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values)
            tokens.append(int(out.logits[0, -1].argmax()))
    assert tokens == expected.tolist()


def test_image_token_count_mismatch_is_a_clear_error(vl_pair):
    _, ours, _ = vl_pair
    pv, mask, ss = views((16, 16))
    with pytest.raises(ValueError, match="63 image tokens but the images give 64 features"):
        ours(prompt_with_images(63), pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss)


def test_legacy_remote_code_checkpoint_layout(vl_pair, tmp_path):
    """`lfm2-vl` configs with `vision_model.` names and vision_feature_layer=-2 (last layer unused)."""
    folder, ours, _ = vl_pair
    cfg = json.loads((folder / "config.json").read_text())
    legacy = dict(cfg, model_type="lfm2-vl", vision_feature_layer=-2, image_token_index=396)
    legacy.pop("image_token_id")
    legacy["vision_config"] = dict(cfg["vision_config"], num_hidden_layers=3)
    tensors = load_file(folder / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in tensors.items()}
    for k, v in list(renamed.items()):  # a stored third layer that the config leaves unused
        if ".encoder.layers.1." in k:
            renamed[k.replace(".layers.1.", ".layers.2.")] = v + 1
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(legacy))
    save_file(renamed, out / "model.safetensors")
    model = load_model(out, dtype=torch.float32)
    assert isinstance(model, Lfm2VlForConditionalGeneration)
    assert len(model.model.vision_tower.encoder.layers) == 2
    pv, mask, ss = views((16, 16))
    ids = prompt_with_images(64)
    with torch.no_grad():
        a = model(ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).logits
        b = ours(ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).logits
    assert torch.equal(a, b)


def test_saved_vl_checkpoint_loads_in_transformers(vl_pair, tmp_path):
    _, ours, ref = vl_pair
    ours.save_pretrained(tmp_path)
    again = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    pv, mask, ss = views((8, 8))
    ids = prompt_with_images(16)
    with torch.no_grad():
        a = again(input_ids=ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).logits
        b = ours(ids, pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).logits
    assert (a - b).abs().max() <= 1e-5
