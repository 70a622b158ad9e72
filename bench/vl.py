"""LFM2-VL benchmark: fastlfm (engine) vs transformers on the same random bf16 weights.

Shape: LFM2-VL-1.6B (spec §2.3): the LFM2-1.2B text model, a SigLIP2 NaFlex tower of hidden
1152 / MLP 4304 / 16 heads / 26 layers, projector 4608 -> 2560 -> 2048. Workloads:
  - one 512x512 image (one 1024-patch view, 256 image tokens) + 32 text tokens, 128 new tokens,
    greedy with eos ignored, batch 1: time to first token (vision tower + prefill + first
    sample) and decode tok/s (tokens 2..128), fastlfm's engine vs transformers'
    Lfm2VlForConditionalGeneration.generate() (first-token and last-token times from a streamer);
  - images/s at batch 32: 32 requests with one distinct 512x512 image each and
    max_new_tokens=1 through the engine (end to end: vision, prefill, one token); the peer is
    transformers' vision tower + projector alone on the same 32 views (get_image_features),
    and both libraries' tower + projector alone are reported too.
Preprocessing (fastlfm's processor, CPU) is done beforehand and not timed, for both.

Run on a CUDA machine from the repo root:  PYTHONPATH=src python bench/vl.py
Smoke test on CPU (a tiny VL config, same code paths):  PYTHONPATH=src python bench/vl.py --device cpu --tiny
Prints one markdown table and writes it to $OUT/vl_table.md when $OUT is set.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from fastlfm.engine import LLMEngine
from fastlfm.models import load_model
from fastlfm.models.lfm2_vl_processing import Lfm2VlProcessor
from fastlfm.sampling import SamplingParams
from fastlfm.testing import real_config, tiny_vl_config, write_vl_checkpoint
from fastlfm.tokenizer import Tokenizer

IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
DEV = "cuda"


def log(*a):
    print(*a, flush=True)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def now():
    sync()
    return time.perf_counter()


def vl_1_6b_config() -> dict:
    """LFM2-VL-1.6B in the HF-native key style (26 encoder layers: vision_feature_layer -2 applied)."""
    text = real_config("LFM2-1.2B", torch_dtype="bfloat16")
    return tiny_vl_config(
        text=text, projector_hidden_size=2560, torch_dtype="bfloat16",
        vision_config={"model_type": "siglip2_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                       "num_hidden_layers": 26, "num_attention_heads": 16, "num_channels": 3, "patch_size": 16,
                       "num_patches": 256, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
                       "vision_use_head": False})


def ensure_checkpoint(folder: Path, tiny: bool, dtype: torch.dtype) -> Path:
    if not (folder / "model.safetensors").is_file():
        t = time.perf_counter()
        config = tiny_vl_config() if tiny else vl_1_6b_config()
        write_vl_checkpoint(folder, config, dtype=dtype)
        log(f"wrote random {'tiny' if tiny else 'LFM2-VL-1.6B'} weights to {folder} in {time.perf_counter() - t:.1f}s")
    return folder


def image(seed: int, size: int = 512):
    from PIL import Image

    return Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))


def request(processor, seed: int, n_text: int, vocab: int):
    """Prompt ids (BOS, the expanded image, n_text random text ids) and the image tensors."""
    enc = processor("<image>", [image(seed)])
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1000, min(vocab, 60000), (n_text,), generator=g).tolist()
    ids = [processor.tokenizer.bos_token_id] + enc["input_ids"][0] + text
    return ids, {k: enc[k] for k in IMAGE_KEYS}


class StepTimes:
    """A transformers streamer that records when each put() arrives (the first is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(now())

    def end(self):
        pass


def engine_single(engine, ids, images, new):
    """TTFT (s), decode tok/s and tokens of one request through the engine."""
    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    t0 = now()
    engine.add_request(ids, params, image_inputs=images)
    first = None
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            if first is None and out.new_token_ids:
                first = time.perf_counter()
            tokens = out.token_ids
    end = time.perf_counter()
    assert len(tokens) == new
    return first - t0, (new - 1) / (end - first), tokens


def hf_single(hf, ids, images, new, dtype):
    streamer = StepTimes()
    inputs = hf_inputs(ids, images, dtype)
    t0 = now()
    out = hf.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer,
                      pad_token_id=0)
    t = streamer.times  # [prompt, token 1, ..., token new]
    assert len(t) == new + 1 and out.shape[1] == len(ids) + new
    return t[1] - t0, (new - 1) / (t[-1] - t[1]), out[0, len(ids):].tolist()


def hf_inputs(ids, images, dtype):
    return {"input_ids": torch.tensor([ids], device=DEV), "attention_mask": torch.ones(1, len(ids), dtype=torch.long,
                                                                                       device=DEV),
            "pixel_values": images["pixel_values"].to(DEV, dtype),
            "pixel_attention_mask": images["pixel_attention_mask"].to(DEV),
            "spatial_shapes": images["spatial_shapes"].to(DEV)}


def stacked(reqs, dtype=None):
    out = {k: torch.cat([im[k] for _, im in reqs]).to(DEV) for k in IMAGE_KEYS}
    if dtype is not None:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


@torch.inference_mode()
def tower_images_per_s(fn, batch, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = now()
        fn()
        times.append(now() - t)
    return batch / min(times)


def main():
    global DEV
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny VL config (CPU smoke test)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--folder", default=None, help="checkpoint folder (default /tmp/fastlfm-bench-vl[-tiny])")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (a shared CPU: 1 avoids waiting on "
                                                               "descheduled threads)")
    args = ap.parse_args()
    DEV = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = DEV.startswith("cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if on_cuda else "fp32")]
    torch.manual_seed(0)
    folder = Path(args.folder or f"/tmp/fastlfm-bench-vl{'-tiny' if args.tiny else ''}-{str(dtype)[6:]}")
    ensure_checkpoint(folder, args.tiny, dtype)
    dev_name = torch.cuda.get_device_name(0) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    log(f"{dev_name}; torch {torch.__version__}; {dtype}; {'tiny VL config' if args.tiny else 'LFM2-VL-1.6B shape'}")

    tok = Tokenizer.from_pretrained(folder)
    processor = Lfm2VlProcessor.from_pretrained(folder, tok)
    model = load_model(folder, dtype=dtype, device=DEV)
    vocab = model.config.vocab_size
    single = request(processor, 0, args.prompt_tokens, vocab)
    warm = request(processor, 1, args.prompt_tokens, vocab)
    batch = [request(processor, 100 + i, args.prompt_tokens, vocab) for i in range(args.batch)]
    n_img = single[0].count(model.config.image_token_id)
    log(f"prompt: {len(single[0])} tokens ({n_img} image tokens, 1 view of "
        f"{tuple(single[1]['spatial_shapes'][0].tolist())} patches + {args.prompt_tokens} text)")

    rows, notes = [], []
    t = time.perf_counter()
    kw = dict(max_num_seqs=max(64, args.batch), max_model_len=1024, max_num_batched_tokens=16384,
              max_vision_views=args.batch, enable_prefix_caching=False)  # runs repeat their prompts
    if on_cuda:
        kw.update(gpu_memory_utilization=0.3)
    try:
        engine = LLMEngine(model, tok, compile=args.compile, **kw)
        mode = "graphs+compile" if args.compile and on_cuda else ("graphs" if on_cuda else "eager")
    except Exception as e:  # keep the run useful if inductor fails on this machine
        log(f"compile failed ({type(e).__name__}: {str(e)[:300]}); falling back to eager graphs")
        torch._dynamo.reset()
        engine = LLMEngine(model, tok, compile=False, **kw)
        mode = "graphs"
    log(f"engine ready in {time.perf_counter() - t:.1f}s ({mode})")

    # batch 1: TTFT + decode
    engine_single(engine, *warm, 8)
    runs = [engine_single(engine, *single, args.new_tokens) for _ in range(args.repeats)]
    ttft, decode = min(r[0] for r in runs), max(r[1] for r in runs)
    ours_tokens = runs[0][2]
    # batch 32 images end to end
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate([ids for ids, _ in batch[:2]], params, image_inputs=[im for _, im in batch[:2]])
    e2e = []
    for _ in range(args.repeats):
        t = now()
        outs = engine.generate([ids for ids, _ in batch], params, image_inputs=[im for _, im in batch])
        e2e.append(now() - t)
        assert all(len(o.token_ids) == 1 for o in outs)
    engine.check_no_leaks()
    e2e_ips = args.batch / min(e2e)
    views = stacked(batch)
    ours_tower = tower_images_per_s(lambda: model.get_image_features(
        views["pixel_values"], views["pixel_attention_mask"], views["spatial_shapes"]), args.batch, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")
    del engine
    if on_cuda:
        torch.cuda.empty_cache()

    hf_ttft = hf_decode = hf_tower = float("nan")
    if not args.no_hf:
        from transformers import Lfm2VlForConditionalGeneration

        hf = Lfm2VlForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(DEV).eval()
        hf_single(hf, *warm, 8, dtype)
        hf_runs = [hf_single(hf, *single, args.new_tokens, dtype) for _ in range(args.repeats)]
        hf_ttft, hf_decode = min(r[0] for r in hf_runs), max(r[1] for r in hf_runs)
        ref = hf_runs[0][2]
        same = next((i for i, (a, b) in enumerate(zip(ours_tokens, ref)) if a != b), len(ref))
        notes.append(f"greedy tokens, fastlfm engine vs transformers generate: first {same} of {len(ref)} identical"
                     + ("" if same == len(ref) else f" (then {ours_tokens[same]} vs {ref[same]}; random weights in "
                                                    f"{str(dtype)[6:]} have near-ties)"))
        log(notes[-1])
        hviews = stacked(batch, dtype)
        hf_tower = tower_images_per_s(lambda: hf.model.get_image_features(
            pixel_values=hviews["pixel_values"], spatial_shapes=hviews["spatial_shapes"],
            pixel_attention_mask=hviews["pixel_attention_mask"]), args.batch, args.repeats)
        del hf
        if on_cuda:
            torch.cuda.empty_cache()

    rows.append((f"TTFT, 1 image 512x512 + {args.prompt_tokens} tokens", ttft * 1e3, hf_ttft * 1e3, "ms", True))
    rows.append((f"decode, batch 1 ({args.new_tokens} new tokens)", decode, hf_decode, "tok/s", False))
    rows.append((f"images/s, batch {args.batch}: engine end to end (vision + prefill + 1 token) vs transformers "
                 "tower + projector", e2e_ips, hf_tower, "images/s", False))
    rows.append((f"images/s, batch {args.batch}: vision tower + projector alone", ours_tower, hf_tower, "images/s",
                 False))
    lines = [f"Device: {dev_name}; {time.strftime('%Y-%m-%d')}; torch {torch.__version__}; {str(dtype)[6:]}; "
             f"{'tiny VL config (smoke test)' if args.tiny else 'LFM2-VL-1.6B shape'}, random weights; engine {mode}",
             "", "| metric | fastlfm | transformers | fastlfm speed-up | unit |", "|---|---|---|---|---|"]
    for metric, ours, peer, unit, lower_is_better in rows:
        fmt = (lambda v: f"{v:,.1f}") if ours < 1000 else (lambda v: f"{v:,.0f}")
        vs = "-" if peer != peer else f"{peer / ours if lower_is_better else ours / peer:.2f}x"
        lines.append(f"| {metric} | {fmt(ours)} | {fmt(peer) if peer == peer else '-'} | {vs} | {unit} |")
    lines += ["", "Speed-up: transformers time / fastlfm time (TTFT), fastlfm rate / transformers rate (others).",
              f"Prompt: {len(single[0])} tokens ({n_img} image tokens). Best of {args.repeats} runs after a "
              "warm-up. TTFT: from submitting the request to the first sampled token (fastlfm: engine step output; "
              "transformers: generate() streamer). Decode: tokens 2..N over their wall time. Preprocessing not "
              "timed. Peak GPU memory (engine phase): " + (f"{peak:.1f} GiB" if peak == peak else "-"), *notes]
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vl_table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
