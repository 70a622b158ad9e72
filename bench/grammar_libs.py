"""Token masks of structured output: llguidance (fastlfm's grammar library) against xgrammar, per step of
`--rows` rows (issue 18: at batch 64 the "records" schema's masks cost more than the forward).

The 65,536-token test tokenizer and bench/structured.py's schemas. Each row walks its own random path
through the grammar (a token llguidance allows, chosen by a seeded generator); the paths are then replayed
through both libraries, one matcher after the other in one thread, timing every row's mask each step, and
the two masks are compared. Where they differed (xgrammar 0.2.9, 2026-12-03): xgrammar lets DEL (0x7F) into
a string unescaped (JSON allows it; llguidance does not) and allows both tokens of a forced "{" where
llguidance allows only one; and inside a string bounded by maxLength xgrammar allows the raw control bytes
0x00-0x1F (invalid JSON: they must be escaped) and refuses escapes ("\\", "\\n"), so its fast masks there
are not correct ones.

xgrammar is not a fastlfm dependency: it requires transformers (fastlfm never imports it at run time) and
its import took 4.7 s here. Install it beside the checkout to run this:

    pip install --no-deps --target /tmp/xg xgrammar apache-tvm-ffi
    PYTHONPATH=src:/tmp/xg python bench/grammar_libs.py [--rows 64] [--steps 96]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grammar_threads import VOCAB, walks  # noqa: E402
from structured import SCHEMAS  # noqa: E402

from fastlfm.sampling import SamplingParams  # noqa: E402
from fastlfm.structured import GrammarCache, unpack_bitmask  # noqa: E402
from fastlfm.testing.tokenizer_files import write_tokenizer_files  # noqa: E402
from fastlfm.tokenizer import Tokenizer  # noqa: E402

EOS = 7


def xgrammar_tokenizer(xgr, tok: Tokenizer):
    """xgrammar's view of the byte-level vocabulary; special tokens as empty strings (never grammar text)."""
    special = {t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special}
    encoded = [""] * VOCAB
    for text, i in tok.backend.get_vocab(with_added_tokens=True).items():
        if i < VOCAB and text not in special:
            encoded[i] = text
    return xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=VOCAB, stop_token_ids=[EOS])


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--schemas", nargs="+", default=list(SCHEMAS), choices=list(SCHEMAS))
    args = ap.parse_args()
    t = time.perf_counter()
    import xgrammar as xgr
    xgr_import = time.perf_counter() - t
    folder = Path(tempfile.mkdtemp()) / "tok"
    write_tokenizer_files(folder, vocab_size=VOCAB)
    tok = Tokenizer.from_pretrained(folder)
    compiler = xgr.GrammarCompiler(xgrammar_tokenizer(xgr, tok), max_threads=1)
    words = VOCAB // 32
    print(f"{args.rows} rows x {args.steps} steps, 65,536-token vocabulary, one thread; import xgrammar "
          f"{xgr_import:.1f} s")
    print("| schema | llguidance ms a step | xgrammar ms a step | llguidance / xgrammar | llguidance us a row p50 / p99 "
          "| xgrammar us a row p50 / p99 | masks that differ (tokens, mean) | xgrammar compile ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.schemas:
        schema = SCHEMAS[name]
        cache = GrammarCache(tok, VOCAB, {EOS})
        params = SamplingParams(max_new_tokens=8, json_schema=schema)
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "),
                                                strict_mode=True)
        compile_ms = 1e3 * (time.perf_counter() - t)
        paths = walks(cache, params, args.rows, args.steps)
        llg = [cache.matcher(params) for _ in paths]
        xg = [xgr.GrammarMatcher(compiled) for _ in paths]
        llg_mask = torch.empty((args.rows, words), dtype=torch.int32)
        xg_mask = xgr.allocate_token_bitmask(args.rows, VOCAB)
        llg_rows, xg_rows, differ, differ_tokens, masks = [], [], 0, 0, 0
        alive = list(range(args.rows))  # rows whose path xgrammar has accepted so far (both time only these)
        rejected = []
        for s in range(args.steps):
            for i in alive:
                t = time.perf_counter()
                llg[i].unsafe_compute_mask_ptr(llg_mask.data_ptr() + i * words * 4, words * 4)
                llg_rows.append(time.perf_counter() - t)
            for i in alive:
                t = time.perf_counter()
                xg[i].fill_next_token_bitmask(xg_mask, i)
                xg_rows.append(time.perf_counter() - t)
            for i in list(alive):
                masks += 1
                if not torch.equal(llg_mask[i], xg_mask[i]):
                    differ += 1
                    differ_tokens += int((unpack_bitmask(llg_mask[i][None], VOCAB)
                                          != unpack_bitmask(xg_mask[i][None], VOCAB)).sum())
                llg[i].consume_token(paths[i][s])
                if not xg[i].accept_token(paths[i][s]):  # a token llguidance allowed
                    alive.remove(i)
                    rejected.append(repr(tok.backend.decode(paths[i][max(0, s - 3):s + 1])))
        llg_ms, xg_ms = 1e3 * sum(llg_rows) / args.steps, 1e3 * sum(xg_rows) / args.steps  # (rows still alive)
        print(f"| {name} | {llg_ms:.2f} | {xg_ms:.2f} | {llg_ms / xg_ms:.1f}x | {1e6 * percentile(llg_rows, .5):.0f} / "
              f"{1e6 * percentile(llg_rows, .99):.0f} | {1e6 * percentile(xg_rows, .5):.0f} / "
              f"{1e6 * percentile(xg_rows, .99):.0f} | {differ} of {masks} "
              f"({differ_tokens / max(differ, 1):.1f}) | {compile_ms:.0f} |", flush=True)
        if rejected:
            print(f"{name}: xgrammar rejected {len(rejected)} rows' paths at a token llguidance allowed (the row then "
                  f"left both timings); the last tokens there: {', '.join(rejected[:6])}")


if __name__ == "__main__":
    main()
