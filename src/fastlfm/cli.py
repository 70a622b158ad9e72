"""The `fastlfm` command line.

    fastlfm generate MODEL "prompt" [sampling flags] [--stream] [--image PATH ...]
    fastlfm chat MODEL [--system TEXT] [sampling flags]     (/reset, /exit; output streamed)
    fastlfm train ...                                        (see `fastlfm train --help`)
    fastlfm serve MODEL ...                                  (see `fastlfm serve --help`)
    fastlfm bench serve MODEL|--url URL ...                  (see `fastlfm bench serve --help`)

MODEL is a checkpoint folder, a Hugging Face hub id, or `demo`. Errors are one line on
stderr: exit status 2 for bad flags or values, 1 for a model that cannot be found or
loaded (including an unreachable hub).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

# Subcommands implemented elsewhere: their own parsers see the remaining arguments.
_DELEGATED = {
    "train": ("fastlfm.train", "main", "fine-tune a model (SFT) on chat data"),
    "serve": ("fastlfm.server", "main", "serve a model behind an OpenAI-compatible HTTP API"),
    "bench": ("fastlfm.server.benchmark", "bench_main", "benchmarks: `bench serve` measures the server over HTTP"),
}


class UsageError(Exception):
    """A bad flag or flag value (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        raise UsageError(message)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder, Hugging Face hub id, LFM2 GGUF file, or 'demo'")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16, float32")
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="weight-only quantization at load time (CPU): int8 per channel, int4 in groups of 32")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default 256)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p * max prob")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    g.add_argument("--presence-penalty", type=float, default=None, help="OpenAI presence penalty, [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI frequency penalty, [-2, 2]")
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False, help="argmax decoding")
    mode.add_argument("--do-sample", dest="do_sample", action="store_const", const=True, help="sample")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastlfm", description="Fast inference, serving and fine-tuning for LFM2 models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    gen = sub.add_parser("generate", help="complete one prompt")
    _add_model_flags(gen)
    gen.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--raw", action="store_true", help="use the prompt as is (no chat template)")
    gen.add_argument("--image", action="append", metavar="PATH",
                     help="an image for an LFM2-VL model (repeat for several; placed before the prompt)")
    gen.add_argument("--system", default=None, help="system prompt (chat template only)")
    _add_sampling_flags(gen)
    chat = sub.add_parser("chat", help="interactive chat (type /reset or /exit)")
    _add_model_flags(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_flags(chat)
    for name, (_, _, help_text) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# ----------------------------------------------------------------------------- helpers
def _sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "seed", "do_sample")
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.stop:
        out["stop_strings"] = list(args.stop)
    if args.ignore_eos:
        out["ignore_eos"] = True
    return out


def _check_flags(args: argparse.Namespace) -> None:
    """Reject bad values before spending time on loading the model."""
    from .loading import resolve_device, resolve_dtype
    from .sampling import SamplingParams

    try:
        SamplingParams.from_generation_config(None, **_sampling_overrides(args))
        resolve_dtype(args.dtype, None)
        if args.device is not None:
            resolve_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # torch.device("bogus")
        raise UsageError(f"invalid --device {args.device!r} (use cpu, cuda or cuda:N)") from None


def _load(args: argparse.Namespace):
    """Resolve (download) and load the model, with progress on stderr."""
    from tqdm.auto import tqdm

    from .llm import LLM
    from .loading import resolve_model_dir

    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with tqdm(total=3, desc=f"Loading {args.model}", file=sys.stderr, disable=args.quiet,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}] {postfix}") as bar:
        bar.set_postfix_str(f"resolving {args.model}")
        from .gguf import is_gguf_file

        # huggingface_hub shows its own download bars
        source = args.model if is_gguf_file(args.model) else resolve_model_dir(args.model)
        bar.update()
        bar.set_postfix_str("reading weights")
        from .generation import load_model_and_tokenizer

        model, tokenizer, _ = load_model_and_tokenizer(source, dtype=args.dtype, device=args.device,
                                                       quantization=args.quantization)
        bar.update()
        bar.set_postfix_str("tokenizer")
        llm = LLM(model, tokenizer=tokenizer)  # else the tokenizer (and LFM2-VL processor) of the folder
        bar.update()
        bar.set_postfix_str("ready")
    return llm


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ----------------------------------------------------------------------------- commands
def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _load(args)
    params = llm.sampling_params(**_sampling_overrides(args))
    images = getattr(args, "image", None) or []
    if images and llm.processor is None:
        raise UsageError(f"--image needs an LFM2-VL model; {args.model} is text-only")
    if images and args.raw:
        raise UsageError("--image needs the chat template; drop --raw")
    if args.raw or llm.tokenizer.chat_template is None:
        prompt_or_messages = llm.tokenizer.encode(prompt)
    else:
        content = [{"type": "image", "image": path} for path in images] + [{"type": "text", "text": prompt}] \
            if images else prompt
        prompt_or_messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": content}]
    if args.stream:
        for delta in llm.stream(prompt_or_messages, params):
            _write(delta)
        _write("\n")
    elif isinstance(prompt_or_messages[0], int):
        _write(llm.generate([prompt_or_messages], params)[0].text + "\n")
    else:
        _write(llm.chat(prompt_or_messages, params).text + "\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    conv = llm.conversation(system=args.system, **_sampling_overrides(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with {} (/reset to start over, /exit to quit)".format(args.model), file=sys.stderr)
    while True:
        if interactive:
            _write("> ")
        line = sys.stdin.readline()
        if not line:  # end of input
            return 0
        text = line.rstrip("\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            conv.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; use /reset or /exit", file=sys.stderr)
            continue
        for delta in conv.stream(text):
            _write(delta)
        _write("\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:  # their own parsers and error handling
        import importlib

        module, func, _ = _DELEGATED[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)

    from .loading import CheckpointError

    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return 2
        _check_flags(args)
        return {"generate": cmd_generate, "chat": cmd_chat}[args.command](args)
    except UsageError as e:
        print(f"fastlfm: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError) as e:
        print(f"fastlfm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
