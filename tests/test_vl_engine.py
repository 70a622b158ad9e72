"""LFM2-VL in the engine (CPU, fp32): image prompts batched with text prompts, chunked prefill
across image spans, preemption, aborts, the async engine and LLM.chat batches.

Oracle: transformers' Lfm2VlForConditionalGeneration.generate (greedy), run on each prompt
alone with the same prompt ids and image tensors. Properties: the vision tower encodes each
request's views exactly once (counted by a forward hook), decode-only steps feed token ids,
and every KV block and conv slot comes back.
"""

import asyncio
import random

import pytest
import torch
import transformers
from PIL import Image

from fastlfm.engine import AsyncLLMEngine, LLMEngine
from fastlfm.llm import LLM
from fastlfm.models import load_model
from fastlfm.models.lfm2_vl_processing import Lfm2VlImageProcessor, Lfm2VlProcessor
from fastlfm.sampling import SamplingParams
from fastlfm.testing import write_vl_checkpoint
from fastlfm.tokenizer import Tokenizer

NEW = 10
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def image(w, h, seed):
    return Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(w * h * 3))


def user(*parts, system=None):
    content = [{"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p}
               for p in parts]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_vl_checkpoint(tmp_path_factory.mktemp("vl-engine"))


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_model(folder):
    return transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def requests(folder):
    """(prompt ids, image inputs or None) for five conversations: images of the checkpoint's
    processor (1024-patch views) and of a small-tile processor (128-patch views: two tiles,
    a thumbnail and a second image, so the `<image>` runs are split by other tokens)."""
    tok = Tokenizer.from_pretrained(folder)
    default = Lfm2VlProcessor.from_pretrained(folder, tok)
    small = Lfm2VlProcessor(tok, Lfm2VlImageProcessor(tile_size=128, max_tiles=4, min_image_tokens=8,
                                                      max_image_tokens=32))
    convs = [
        (default, user(image(300, 200, 1), "Describe this.")),
        (default, user("hello, how are you today?")),
        (small, user(image(512, 256, 2), "and", image(64, 64, 3), "compare the two images")),
        (small, user("tell me a long story about a cat and a dog that became friends")),
        (small, user(image(300, 200, 4), "what is it?", system="You are a helpful multimodal assistant.")),
    ]
    out = []
    for proc, messages in convs:
        enc = proc.apply_chat_template(messages)
        images = {k: enc[k] for k in IMAGE_KEYS} if "pixel_values" in enc else None
        out.append((enc["input_ids"][0], images))
    return out


@pytest.fixture(scope="module")
def reference(hf_model, requests):
    refs = []
    for ids, images in requests:
        out = hf_model.generate(input_ids=torch.tensor([ids]), **(images or {}), max_new_tokens=NEW,
                                min_new_tokens=NEW, do_sample=False)
        refs.append(out[0, len(ids):].tolist())
    return refs


def test_fixture_prompts(model, requests):
    """The prompts exercise what they should: several views, split runs, two patch counts."""
    tid = model.config.image_token_id
    assert [images is not None for _, images in requests] == [True, False, True, False, True]
    views = [images["spatial_shapes"].shape[0] for _, images in requests if images is not None]
    assert views == [1, 4, 1]  # request 2: two tiles + thumbnail, then the second image
    assert {images["pixel_values"].shape[1] for _, images in requests if images is not None} == {1024, 128}
    for ids, images in requests:
        n = ids.count(tid)
        expected = 0 if images is None else sum(h * w // 4 for h, w in images["spatial_shapes"].tolist())
        assert n == expected
    runs = sum(1 for a, b in zip(requests[2][0], requests[2][0][1:]) if a == tid and b != tid)
    assert runs == 4


@pytest.fixture
def counted(model):
    """Count the views the vision tower encodes, and whether each forward got embeddings."""
    views, forwards = [], []
    h1 = model.model.vision_tower.register_forward_hook(lambda m, args, out: views.append(args[0].shape[0]))
    h2 = model.register_forward_pre_hook(
        lambda m, args, kwargs: forwards.append(kwargs.get("inputs_embeds") is not None), with_kwargs=True)
    yield views, forwards
    h1.remove()
    h2.remove()


def record_chunks(engine, forwards):
    """Wrap the runner: each step's [(request id, chunk start, chunk length)], and whether the step ran
    the model on embeddings (`forwards`, of `counted`: a step that replays a recorded decode step
    runs no forward, and so gets none)."""
    steps, embedded = [], []
    execute = engine.runner.execute

    def wrapped(batch, *args):
        steps.append([(s.request_id, s.num_computed_tokens, n) for s, n in zip(batch.seqs, batch.num_tokens)])
        before = len(forwards)
        out = execute(batch, *args)
        embedded.append(any(forwards[before:]))
        return out

    engine.runner.execute = wrapped
    return steps, embedded


def run_staggered(engine, requests, arrive_at):
    finals, seqs, step, pending = {}, {}, 0, sorted(range(len(requests)), key=lambda i: arrive_at[i])
    while pending or engine.has_unfinished():
        while pending and arrive_at[pending[0]] <= step:
            i = pending.pop(0)
            ids, images = requests[i]
            seqs[i] = engine.add_request(ids, GREEDY, f"r{i}", image_inputs=images)
        for out in engine.step():
            if out.finished:
                finals[int(out.request_id[1:])] = out
        step += 1
    return [finals[i] for i in range(len(requests))], seqs


def total_views(requests):
    return sum(images["spatial_shapes"].shape[0] for _, images in requests if images is not None)


def test_mixed_image_and_text_batch_matches_transformers(model, requests, reference, counted, async_scheduling):
    views, forwards = counted
    engine = LLMEngine(model, max_num_seqs=8, max_model_len=256, async_scheduling=async_scheduling)
    outs, seqs = run_staggered(engine, requests, arrive_at=[0, 0, 1, 3, 1])
    assert [o.token_ids for o in outs] == reference
    assert all(o.num_prompt_tokens == len(ids) for o, (ids, _) in zip(outs, requests))
    # each request's views encoded once; requests 2 and 4 start in one step and share a call
    assert views == [1, 4 + 1]
    assert all(s.image_embeds is None and s.image_inputs is None for s in seqs.values())  # released
    assert forwards.count(True) == 2 and forwards[-1] is False  # decode steps are token ids only
    engine.check_no_leaks()


@pytest.mark.parametrize("budget", [1, 7])
def test_chunked_prefill_across_image_spans(model, requests, reference, counted, budget, async_scheduling):
    views, forwards = counted
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=budget, block_size=4,
                       async_scheduling=async_scheduling)
    steps, embedded = record_chunks(engine, forwards)
    outs, _ = run_staggered(engine, requests, arrive_at=[0, 1, 1, 2, 9])
    assert [o.token_ids for o in outs] == reference
    assert sum(views) == total_views(requests)
    positions = {f"r{i}": {p for p, t in enumerate(ids) if t == model.config.image_token_id}
                 for i, (ids, _) in enumerate(requests)}
    # a chunk starts between two `<image>` tokens of one span
    inside = [(rid, start) for step in steps for rid, start, n in step
              if start - 1 in positions[rid] and start in positions[rid]]
    assert len(inside) >= 3
    # the model got embeddings exactly in the steps whose chunks hold `<image>` positions
    with_images = [any(positions[rid] & set(range(start, start + n)) for rid, start, n in step) for step in steps]
    assert embedded == with_images
    if budget == 1:  # one-token chunks on image positions go through the decode-row path
        assert sum(with_images) == sum(len(p) for p in positions.values())
    engine.check_no_leaks()


def test_preemption_recomputes_with_cached_image_features(model, requests, reference, counted, async_scheduling):
    views, _ = counted
    # 24 blocks of 8 tokens = 192 tokens for ~560 tokens of demand: sequences are preempted and
    # recomputed from prompt + outputs, with the image features kept from the first encode.
    engine = LLMEngine(model, max_num_seqs=5, max_model_len=176, num_kv_blocks=24, block_size=8,
                       max_num_batched_tokens=48, async_scheduling=async_scheduling)
    preempted = []
    preempt = engine.scheduler._preempt

    def spy(seq):
        preempted.append((seq.request_id, seq.image_embeds is not None))
        preempt(seq)

    engine.scheduler._preempt = spy
    outs, _ = run_staggered(engine, requests, arrive_at=[0] * 5)
    assert [o.token_ids for o in outs] == reference
    assert any(encoded for _, encoded in preempted), preempted  # an image request lost its cache
    assert sum(views) == total_views(requests)  # ...and was recomputed without a second encode
    engine.check_no_leaks()


def test_abort_mid_image_prefill_frees_everything(model, requests, reference):
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=16, block_size=4)
    seqs = [engine.add_request(ids, GREEDY, f"r{i}", image_inputs=images) for i, (ids, images) in enumerate(requests)]
    finals = {}
    for step in range(400):
        if step == 3:
            assert seqs[0].image_embeds is not None and 0 < seqs[0].num_computed_tokens < seqs[0].num_prompt_tokens
            engine.abort("r0")  # inside its image span
            assert seqs[0].image_embeds is None
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if not engine.has_unfinished():
            break
    assert sorted(finals) == ["r1", "r2", "r3", "r4"]
    assert [finals[f"r{i}"].token_ids for i in range(1, 5)] == reference[1:]
    engine.check_no_leaks()


def test_image_input_errors(model, requests, tiny_ckpt):
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=256)
    ids, images = requests[0]
    tid = model.config.image_token_id
    with pytest.raises(ValueError, match=rf"prompt has {ids.count(tid) - 1} image tokens \(id {tid}\) but the "
                                         rf"images give {ids.count(tid)} features"):
        k = ids.index(tid)
        engine.add_request(ids[:k] + ids[k + 1:], GREEDY, image_inputs=images)
    with pytest.raises(ValueError, match=rf"{ids.count(tid)} image tokens \(id {tid}\) but no image inputs"):
        engine.add_request(ids, GREEDY)
    with pytest.raises(ValueError, match="lack pixel_attention_mask"):
        engine.add_request(ids, GREEDY, image_inputs={"pixel_values": images["pixel_values"],
                                                      "spatial_shapes": images["spatial_shapes"]})
    bad = dict(images, spatial_shapes=torch.tensor([[13, 20]]))
    with pytest.raises(ValueError, match=r"spatial_shapes\[0\] = \(13, 20\).*downsample_factor 2"):
        engine.add_request(ids, GREEDY, image_inputs=bad)
    assert not engine.has_unfinished()
    text_engine = LLMEngine(load_model(tiny_ckpt, dtype=torch.float32), max_num_seqs=2, max_model_len=256)
    with pytest.raises(ValueError, match="model is text-only"):
        text_engine.add_request([1, 2, 3], GREEDY, image_inputs=images)
    engine.check_no_leaks()


def test_view_digests_made_ahead_are_the_prefix_cache_keys(model, requests, reference):
    """The server makes each view's digest while it prepares the request (multimodal.view_digests), off
    the engine's thread: the engine's prefix-cache keys are then the ones it would have computed, the
    greedy tokens unchanged; malformed digests are refused by name."""
    from fastlfm.engine.multimodal import DIGESTS_KEY, check_image_inputs, image_keys, view_digests

    ids, images = requests[2]  # two images: two tiles and a thumbnail, and one view
    plain, positions = check_image_inputs(model.config, ids, images)
    given, _ = check_image_inputs(model.config, ids, dict(images, **{DIGESTS_KEY: view_digests(images)}))
    assert given.digests is not None and len(given.digests) == plain.num_views == 4
    assert image_keys(model.config, given, positions) == image_keys(model.config, plain, positions)
    assert len(set(given.digests)) == 4  # different pixels, different digests
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=512)
    out = engine.generate([ids], GREEDY, image_inputs=[dict(images, **{DIGESTS_KEY: view_digests(images)})])[0]
    assert out.token_ids == reference[2]
    for bad in ([b"x"], "abc", [1, 2, 3]):
        with pytest.raises(ValueError, match=DIGESTS_KEY):
            engine.add_request(ids, GREEDY, image_inputs=dict(images, **{DIGESTS_KEY: bad}))
    engine.check_no_leaks()


def test_async_engine_passes_images(model, requests, reference):
    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=32))

        async def collect(i):
            ids, images = requests[i]
            return [o async for o in engine.generate(ids, GREEDY, f"a{i}", image_inputs=images)]

        outs = await asyncio.gather(*(collect(i) for i in range(len(requests))))
        with pytest.raises(ValueError, match="no image inputs"):
            async for _ in engine.generate(requests[0][0], GREEDY, "noimg"):
                pass
        await engine.shutdown()
        return outs, engine

    outs, engine = asyncio.run(main())
    for chunks, ref in zip(outs, reference):
        assert [t for c in chunks for t in c.new_token_ids] == ref and chunks[-1].finished
    engine.engine.check_no_leaks()


def test_llm_chat_batch_runs_images_on_the_engine(folder, hf_model):
    llm = LLM(folder, dtype="float32")
    convs = [user(image(300, 200, 7), "What is in the picture?"), user("Say something."),
             user(image(64, 64, 8), image(256, 256, 9), "Compare them")]
    results = llm.chat(convs, max_new_tokens=NEW, ignore_eos=True)
    assert llm.engine.processor is llm.processor and llm.engine is llm.model.get_engine()
    for conv, res in zip(convs, results):
        ids, images = llm._prepare_chat(conv)
        expected = hf_model.generate(input_ids=torch.tensor([ids]), **images, max_new_tokens=NEW,
                                     min_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()
        assert res.token_ids == expected
        assert res.text == llm.tokenizer.decode(expected, skip_special_tokens=True)
    # one conversation still runs on the single-model path and agrees
    assert llm.chat(convs[0], max_new_tokens=NEW, ignore_eos=True).token_ids == results[0].token_ids
    llm.engine.check_no_leaks()


def test_prefix_cache_keys_blocks_by_image_content(model, hf_model, folder, requests, reference, counted,
                                                   async_scheduling):
    """Images are part of the prefix: the same image and text again reuse the blocks over its
    features (the vision tower is not run again when all of them are cached); the same token
    ids with other pixels reuse only the text before the image, and answer for the new image."""
    views, _ = counted
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=320, block_size=8, async_scheduling=async_scheduling)
    ids, images = requests[0]
    positions = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
    first = engine.generate([ids], GREEDY, image_inputs=[images])[0]
    assert first.token_ids == reference[0] and first.num_cached_tokens == 0
    assert views == [1]
    again = engine.generate([ids], GREEDY, image_inputs=[images])[0]
    assert again.token_ids == reference[0]
    assert again.num_cached_tokens == (len(ids) - 1) // 8 * 8 > positions[-1]
    assert views == [1]  # every feature position was cached: no encode

    proc = Lfm2VlProcessor.from_pretrained(folder, Tokenizer.from_pretrained(folder))
    enc = proc.apply_chat_template(user(image(300, 200, 99), "Describe this."))
    other = {k: enc[k] for k in IMAGE_KEYS}
    assert enc["input_ids"][0] == ids and not torch.equal(other["pixel_values"], images["pixel_values"])
    ref = hf_model.generate(input_ids=torch.tensor([ids]), **other, max_new_tokens=NEW, min_new_tokens=NEW,
                            do_sample=False)[0, len(ids):].tolist()
    out = engine.generate([ids], GREEDY, image_inputs=[other])[0]
    assert out.token_ids == ref != reference[0]
    assert out.num_cached_tokens == positions[0] // 8 * 8  # the text before the image only
    assert views == [1, 1]
    engine.check_no_leaks()
