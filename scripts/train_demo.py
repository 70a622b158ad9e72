"""Regenerate the bundled demo model (src/fastlfm/demo/): a tiny LFM2 trained from scratch
with `fastlfm train` on the synthetic chat tasks of `fastlfm.testing.demo_tasks`.

    python scripts/train_demo.py                 # build data + tokenizer, train, install, score
    python scripts/train_demo.py --eval-only     # score the installed demo model

Deterministic: the data, the tokenizer and the initial weights come from fixed seeds, and
the data order from `fastlfm train --seed`. (Float results still depend on the hardware and
thread count, so a rebuild on another machine gives a close, not bit-identical, model.)

Steps: 1) held-out questions, then training conversations that never share a held-out
question's content; 2) a byte-level BPE tokenizer trained on the rendered training chats,
with the real LFM2 special tokens at their real ids, the LFM2 chat template, and digits kept
as single tokens (so that addition is learnable by a model this small); 3) an LFM2 config in
the released key style (conv and attention layers in the LFM2 pattern); 4) `fastlfm train
--init ...` (fp32 training, final weights stored in bf16: 4.8 MB); 5) greedy held-out accuracy
through the chat template, each reply stopping at <|im_end|>; 6) the model copied into the
package with a README. Time: about 3 minutes on one H200 GPU (--device auto picks CUDA);
on a 2-core CPU roughly an hour (15M training tokens at a few thousand tokens/s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from fastlfm.models import Lfm2ForCausalLM
from fastlfm.testing import tiny_config
from fastlfm.testing.demo_tasks import heldout_items, score_replies, training_conversations
from fastlfm.testing.tokenizer_files import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, SPLIT_PATTERN
from fastlfm.tokenizer import Tokenizer, render_chat_template

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "src" / "fastlfm" / "demo"
DEMO_FILES = ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]

VOCAB_SIZE = 1024
# LFM2-350M's layer pattern (conv, conv, attention, ...) at 8 layers and a small width.
MODEL = dict(hidden=128, heads=4, kv_heads=2, num_hidden_layers=8, full_attn_idxs=[2, 5, 7])
TRAIN = dict(n_train=60000, epochs=3, lr=3e-3, batch_tokens=4096, warmup_steps=100, weight_decay=0.1, seed=0)
DATA_SEED, HELDOUT_SEED, TOKENIZER_CORPUS = 0, 1234, 20000


# ----------------------------------------------------------------------------- tokenizer
def write_tokenizer(folder: Path, corpus: list[str]) -> None:
    """LFM2-style byte-level BPE (spec §6.1) trained on `corpus`: special tokens at ids
    0-499, BOS added by the post-processor. One change from LFM2: digits split one by one."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    split = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
    assert split != SPLIT_PATTERN
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"the tokenizer corpus gave {tok.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    assert all(tok.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))

    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    config = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, **entry, "special": True} for i, t in enumerate(SPECIAL_TOKENS)},
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
        "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 4096,
        "model_input_names": ["input_ids", "attention_mask"], "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {k: {"content": v, **entry} for k, v in
                   [("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("pad_token", PAD_TOKEN)]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_model_config(folder: Path, overrides: dict) -> None:
    cfg = tiny_config("LFM2-350M", vocab_size=VOCAB_SIZE, max_position_embeddings=4096, **overrides)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def greedy_replies(model: Lfm2ForCausalLM, tokenizer: Tokenizer, prompts: list[list[int]],
                   max_new_tokens: int = 48) -> list[str]:
    """Batched greedy decoding (left padding + Lfm2Cache), each row stopping at <|im_end|>.
    A plain loop on purpose: the package's generation is scored separately by tests/test_demo.py."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    cache = model.make_cache()
    logits = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    new = []
    for _ in range(max_new_tokens):
        tok = torch.where(done, pad, logits[:, -1].argmax(-1))
        new.append(tok)
        done |= tok == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(tok[:, None], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    rows = torch.stack(new, dim=1).tolist()
    return [tokenizer.decode(r[: r.index(eos)] if eos in r else r) for r in rows]


def evaluate(model_dir: Path | str, device: str = "cpu", verbose: int = 0) -> dict[str, float]:
    """Greedy replies to the held-out questions, scored exactly; prints per-task accuracy."""
    model = Lfm2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device=device)
    tokenizer = Tokenizer.from_pretrained(model_dir if str(model_dir) != "demo" else DEMO_DIR)
    items = heldout_items(HELDOUT_SEED)
    prompts = [tokenizer.apply_chat_template(i.chat(), tools=i.tools_list(), add_generation_prompt=True)
               for i in items]
    replies = greedy_replies(model, tokenizer, prompts)
    scores = score_replies(items, replies)
    wrong = [(i, r) for i, r in zip(items, replies) if r.strip() != i.answer]
    for item, reply in wrong[:verbose]:
        print(f"  wrong: {item.messages[-1][1]!r} -> {reply!r} (expected {item.answer!r})")
    print("held-out greedy accuracy: " + ", ".join(f"{k} {v:.0%}" for k, v in scores.items()))
    return scores


def demo_readme(n_params: int, scores: dict[str, float], model_cfg: dict, args, trained_on: str) -> str:
    attn = model_cfg["full_attn_idxs"]
    acc = ", ".join(f"{k} {v:.0%}" for k, v in scores.items())
    return f"""# fastlfm demo model

A tiny LFM2 ({n_params / 1e6:.2f}M parameters) bundled with fastlfm so that the main commands
run offline, in seconds, on any machine: `fastlfm chat demo`, `fastlfm generate demo "What is 37 + 48?"`,
`fastlfm.load_model("demo")`. It is **not** a general language model: it knows four synthetic tasks.

| ask | it answers |
|---|---|
| What is 37 + 48? (also "Add 9 and 10.", "What's 4 plus 28?") | 37 + 48 = 85 (numbers 0-99) |
| Reverse the words: red sun cat | cat sun red (3-5 words from its word list) |
| What's the weather in Paris? (with its tools in the system prompt) | `<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|>` |
| What time is it in Tokyo? (with its tools) | `<|tool_call_start|>[get_time(location="Tokyo")]<|tool_call_end|>` |
| a tool result after the call | It is 18 degrees and sunny in Paris. |
| Hello | a short self-introduction |

Architecture: the real LFM2 (`Lfm2ForCausalLM`, model_type `lfm2`): hidden size {model_cfg["hidden"]},
{model_cfg["num_hidden_layers"]} layers of which {len(attn)} are GQA attention (layers {", ".join(map(str, attn))}) and the
rest gated short convolutions, {model_cfg["heads"]} query / {model_cfg["kv_heads"]} key-value heads, tied embeddings.
The tokenizer is a byte-level BPE with LFM2's special tokens at their real ids (`<|im_start|>` 6,
`<|im_end|>` 7, tool-call tokens 10/11, ...) and the LFM2 chat template; its 1,024-token vocabulary
was learned on the training chats, with digits kept as single tokens.

Training: from scratch with `fastlfm train --init` on {args.n_train:,} synthetic conversations
({args.epochs} epochs, packed sequences, loss on assistant turns only, AdamW lr {args.lr:g} with warmup and
cosine decay; trained on {trained_on}). Held-out questions (number pairs, word lists and tool/city/phrasing triples never seen in
training), greedy decoding through the chat template, exact match: {acc}.

Weights are stored in bf16 (fp32 training). Regenerate with `python scripts/train_demo.py` (about
3 minutes on one GPU; on a 2-core CPU roughly an hour).
The task generator and scorer are in `fastlfm.testing.demo_tasks`; `tests/test_demo.py` checks the
accuracy through `LLM.generate` (the engine).
"""


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "build" / "demo"), help="folder for data, tokenizer and the run")
    p.add_argument("--install", default=str(DEMO_DIR), help="where the finished model is copied")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    p.add_argument("--eval-only", action="store_true", help="score the model in --install and stop")
    p.add_argument("--no-install", action="store_true", help="train and score, but leave --install alone")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    for k, v in TRAIN.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--hidden", type=int, default=MODEL["hidden"])
    p.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    p.add_argument("--attn", default=",".join(map(str, MODEL["full_attn_idxs"])), help="attention layer indices")
    args = p.parse_args(argv)
    if args.eval_only:
        evaluate(args.install, args.device, verbose=10)
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    heldout = heldout_items(HELDOUT_SEED)
    records = training_conversations(args.n_train, seed=DATA_SEED, exclude={i.key for i in heldout})
    with open(work / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(work / "heldout.jsonl", "w", encoding="utf-8") as f:  # eval loss during training
        f.writelines(json.dumps({"messages": i.chat() + [{"role": "assistant", "content": i.answer}],
                                 **({"tools": i.tools_list()} if i.tools else {})}) + "\n" for i in heldout)
    init = work / "init"
    corpus = [render_chat_template(CHAT_TEMPLATE, r["messages"], tools=r.get("tools"), bos_token=BOS_TOKEN)
              for r in records[:TOKENIZER_CORPUS]]
    write_tokenizer(init, corpus)
    model_cfg = dict(MODEL, hidden=args.hidden, heads=max(1, args.hidden // 32), num_hidden_layers=args.layers,
                     full_attn_idxs=[int(i) for i in args.attn.split(",")])
    write_model_config(init, model_cfg)
    tasks = Counter(m["content"][:8] for r in records for m in r["messages"] if m["role"] == "user")
    print(f"data: {len(records)} training conversations, {len(heldout)} held-out questions, "
          f"tokenizer + config in {init} ({time.perf_counter() - t0:.1f}s); {len(tasks)} distinct prompt openings")

    from fastlfm.train import main as train_main

    run = work / "run"
    if run.exists():
        shutil.rmtree(run)
    rc = train_main([
        "--init", str(init / "config.json"), "--tokenizer", str(init), "--data", str(work / "train.jsonl"),
        "--eval-data", str(work / "heldout.jsonl"), "--eval-every", "200", "--output", str(run),
        "--device", args.device, "--dtype", "fp32", "--save-dtype", "bf16", "--seed", str(args.seed),
        "--epochs", str(args.epochs), "--lr", str(args.lr), "--min-lr-ratio", "0.05",
        "--warmup-steps", str(args.warmup_steps), "--weight-decay", str(args.weight_decay),
        "--batch-tokens", str(args.batch_tokens), "--max-length", "512", "--log-every", "20",
    ] + (["--no-progress"] if args.no_progress else []))
    if rc:
        return rc
    seconds = time.perf_counter() - t0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    trained_on = (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU") + f" in {seconds / 60:.1f} min"
    print(f"trained on {trained_on}")
    scores = evaluate(run, args.device, verbose=10)
    if not args.no_install:
        install = Path(args.install)
        install.mkdir(parents=True, exist_ok=True)
        for name in DEMO_FILES:
            shutil.copyfile(run / name, install / name)
        gen = json.loads((install / "generation_config.json").read_text())
        gen.update(do_sample=False, max_new_tokens=64)  # a demo answers greedily and briefly
        (install / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        n_params = sum(p.numel() for p in Lfm2ForCausalLM.from_pretrained(run).parameters())
        (install / "README.md").write_text(demo_readme(n_params, scores, model_cfg, args, trained_on))
        print(f"installed into {install}")
    return 0 if scores["all"] >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
