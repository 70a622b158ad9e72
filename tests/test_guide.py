"""Liquid AI's transformers guide for LFM2, every example copied with only the import changed
(`from fastlfm import ...` for `from transformers import ...`), run on fastlfm and compared with the
same code run on transformers (the oracle): the same tokens, text and printed output.

Both sides get the same edits (SHARED): the fixture checkpoints for the hub ids, fp32 for bf16
(kernels round bf16 differently), few new tokens, greedy where the guide samples, fixture images.
The transformers side gets the edits that transformers 5.23 without accelerate needs to run code
written for 4.57 (TRANSFORMERS_ONLY); fastlfm runs the guide as written. LFM2-VL: transformers'
image processor needs torchvision (test_vl_processing compares it with ours in a subprocess), so
its oracle is transformers' model.generate on the tensors of our processor, decoded by its tokenizer.
"""

import contextlib
import io

import pytest
import torch
import transformers

import fastlfm
from fastlfm.sampling import SamplingParams
from fastlfm.testing import tiny_moe_config, write_checkpoint

BASIC = r'''from transformers import AutoModelForCausalLM, AutoTokenizer

# Load model and tokenizer
model_id = "LiquidAI/LFM2-1.2B"
model = AutoModelForCausalLM.from_pretrained(
    model_id,
    device_map="auto",
    torch_dtype="bfloat16",
#    attn_implementation="flash_attention_2" <- uncomment on compatible GPU
)
tokenizer = AutoTokenizer.from_pretrained(model_id)

# Generate answer
prompt = "What is C. elegans?"
input_ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": prompt}],
    add_generation_prompt=True,
    return_tensors="pt",
    tokenize=True,
).to(model.device)

output = model.generate(input_ids, max_new_tokens=512)

# Decode only the newly generated tokens (excluding the input prompt)
response = tokenizer.decode(output[0][len(input_ids[0]):], skip_special_tokens=True)
print(response)

# C. elegans, also known as Caenorhabditis elegans, is a small, free-living
# nematode worm (roundworm) that belongs to the phylum Nematoda.
'''

PIPELINE = r'''from transformers import pipeline

generator = pipeline(
    "text-generation",
    "LiquidAI/LFM2-1.2B",
    torch_dtype="auto",
    device_map="auto",
)

messages = [
    {"role": "user", "content": "Give me a short introduction to large language models."},
]
messages = generator(messages, max_new_tokens=512)[0]["generated_text"]

messages.append({"role": "user", "content": "In a single sentence."})
messages = generator(messages, max_new_tokens=512)[0]["generated_text"]
'''

GENERATION_CONFIG = r'''from transformers import GenerationConfig

# Create a generation config
generation_config = GenerationConfig(
    do_sample=True,
    temperature=0.3,
    min_p=0.15,
    repetition_penalty=1.05,
    max_new_tokens=512,
)

# Use it in generate()
output = model.generate(input_ids, generation_config=generation_config)
'''

STREAMING = r'''from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

# Use the model and tokenizer setup from Basic Usage above

prompt = "Tell me a story about space exploration."
input_ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": prompt}],
    add_generation_prompt=True,
    return_tensors="pt",
    tokenize=True,
).to(model.device)

streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
output = model.generate(input_ids, streamer=streamer, max_new_tokens=512)
'''

BATCH = r'''from transformers import AutoModelForCausalLM, AutoTokenizer

# Use the model and tokenizer setup from Basic Usage above

# Prepare multiple prompts
prompts = [
    [{"role": "user", "content": "Give me a short introduction to large language models."}],
    [{"role": "user", "content": "Give me a detailed introduction to large language models."}],
]

# Apply chat templates and tokenize
batch = tokenizer.apply_chat_template(
    prompts,
    add_generation_prompt=True,
    return_tensors="pt",
    tokenize=True,
    padding=True,
).to(model.device)

# Generate for all prompts in batch
outputs = model.generate(batch, max_new_tokens=512)

# Decode outputs
for output in outputs:
    print(tokenizer.decode(output, skip_special_tokens=True))
'''

VISION = r'''from transformers import AutoModelForCausalLM, AutoProcessor
from PIL import Image

# Load vision model and processor
model_id = "LiquidAI/LFM2-VL-1.6B"
model = AutoModelForCausalLM.from_pretrained(
    model_id,
    device_map="auto",
    torch_dtype="bfloat16",
)
processor = AutoProcessor.from_pretrained(model_id)

# Load image
image = Image.open("path/to/image.jpg")

# Create prompt with image
messages = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "What's in this image?"}
        ]
    }
]

# Apply chat template and process image
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)

# Generate
output = model.generate(**inputs, max_new_tokens=256)

# Decode response
response = processor.batch_decode(output, skip_special_tokens=True)[0]
print(response)
'''

VISION_TWO_IMAGES = r'''from transformers import AutoModelForCausalLM, AutoProcessor
from PIL import Image

# Use the model and processor setup from above

image1 = Image.open("path/to/first.jpg")
image2 = Image.open("path/to/second.jpg")

messages = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "image"},
            {"type": "text", "text": "What are the differences between these two images?"}
        ]
    }
]

prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image1, image2], text=prompt, return_tensors="pt").to(model.device)

output = model.generate(**inputs, max_new_tokens=256)

response = processor.batch_decode(output, skip_special_tokens=True)[0]
print(response)
'''

NEW_TOKENS = 24
SHARED = [('torch_dtype="bfloat16"', 'torch_dtype="float32"'), ("max_new_tokens=512", f"max_new_tokens={NEW_TOKENS}"),
          ("max_new_tokens=256", f"max_new_tokens={NEW_TOKENS}"), ("do_sample=True", "do_sample=False")]
# transformers' pipeline samples by default (temperature 0.7): both sides are made greedy the same way
GREEDY_PIPELINE = [("max_new_tokens=512)", f"max_new_tokens={NEW_TOKENS}, do_sample=False)")]
# the guide's two batch prompts have the same length in the fixture's small vocabulary: one is made longer
# so that the batch needs padding
LONGER_SECOND_PROMPT = [("detailed introduction to large language models.",
                         "detailed introduction to large language models, with their history.")]
TRANSFORMERS_ONLY = [('device_map="auto",', ""),  # needs accelerate, which is not installed
                     ("tokenize=True,", "tokenize=True, return_dict=False,")]  # 5.x returns a dict by default


def run(snippet, lib, namespace, paths, extra=()):
    """Execute a guide example on `lib` ("fastlfm" or "transformers") in `namespace`; its stdout."""
    code = snippet
    edits = [*extra, *SHARED, *(TRANSFORMERS_ONLY if lib == "transformers" else ()), *paths.items()]
    if lib == "fastlfm":
        edits.append(("from transformers import", "from fastlfm import"))
    for old, new in edits:
        code = code.replace(old, new)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), torch.no_grad():
        exec(compile(code, f"<guide on {lib}>", "exec"), namespace)
    return out.getvalue()


@pytest.fixture(scope="module")
def paths(wandering_ckpt, vl_folder, images):
    return {"LiquidAI/LFM2-1.2B": str(wandering_ckpt), "LiquidAI/LFM2-VL-1.6B": str(vl_folder),
            "path/to/image.jpg": images[0], "path/to/first.jpg": images[0], "path/to/second.jpg": images[1]}


@pytest.fixture(scope="module")
def basic(paths):
    """The Basic Usage example on both sides: its namespace (model, tokenizer, input_ids, ...) and stdout."""
    ours, ref = {}, {}
    printed = run(BASIC, "fastlfm", ours, paths), run(BASIC, "transformers", ref, paths)
    return ours, ref, printed


def test_basic_usage(basic):
    ours, ref, (printed, expected) = basic
    assert isinstance(ours["model"], fastlfm.Lfm2ForCausalLM) and ours["model"].device == torch.device("cpu")
    assert isinstance(ours["input_ids"], torch.Tensor) and torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["output"], ref["output"]) and ours["output"].shape[1] > ref["input_ids"].shape[1] + 4
    assert ours["response"] == ref["response"] and printed == expected and len(expected) > 10
    assert ours["model"]._engine is not None  # it ran on the model's engine


def test_generation_config(basic, paths, monkeypatch):
    ours, ref, _ = basic
    run(GENERATION_CONFIG, "fastlfm", ours, paths)
    run(GENERATION_CONFIG, "transformers", ref, paths)
    assert isinstance(ours["generation_config"], fastlfm.GenerationConfig)
    assert torch.equal(ours["output"], ref["output"])
    # the guide as written (sampling): its settings reach the engine's sampler, and keywords win over them
    guide = {}
    exec(GENERATION_CONFIG.replace("from transformers", "from fastlfm").replace("output = model.generate", "#"), guide)
    engine, requested = ours["model"]._engine, []
    add_request = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda ids, params, **kw: requested.append(params) or
                        add_request(ids, params, **kw))
    ours["model"].generate(ours["input_ids"], generation_config=guide["generation_config"], max_new_tokens=3)
    assert requested == [SamplingParams(do_sample=True, temperature=0.3, min_p=0.15, repetition_penalty=1.05,
                                        max_new_tokens=3, stop_token_ids=[7])]


def test_generation_config_keywords_and_fallbacks_match_transformers(basic):
    ours, ref, _ = basic
    ids = ours["input_ids"]
    for ours_config, ref_config, kwargs in [
        (fastlfm.GenerationConfig(max_new_tokens=5), transformers.GenerationConfig(max_new_tokens=5), {"max_new_tokens": 9}),
        (fastlfm.GenerationConfig(max_length=ids.shape[1] + 6), transformers.GenerationConfig(max_length=ids.shape[1] + 6), {}),
        (fastlfm.GenerationConfig(repetition_penalty=1.5, max_new_tokens=12),
         transformers.GenerationConfig(repetition_penalty=1.5, max_new_tokens=12), {}),
    ]:
        got = ours["model"].generate(ids, generation_config=ours_config, **kwargs)
        with torch.no_grad():
            expected = ref["model"].generate(ids, generation_config=ref_config, **kwargs)
        assert torch.equal(got, expected), (ours_config, kwargs)
    assert ours["model"].generation_config.eos_token_id == ref["model"].generation_config.eos_token_id == 7
    got = ours["model"].generate(ids, generation_config=fastlfm.GenerationConfig(return_dict_in_generate=True,
                                                                                 max_new_tokens=4))
    with torch.no_grad():
        expected = ref["model"].generate(ids, generation_config=transformers.GenerationConfig(
            return_dict_in_generate=True, max_new_tokens=4))
    assert torch.equal(got.sequences, expected.sequences)
    # a transformers GenerationConfig works too
    got = ours["model"].generate(ids, generation_config=transformers.GenerationConfig(max_new_tokens=7))
    assert got.shape[1] == ids.shape[1] + 7


def test_streaming(basic, paths):
    ours, ref, _ = basic
    printed, expected = run(STREAMING, "fastlfm", ours, paths), run(STREAMING, "transformers", ref, paths)
    assert printed == expected and len(expected) > 10
    assert torch.equal(ours["output"], ref["output"])


def test_batch_generation(basic, paths):
    ours, ref, _ = basic
    ref["tokenizer"].padding_side = "left"  # transformers pads on the right by default: generate() then goes wrong
    try:
        printed, expected = (run(BATCH, lib, ns, paths, extra=LONGER_SECOND_PROMPT) for lib, ns in
                             (("fastlfm", ours), ("transformers", ref)))
    finally:
        ref["tokenizer"].padding_side = "right"
    batch = ours["batch"]
    assert batch.shape[0] == 2 and (batch[0] == 0).any() and not (batch[1] == 0).any()  # the short prompt, left-padded
    assert torch.equal(batch, ref["batch"]) and torch.equal(ours["outputs"], ref["outputs"])
    assert printed == expected and len(expected.splitlines()) >= 2
    # the 5.x form: a dict with the attention mask, whole or unpacked
    enc = ours["tokenizer"].apply_chat_template(ours["prompts"], add_generation_prompt=True, return_tensors="pt",
                                                tokenize=True, padding=True, return_dict=True)
    assert torch.equal(enc["attention_mask"], (batch != 0).long())
    model = ours["model"]
    assert torch.equal(model.generate(enc, max_new_tokens=NEW_TOKENS), ref["outputs"])
    assert torch.equal(model.generate(**enc, max_new_tokens=NEW_TOKENS), ref["outputs"])


def test_pipeline(paths):
    ours, ref = {}, {}
    run(PIPELINE, "fastlfm", ours, paths, extra=GREEDY_PIPELINE)
    run(PIPELINE, "transformers", ref, paths, extra=GREEDY_PIPELINE)
    assert [m["role"] for m in ours["messages"]] == ["user", "assistant", "user", "assistant"]
    assert ours["messages"] == ref["messages"] and all(m["content"] for m in ours["messages"])
    assert ours["generator"].model.get_engine() is not None  # on the engine
    for prompt in ("Hello there", ["Hello there", "Hi"]):
        for return_full_text in (True, False):
            kwargs = dict(max_new_tokens=8, do_sample=False, return_full_text=return_full_text)
            assert ours["generator"](prompt, **kwargs) == ref["generator"](prompt, **kwargs)


def test_pipeline_generation_defaults_are_transformers(paths):
    """Without do_sample, transformers' pipeline samples at temperature 0.7 (the model's generation
    config does not set them): the same settings reach generate() here."""
    ours = fastlfm.pipeline("text-generation", paths["LiquidAI/LFM2-1.2B"])
    ref = transformers.pipeline("text-generation", paths["LiquidAI/LFM2-1.2B"])
    for kwargs in ({"max_new_tokens": 5}, {}, {"do_sample": False}, {"max_length": 30}):
        expected = ref._prepare_generate_kwargs(kwargs)
        expected.pop("pad_token_id", None)
        assert ours._with_defaults(kwargs) == expected


def vision_oracle(ref_model, hf_tok, inputs):
    with torch.no_grad():
        output = ref_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return output, hf_tok.batch_decode(output, skip_special_tokens=True)[0]


@pytest.mark.parametrize("snippet", [VISION, VISION_TWO_IMAGES], ids=["one_image", "two_images"])
def test_vision(paths, vl_folder, snippet):
    ours = {}
    if snippet is VISION_TWO_IMAGES:  # "Use the model and processor setup from above"
        run(VISION, "fastlfm", ours, paths)
    printed = run(snippet, "fastlfm", ours, paths)
    assert isinstance(ours["model"], fastlfm.Lfm2VlForConditionalGeneration)
    hf_tok = transformers.AutoTokenizer.from_pretrained(vl_folder)
    assert ours["prompt"] == hf_tok.apply_chat_template(ours["messages"], add_generation_prompt=True, tokenize=False)
    ref_model = transformers.AutoModelForImageTextToText.from_pretrained(vl_folder, dtype=torch.float32).eval()
    inputs = ours["inputs"]
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "spatial_shapes"}
    output, response = vision_oracle(ref_model, hf_tok, inputs)
    assert torch.equal(ours["output"], output) and ours["response"] == response and printed == response + "\n"
    # the same conversation with the images in it, tokenized by apply_chat_template (return_dict=True)
    images = [part for part in ours["messages"][0]["content"] if part["type"] == "image"]
    pictures = [paths["path/to/image.jpg"]] if len(images) == 1 else [paths["path/to/first.jpg"], paths["path/to/second.jpg"]]
    conversation = [{"role": "user", "content": [{"type": "image", "image": p} for p in pictures]
                     + [ours["messages"][0]["content"][-1]]}]
    enc = ours["processor"].apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True, tokenize=True)
    assert set(enc) == set(inputs) and all(torch.equal(enc[k], inputs[k]) for k in inputs)


def test_unsupported_parameters_are_refused_by_name(basic):
    model, ids = basic[0]["model"], basic[0]["input_ids"]
    for kwargs, name in [({"num_beams": 2}, "num_beams"), ({"output_scores": True}, "output_scores"),
                         ({"num_return_sequences": 2}, "num_return_sequences"), ({"min_new_tokens": 3}, "min_new_tokens"),
                         ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"), ({"typical_p": 0.5}, "typical_p"),
                         ({"output_attentions": True}, "output_attentions"), ({"beam_width": 3}, "beam_width")]:
        with pytest.raises(ValueError, match=name):
            model.generate(ids, max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match="num_beams"):
        fastlfm.GenerationConfig(num_beams=4)
    with pytest.raises(ValueError, match="temprature"):
        fastlfm.GenerationConfig(temprature=0.3)
    with pytest.raises(ValueError, match="num_beams"):  # in a transformers GenerationConfig too
        model.generate(ids, generation_config=transformers.GenerationConfig(num_beams=3))
    assert not model.get_engine().has_unfinished()


def test_auto_classes_dispatch_on_model_type(paths, vl_folder, tmp_path):
    text = paths["LiquidAI/LFM2-1.2B"]
    assert isinstance(fastlfm.AutoModelForCausalLM.from_pretrained(text, dtype="float32"), fastlfm.Lfm2ForCausalLM)
    assert isinstance(fastlfm.AutoModelForImageTextToText.from_pretrained(vl_folder),
                      fastlfm.Lfm2VlForConditionalGeneration)
    assert isinstance(fastlfm.AutoProcessor.from_pretrained(text), type(fastlfm.AutoTokenizer.from_pretrained(text)))
    moe = write_checkpoint(tmp_path / "moe", tiny_moe_config(), tokenizer=False)
    assert isinstance(fastlfm.AutoModelForCausalLM.from_pretrained(moe), fastlfm.Lfm2MoeForCausalLM)
    with pytest.raises(fastlfm.CheckpointError, match=r"config.json: model_type 'lfm2' is not one AutoModelForVision2Seq"):
        fastlfm.AutoModelForVision2Seq.from_pretrained(text)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(fastlfm.CheckpointError, match=rf"{tmp_path}/config.json: model_type 'llama'"):
        fastlfm.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="device_map='gpu0'"):
        fastlfm.AutoModelForCausalLM.from_pretrained(text, device_map="gpu0")
    with pytest.raises(ValueError, match="several devices"):
        fastlfm.AutoModelForCausalLM.from_pretrained(text, device_map={"model.embed_tokens": 0, "lm_head": "cpu"})
    with pytest.raises(ValueError, match="quantization_config"):
        fastlfm.AutoModelForCausalLM.from_pretrained(text, quantization_config={})
    with pytest.raises(ValueError, match="'summarization'"):
        fastlfm.pipeline("summarization", text)
