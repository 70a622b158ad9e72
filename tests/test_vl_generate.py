"""LFM2-VL through the user-facing paths: LLM.chat / stream and `fastlfm generate --image`."""

import os
import subprocess
import sys

import pytest
import torch
import transformers

from fastlfm.llm import LLM


def messages_for(paths, text="Compare them"):
    return [{"role": "user", "content": [*({"type": "image", "image": p} for p in paths),
                                         {"type": "text", "text": text}]}]


def test_chat_with_two_images_matches_transformers_generate(vl_folder, images):
    llm = LLM(vl_folder, dtype="float32")
    messages = messages_for(images)
    result = llm.chat(messages, max_new_tokens=32, ignore_eos=True)
    assert len(result.token_ids) == 32
    # the oracle: transformers' generate on the same prompt ids and image tensors
    ids, inputs = llm._prepare_chat(messages)
    assert ids.count(396) == int(sum(h * w // 4 for h, w in inputs["spatial_shapes"].tolist()))
    ref = transformers.AutoModelForImageTextToText.from_pretrained(vl_folder, dtype=torch.float32).eval()
    expected = ref.generate(input_ids=torch.tensor([ids]), **inputs, max_new_tokens=32, min_new_tokens=32,
                            do_sample=False)[0, len(ids):]
    assert result.token_ids == expected.tolist()
    # streaming gives the same text
    assert "".join(llm.stream(messages, max_new_tokens=32, ignore_eos=True)) == result.text


def test_text_only_model_refuses_images(tiny_ckpt, images):
    llm = LLM(tiny_ckpt, dtype="float32")
    with pytest.raises(ValueError, match="text-only model"):
        llm.chat(messages_for(images[:1]))


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "fastlfm.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_generate_with_images(vl_folder, images):
    llm = LLM(vl_folder, dtype="float32")
    expected = llm.chat(messages_for(images), max_new_tokens=12, ignore_eos=True).text
    out = run_cli("generate", str(vl_folder), "--image", images[0], "--image", images[1], "Compare them",
                  "--max-new-tokens", "12", "--ignore-eos", "--dtype", "float32", "--quiet")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_cli_image_errors(vl_folder, tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    out = run_cli("generate", str(vl_folder), "--image", str(bad), "hi", "--quiet")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "bad.png" in out.stderr or "image" in out.stderr.lower()
    out = run_cli("generate", str(tiny_ckpt), "--image", str(bad), "hi", "--quiet")
    assert out.returncode == 2 and "needs an LFM2-VL model" in out.stderr
