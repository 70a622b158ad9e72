"""The cost per token of turning generated ids into text, as the output grows (issue 14).

Three streams over the same ids, on the full-size test tokenizer (65,536 byte-level BPE ids):
- fastlfm's TextStream (this checkout): bytes per id + Python's incremental UTF-8 decoder;
- tokenizers' DecodeStream (the field's peer: what vLLM and TGI use);
- fastlfm's IncrementalDetokenizer before the rewrite (source of commit 54557df, from git), if
  `--old` is given.
Sequences: ordinary text tokens, random ids, and adversarial runs of lone UTF-8 continuation
bytes (a random model emits them; a client forces them with logit_bias) that never complete a
character. Reported: microseconds per token over the whole sequence, at each length.

    PYTHONPATH=src python bench/text_stream.py [--lengths 256 1024 4096 16384] [--old]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenizers.decoders import DecodeStream

from fastlfm.testing.tokenizer_files import write_tokenizer_files
from fastlfm.tokenizer import TextStream, Tokenizer


def sequences(tok: Tokenizer, n: int) -> dict[str, list[int]]:
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog while it rains in Lisbon and Tokyo".split()
    text_ids: list[int] = []
    while len(text_ids) < n:
        text_ids += tok.encode(" ".join(rng.choice(words) for _ in range(64)), add_special_tokens=False)
    continuation = next(i for i, b in enumerate(tok.token_bytes) if b == b"\x80")
    return {"text": text_ids[:n], "random ids": [rng.randrange(1000, tok.vocab_size) for _ in range(n)],
            "lone continuation bytes": [continuation] * n}


def per_token_us(run, ids: list[int], budget_s: float) -> float:
    t = time.perf_counter()
    done = run(ids, time.perf_counter() + budget_s)
    dt = time.perf_counter() - t
    return float("inf") if done < len(ids) else 1e6 * dt / len(ids)


def runner(make, add, finish=None, check_every: int = 16):
    """A timed run over ids: a fresh stream from `make()`, `add(stream, id)` per id, then
    `finish(stream)`; it gives up (returning how far it got) once past its deadline."""
    def run(ids, deadline):
        stream = make()
        for k, i in enumerate(ids):
            add(stream, i)
            if k % check_every == 0 and time.perf_counter() > deadline:
                return k
        if finish is not None:
            finish(stream)
        return len(ids)
    return run


def ours(tok):
    return runner(lambda: TextStream(tok), TextStream.add, TextStream.finish, check_every=256)


def decode_stream(tok):
    return runner(lambda: DecodeStream(skip_special_tokens=True), lambda s, i: s.step(tok.backend, i))


def old_detokenizer(tok, commit: str):
    repo = Path(__file__).resolve().parent.parent
    code = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:src/fastlfm/tokenizer.py"],
                          capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_tokenizer.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("old_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    detok = module.IncrementalDetokenizer
    return runner(lambda: detok(tok), detok.add, detok.flush)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--old", nargs="?", const="54557df", default=None, metavar="COMMIT",
                    help="also the detokenizer of COMMIT (default 54557df, before the rewrite)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per (stream, sequence, length) at most")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp())
    write_tokenizer_files(folder, vocab_size=65536)
    tok = Tokenizer.from_pretrained(folder)
    assert tok.token_bytes is not None  # built once per tokenizer, outside the timings
    streams = {"fastlfm TextStream": ours(tok), "tokenizers DecodeStream (peer)": decode_stream(tok)}
    if args.old:
        streams[f"IncrementalDetokenizer ({args.old})"] = old_detokenizer(tok, args.old)
    print(f"# microseconds per token over a whole sequence; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"{args.budget:.0f} s budget per cell ('>' = did not finish)\n")
    print("| sequence | stream | " + " | ".join(f"{n} tokens" for n in args.lengths) + " |")
    print("|---|---|" + "---|" * len(args.lengths))
    for kind in ("text", "random ids", "lone continuation bytes"):
        seqs = sequences(tok, max(args.lengths))
        for name, run in streams.items():
            cells = []
            for n in args.lengths:
                us = per_token_us(run, seqs[kind][:n], args.budget)
                cells.append(f"> {1e6 * args.budget / n:,.0f}" if us == float("inf") else f"{us:,.2f}")
            print(f"| {kind} | {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
