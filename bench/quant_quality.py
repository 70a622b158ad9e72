"""Quality of fastlfm's CPU weight formats against fp32, on the bundled demo model (a real,
trained tiny LFM2: its answers can be right or wrong, unlike random-weight fixtures).

Formats: bf16 (oneDNN packed), int8 per channel, int4 groups of 32 / 64 (symmetric, as Q4_0, and
min/max with a zero per group; embedding and head int8 in all), and GGUF Q8_0 / Q4_0 files written from the same weights (gguf package).
Metrics, on the held-out task questions with their reference answers (teacher-forced over the
whole rendered conversation, answer tokens only):
- perplexity of the reference answers (fp32's next to it), and the mean KL(fp32 || format) per token;
- top-1 agreement: the share of answer positions where the format's argmax equals fp32's;
- greedy agreement: generating up to 48 tokens per question (engine, greedy), the share of
  questions whose tokens equal fp32's exactly, and the task accuracy (exact match) of each.

    python bench/quant_quality.py [--items 200] [--formats int8 "GGUF Q4_0" ...]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--formats", nargs="*", default=None, help="names to run (the fp32 reference always runs)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from fastlfm.cpu_linear import prepare_for_cpu
    from fastlfm.loading import DEMO_MODEL_DIR
    from fastlfm import load_model  # (GGUF files load through the top-level function)
    from fastlfm.sampling import SamplingParams
    from fastlfm.engine import LLMEngine
    from fastlfm.testing.demo_tasks import heldout_items, score_replies
    from fastlfm.testing.gguf_files import write_gguf
    from fastlfm.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEMO_MODEL_DIR)
    items = heldout_items(1234)[: args.items]
    prompts = [tok.apply_chat_template(i.chat(), tools=i.tools_list(), add_generation_prompt=True) for i in items]
    answers = [tok.encode(i.answer + "<|im_end|>", add_special_tokens=False) for i in items]
    tmp = Path(tempfile.mkdtemp())

    def fp32():
        return load_model(DEMO_MODEL_DIR, dtype=torch.float32)

    def min_max_int4(group: int):
        """int4 with a zero per group (fastlfm's format before it became Q4_0's symmetric one)."""
        from fastlfm import cpu_linear

        symmetric = cpu_linear.quantize_int4
        cpu_linear.quantize_int4 = lambda w, g=32: symmetric(w, g, symmetric=False)
        try:
            return prepare_for_cpu(fp32(), "int4", group)
        finally:
            cpu_linear.quantize_int4 = symmetric

    variants = {
        "fp32 (reference)": lambda: fp32(),
        "bf16": lambda: prepare_for_cpu(load_model(DEMO_MODEL_DIR, dtype=torch.bfloat16)),
        "int8": lambda: prepare_for_cpu(fp32(), "int8"),
        "int4 g32": lambda: prepare_for_cpu(fp32(), "int4", 32),
        "int4 g64": lambda: prepare_for_cpu(fp32(), "int4", 64),
        "int4 g32 min/max (+zero)": lambda: min_max_int4(32),
        "int4 g64 min/max (+zero)": lambda: min_max_int4(64),
        "GGUF Q8_0": lambda: load_model(write_gguf(DEMO_MODEL_DIR, tmp / "demo-Q8_0.gguf", "Q8_0")),
        "GGUF Q4_0": lambda: load_model(write_gguf(DEMO_MODEL_DIR, tmp / "demo-Q4_0.gguf", "Q4_0", embed_type="Q8_0")),
    }

    def answer_logprobs(model) -> list[torch.Tensor]:
        out = []
        with torch.inference_mode():
            for p, a in zip(prompts, answers):
                ids = torch.tensor([p + a])
                logits = model(ids).logits[0, len(p) - 1: len(p) + len(a) - 1].float()
                out.append(F.log_softmax(logits, -1))
        return out

    def greedy(model) -> list[list[int]]:
        engine = LLMEngine(model, tok, max_num_seqs=32)
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=48, temperature=0.0))
        return [o.token_ids for o in outs]

    ref_lp = ref_tokens = None
    print(f"demo model, {len(items)} held-out questions, {sum(map(len, answers))} answer tokens\n")
    print("| format | answer perplexity | mean KL(fp32 || format) per token | top-1 agreement | "
          "greedy sequences equal to fp32 | task accuracy |")
    print("|---|---|---|---|---|---|")
    for name, make in variants.items():
        if args.formats and name != "fp32 (reference)" and name not in args.formats:
            continue
        model = make()
        lp = answer_logprobs(model)
        toks = greedy(model)
        targets = torch.cat([torch.tensor(a) for a in answers])
        all_lp = torch.cat(lp)
        ppl = math.exp(-all_lp.gather(1, targets[:, None]).mean().item())
        if ref_lp is None:
            ref_lp, ref_tokens = all_lp, toks
        kl = F.kl_div(all_lp, ref_lp, log_target=True, reduction="none").sum(-1).mean().item()
        top1 = (all_lp.argmax(-1) == ref_lp.argmax(-1)).float().mean().item()
        same = sum(a == b for a, b in zip(toks, ref_tokens)) / len(toks)
        eos = tok.eos_token_id  # tool calls are special tokens: keep them, drop the final eos
        replies = [tok.decode(t[:-1] if t and t[-1] == eos else t, skip_special_tokens=False) for t in toks]
        acc = score_replies(items, replies)["all"]
        print(f"| {name} | {ppl:.4f} | {kl:.2e} | {top1:.4f} | {same:.3f} | {acc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
