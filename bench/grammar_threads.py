"""Does computing llguidance's token masks scale over threads? (issue 18: structured output at batch 64)

    PYTHONPATH=src python bench/grammar_threads.py [--rows 64] [--steps 96] [--threads 1 4 8 16]

The 65,536-token test tokenizer, the "records" and "strings" schemas of bench/structured.py. Each of
`--rows` matchers walks its own random path through the grammar (a token the mask allows, chosen
by a seeded generator); the walk is recorded, then replayed while the masks of all rows are filled
every step, timed, by: one thread (the loop), llguidance's LLExecutor with N threads, and a Python
thread pool of N threads (compute_mask releases the GIL). Matchers are deep copies of one compiled
grammar (they share its lexer, behind one mutex: llguidance's Python `deep_copy` is a shallow Rust
clone), "fresh": each compiled on its own, or "lanes": N independently compiled templates, row i a
copy of template i % N, the Python pool giving each thread the rows of one template (LLExecutor gets
the rows ordered by template). Needs a machine with many cores to say anything (the GPU host: 16).
Prints ms per step.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from structured import SCHEMAS  # noqa: E402

from fastlfm.sampling import SamplingParams  # noqa: E402
from fastlfm.structured import GrammarCache, _grammar, _llguidance, unpack_bitmask  # noqa: E402
from fastlfm.testing.tokenizer_files import write_tokenizer_files  # noqa: E402
from fastlfm.tokenizer import Tokenizer  # noqa: E402

VOCAB = 65536


def walks(cache: GrammarCache, params: SamplingParams, rows: int, steps: int) -> list[list[int]]:
    """Per row, `steps` tokens its grammar allows in turn (seeded random choices)."""
    out = []
    words = VOCAB // 32
    for r in range(rows):
        rng, m, path = random.Random(r), cache.matcher(params), []
        mask = torch.empty((1, words), dtype=torch.int32)
        for _ in range(steps):
            m.unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
            allowed = unpack_bitmask(mask, VOCAB)[0].nonzero().flatten().tolist()
            tok = rng.choice(allowed)
            m.consume_token(tok)
            path.append(tok)
            if m.is_stopped():
                break
        out.append(path)
    return out


def replay(matchers, paths, fill) -> float:
    """ms per step of `fill(rows, mask)` over the recorded paths."""
    steps = min(len(p) for p in paths)
    words = VOCAB // 32
    mask = torch.empty((len(matchers), words), dtype=torch.int32)
    rows = [(m, i) for i, m in enumerate(matchers)]
    spent = 0.0
    for s in range(steps):
        t = time.perf_counter()
        fill(rows, mask)
        spent += time.perf_counter() - t
        for m, p in zip(matchers, paths):
            m.consume_token(p[s])
    return 1e3 * spent / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--threads", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--schemas", nargs="+", default=["records", "strings"], choices=list(SCHEMAS))
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp()) / "tok"
    write_tokenizer_files(folder, vocab_size=VOCAB)
    tok = Tokenizer.from_pretrained(folder)
    llg = _llguidance()
    row_bytes = VOCAB // 8

    def loop(rows, mask):
        for m, i in rows:
            m.unsafe_compute_mask_ptr(mask.data_ptr() + i * row_bytes, row_bytes)

    def executor_fill(n):
        ex = llg.LLExecutor(n)
        return lambda rows, mask: ex.unsafe_compute_mask_ptr(rows, mask.data_ptr(), row_bytes, len(rows))

    def pool_fill(n):
        pool = ThreadPoolExecutor(n)
        return lambda rows, mask: list(pool.map(lambda k: loop(rows[k::n], mask), range(n)))

    def lane_executor_fill(n):  # rows i, i + n, ... share template i % n: hand them over together
        ex = llg.LLExecutor(n)
        return lambda rows, mask: ex.unsafe_compute_mask_ptr(
            [r for k in range(n) for r in rows[k::n]], mask.data_ptr(), row_bytes, len(rows))

    print(f"{args.rows} rows, up to {args.steps} steps, 65,536-token vocabulary; ms per step to fill every row's mask")
    print("| schema | matchers | loop | " + " | ".join(f"LLExecutor {n} | pool {n}" for n in args.threads) + " |")
    print("|---|---|---|" + "---|---|" * len(args.threads))
    for schema in args.schemas:
        cache = GrammarCache(tok, VOCAB, {7})
        params = SamplingParams(max_new_tokens=8, json_schema=SCHEMAS[schema])
        paths = walks(cache, params, args.rows, args.steps)
        grammar = _grammar(llg, "json_schema", json.dumps(SCHEMAS[schema]))
        def compiled():
            return llg.LLMatcher(cache._ll_tokenizer, grammar, log_level=0)

        def make(kind, n=1):
            if kind == "deep copies":
                return [cache.matcher(params) for _ in paths]
            if kind == "fresh":
                return [compiled() for _ in paths]
            templates = [compiled() for _ in range(n)]
            return [templates[i % n].deep_copy() for i in range(len(paths))]

        for kind in ("deep copies", "fresh", "lanes"):
            cells = [replay(make(kind), paths, loop)]
            for n in args.threads:
                if kind == "lanes":
                    cells.append(replay(make(kind, n), paths, lane_executor_fill(n)))
                else:
                    cells.append(replay(make(kind, n), paths, executor_fill(n)))
                cells.append(replay(make(kind, n), paths, pool_fill(n)))
            print(f"| {schema} | {kind} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
