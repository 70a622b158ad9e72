"""`fastlfm train`: supervised fine-tuning of LFM2 on chat conversations.

    fastlfm train --model LiquidAI/LFM2-350M --data chats.jsonl --output runs/sft
    fastlfm train --init tiny/config.json --tokenizer tiny/ --data chats.jsonl --output runs/tiny --lr 3e-3

What it does, in order:
- tokenises every conversation with the checkpoint's chat template; only assistant turns
  (through their `<|im_end|>`) carry labels (`fastlfm.data`);
- packs conversations into rows of at most --batch-tokens tokens and runs them through the
  model with a `PackedContext`: attention is block-diagonal causal and the short convs
  restart at every boundary, so no sample sees another (the loss equals the per-sample sum);
- AdamW, linear warmup then cosine decay (LambdaLR), gradient accumulation with the loss
  normalised by the number of target tokens of the whole optimizer step, gradient clipping;
- fp32 or bf16 (autocast over fp32 master weights);
- writes `step-N/` checkpoints (HF format + `trainer_state.pt` for --resume) and the final
  model in the output folder itself, loadable by fastlfm and by transformers;
- or, with --lora-rank R, trains low-rank adapters only and saves them merged (`fastlfm.lora`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import DataError, Example, PackedBatch, load_examples, pack_examples, plan_batches
from .loading import CheckpointError, model_on_meta, resolve_device, resolve_model_dir
from .lora import DEFAULT_TARGETS, LoRAError, apply_lora, load_adapters, lora_modules, merged_state_dict, save_adapters
from .models import Lfm2Config, Lfm2ForCausalLM
from .models.config import ConfigError
from .models.lfm2 import PackedContext
from .tokenizer import Tokenizer

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
TRAINER_STATE = "trainer_state.pt"
# Arguments that decide which tokens go into which step: a resumed run must use the same.
PLAN_ARGS = ("data", "seed", "batch_tokens", "grad_accum", "max_length", "max_steps", "epochs",
             "lora_rank", "lora_alpha", "lora_targets")
_SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class TrainError(ValueError):
    """Arguments or files that do not allow a training run."""


# ----------------------------------------------------------------------------- pieces
def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier for LambdaLR: linear warmup to 1, then cosine down to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]):
    # Decay matrices only; norm weights and biases stay undecayed (the usual AdamW recipe).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def packed_loss(model: Lfm2ForCausalLM, batch: PackedBatch, num_items: int, device: torch.device,
                autocast) -> torch.Tensor:
    """Summed next-token loss of a packed row divided by `num_items`."""
    with autocast:
        out = model(input_ids=batch.input_ids[None].to(device), labels=batch.labels[None].to(device),
                    context=PackedContext(batch.seq_lens, device=device), num_items_in_batch=num_items)
    return out.loss


def save_model(model: Lfm2ForCausalLM, folder: Path, dtype: torch.dtype, tokenizer_dir: Path) -> None:
    """HF-format checkpoint (config.json, model.safetensors, generation_config.json) plus the
    tokenizer files, with weights cast to `dtype` (and LoRA adapters merged) without touching
    the model being trained."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    config = dataclasses.replace(model.config, torch_dtype=name)
    out = model_on_meta(Lfm2ForCausalLM, config)
    state = merged_state_dict(model) if lora_modules(model) else model.state_dict()
    out.load_state_dict({k: v.detach().to(dtype) for k, v in state.items()}, assign=True)
    out.tie_weights()
    out.generation_config = model.generation_config
    out.save_pretrained(folder)
    for fname in TOKENIZER_FILES:
        if (tokenizer_dir / fname).is_file() and tokenizer_dir.resolve() != folder.resolve():
            shutil.copyfile(tokenizer_dir / fname, folder / fname)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output: Path) -> Path:
    steps = sorted((int(p.name[5:]), p) for p in output.glob("step-*") if p.name[5:].isdigit()
                   and (p / TRAINER_STATE).is_file())
    if not steps:
        raise TrainError(f"--resume latest: no step-N/ folder with {TRAINER_STATE} under {output}")
    return steps[-1][1]


# ----------------------------------------------------------------------------- setup
def _load_model_and_tokenizer(args) -> tuple[Lfm2ForCausalLM, Tokenizer, Path, dict[str, Any] | None]:
    """The model to train (fp32 master weights), its tokenizer, the tokenizer folder and,
    when resuming, the trainer state."""
    device = resolve_device(args.device)
    state = None
    if args.resume:
        ckpt = latest_checkpoint(Path(args.output)) if args.resume == "latest" else Path(args.resume)
        if not (ckpt / TRAINER_STATE).is_file():
            raise TrainError(f"--resume {ckpt}: no {TRAINER_STATE} there (is it a step-N/ folder of a run?)")
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
        for key in PLAN_ARGS:
            if state["args"].get(key) != getattr(args, key):
                raise TrainError(f"--resume {ckpt}: --{key.replace('_', '-')} was {state['args'].get(key)!r} in "
                                 f"that run but is {getattr(args, key)!r} now; a resumed run must see the same data plan")
        if args.lora_rank:
            # The checkpoint's weights have the adapters merged in; resume from the frozen base
            # plus the saved adapters, which is exact.
            if not args.model:
                raise TrainError(f"--resume {ckpt}: a LoRA run resumes from its base model; pass the same --model")
            model = Lfm2ForCausalLM.from_pretrained(resolve_model_dir(args.model), dtype=torch.float32, device=device)
        else:
            model = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device=device)
        tok_dir = Path(args.tokenizer) if args.tokenizer else ckpt
    elif args.init:
        init = Path(args.init)
        if not init.is_file():
            raise TrainError(f"--init {init}: not a file (expected a config.json)")
        config = Lfm2Config.from_json_file(init)
        config.torch_dtype = "float32"
        model = Lfm2ForCausalLM(config)
        model.init_weights(args.seed)  # spec §3.9, on the CPU with a seeded generator
        model.to(device)
        tok_dir = Path(args.tokenizer) if args.tokenizer else init.parent
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
               "pad_token_id": config.pad_token_id}
        model.generation_config = {k: v for k, v in gen.items() if v is not None}
    else:
        folder = resolve_model_dir(args.model)
        model = Lfm2ForCausalLM.from_pretrained(folder, dtype=torch.float32, device=device)
        tok_dir = Path(args.tokenizer) if args.tokenizer else folder
    if args.lora_rank:
        apply_lora(model, args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")))
        if state is not None:
            load_adapters(model, ckpt)
    if not (tok_dir / "tokenizer.json").is_file():
        hint = " (pass --tokenizer DIR with --init)" if args.init else " (pass --tokenizer DIR)"
        raise TrainError(f"no tokenizer.json in {tok_dir}{hint}")
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TrainError(f"the tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    return model, tokenizer, tok_dir, state


def _plan(lengths: list[int], args) -> list[list[int]]:
    """All micro-batches of the run, in order (epochs reshuffled with seed + epoch)."""
    micro: list[list[int]] = []
    epoch = 0
    while True:
        if args.max_steps is None and epoch >= args.epochs:
            break
        if args.max_steps is not None and len(micro) >= args.max_steps * args.grad_accum:
            break
        micro += plan_batches(lengths, args.batch_tokens, args.seed + epoch)
        epoch += 1
    if args.max_steps is not None:
        micro = micro[: args.max_steps * args.grad_accum]
    return micro


@torch.no_grad()
def evaluate(model, examples: list[Example], args, device, autocast) -> float:
    """Mean loss per target token over `examples`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for idx in plan_batches([len(e.input_ids) for e in examples], args.batch_tokens, seed=0):
        batch = pack_examples([examples[i] for i in idx])
        total += float(packed_loss(model, batch, 1, device, autocast))
        count += batch.num_targets
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- loop
def train(args: argparse.Namespace) -> Path:
    """Run a training job described by the parsed command line; returns the output folder."""
    torch.manual_seed(args.seed)
    output = Path(args.output)
    model, tokenizer, tok_dir, state = _load_model_and_tokenizer(args)
    device = model.device
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    save_dtype = _SAVE_DTYPES[args.save_dtype or dtype]

    examples, stats = load_examples(args.data, tokenizer, args.max_length, model.config.vocab_size)
    eval_examples = load_examples(args.eval_data, tokenizer, args.max_length, model.config.vocab_size)[0] \
        if args.eval_data else None
    micro = _plan([len(e.input_ids) for e in examples], args)
    total_steps = math.ceil(len(micro) / args.grad_accum)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)

    model.train()
    optimizer = make_optimizer(model, args.lr, args.weight_decay, tuple(args.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps, args.min_lr_ratio))
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = state["step"]

    output.mkdir(parents=True, exist_ok=True)
    (output / "training_args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_targets = sum(e.num_targets for e in examples)
    lora = f", LoRA rank {args.lora_rank}: {n_trainable / 1e6:.2f}M trainable" if args.lora_rank else ""
    print(f"fastlfm train: {n_params / 1e6:.2f}M parameters{lora} on {device} ({dtype}); {len(examples)} conversations "
          f"({n_targets} assistant tokens, {stats['truncated']} truncated, {stats['no_assistant']} without an "
          f"assistant turn skipped); {len(micro)} packed micro-batches -> {total_steps} steps "
          f"(warmup {warmup}), starting at step {start}", file=sys.stderr)

    log = open(output / "train_log.jsonl", "a", encoding="utf-8")
    bar = tqdm(total=total_steps, initial=start, desc="train", disable=args.no_progress, dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    try:
        for step in range(start, total_steps):
            group = [pack_examples([examples[i] for i in idx])
                     for idx in micro[step * args.grad_accum:(step + 1) * args.grad_accum]]
            # Normalise by the target tokens of the whole optimizer step, so accumulation gives
            # the same gradient as one big batch.
            num_items = sum(b.num_targets for b in group)
            step_loss, step_tokens = 0.0, 0
            for batch in group:
                loss = packed_loss(model, batch, num_items, device, autocast)
                loss.backward()
                step_loss += float(loss.detach())
                step_tokens += batch.input_ids.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm) \
                if args.max_grad_norm > 0 else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            window_tokens += step_tokens
            elapsed = time.perf_counter() - window_start
            tok_s = window_tokens / elapsed if elapsed > 0 else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            record = {"step": done, "loss": step_loss, "lr": lr, "tokens": step_tokens, "tokens_per_s": tok_s}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if eval_examples is not None and args.eval_every and (done % args.eval_every == 0 or done == total_steps):
                record["eval_loss"] = evaluate(model, eval_examples, args, device, autocast)
                bar.write(f"step {done}: eval loss {record['eval_loss']:.4f}")
            if done % args.log_every == 0 or done == total_steps or done == start + 1:
                log.write(json.dumps(record) + "\n")
                log.flush()
                window_tokens, window_start = 0, time.perf_counter()
            if args.save_every and done % args.save_every == 0 and done < total_steps:
                save_checkpoint(model, optimizer, scheduler, done, args, output / f"step-{done}", tok_dir)
    finally:
        bar.close()
        log.close()
    if args.save_every:
        save_checkpoint(model, optimizer, scheduler, total_steps, args, output / f"step-{total_steps}", tok_dir)
    save_model(model, output, save_dtype, tok_dir)
    print(f"fastlfm train: saved the model to {output}", file=sys.stderr)
    return output


def save_checkpoint(model, optimizer, scheduler, step: int, args, folder: Path, tokenizer_dir: Path) -> None:
    """A resumable checkpoint: the model (HF format, always fp32 so that resuming is exact;
    LoRA adapters beside it) and the optimizer / scheduler / RNG state with the step."""
    save_model(model, folder, torch.float32, tokenizer_dir)
    if lora_modules(model):
        save_adapters(model, folder)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "args": {k: getattr(args, k) for k in PLAN_ARGS}}, folder / TRAINER_STATE)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastlfm train",
        description="Supervised fine-tuning of an LFM2 model on chat conversations (JSONL of "
                    '{"messages": [...]}, optional "tools"); loss on assistant turns only.')
    src = p.add_argument_group("model")
    src.add_argument("--model", help="checkpoint to fine-tune: local folder, hub id or 'demo'")
    src.add_argument("--init", help="train from scratch: path of an LFM2 config.json")
    src.add_argument("--tokenizer", help="folder with tokenizer.json (default: the model's folder, "
                                         "or the folder of the --init config)")
    src.add_argument("--resume", help="continue a run: a step-N/ folder, or 'latest' under --output")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="JSONL file of conversations")
    d.add_argument("--eval-data", help="JSONL file of held-out conversations (loss reported at --eval-every)")
    d.add_argument("--max-length", type=int, default=2048, help="truncate conversations to this many tokens")
    d.add_argument("--batch-tokens", type=int, default=4096,
                   help="tokens per packed micro-batch (one row of packed conversations)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=1, help="passes over the data (ignored with --max-steps)")
    o.add_argument("--max-steps", type=int, help="optimizer steps to run (overrides --epochs)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    o.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: --warmup-ratio of the run)")
    o.add_argument("--warmup-ratio", type=float, default=0.05)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"))
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    o.add_argument("--seed", type=int, default=0)
    lo = p.add_argument_group("LoRA (instead of full fine-tuning; checkpoints are saved merged)")
    lo.add_argument("--lora-rank", type=int, default=0, help="adapter rank (0: full fine-tuning)")
    lo.add_argument("--lora-alpha", type=float, help="adapter scale numerator (default: 2 x rank)")
    lo.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                    help="comma-separated linear layer names to adapt")
    r = p.add_argument_group("run")
    r.add_argument("--output", required=True, help="folder for step-N/ checkpoints and the final model")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    r.add_argument("--dtype", choices=["fp32", "bf16"], help="compute precision (default: bf16 on CUDA, "
                                                             "fp32 on CPU); weights stay fp32")
    r.add_argument("--save-dtype", choices=["fp32", "bf16"], help="dtype of the final saved weights "
                                                                  "(default: the compute dtype)")
    r.add_argument("--save-every", type=int, default=0, help="write a resumable step-N/ checkpoint every N steps")
    r.add_argument("--eval-every", type=int, default=0, help="evaluate --eval-data every N steps")
    r.add_argument("--log-every", type=int, default=10, help="append to train_log.jsonl every N steps")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model and args.init:
        p.error("pass one of --model (fine-tune a checkpoint) and --init (train from scratch), not both")
    # With --resume the weights come from the checkpoint; --model/--init may stay on the
    # command line so that resuming is "the same command plus --resume latest".
    if args.resume is None and not (args.model or args.init):
        p.error("pass --model (fine-tune a checkpoint) or --init (train from scratch)")
    for name in ("batch_tokens", "grad_accum", "max_length", "epochs", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lora_rank < 0:
        p.error(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.min_lr_ratio <= 1:
        p.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.max_length > args.batch_tokens:
        args.max_length = args.batch_tokens  # a conversation must fit in one packed row


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        train(args)
    except (TrainError, DataError, CheckpointError, ConfigError, LoRAError) as e:
        print(f"fastlfm train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
