"""Structured output's cost (issue 18): decode tok/s with a JSON schema vs without, at batch 1 and 64,
on the raw engine and through LLM.generate (the full-size test tokenizer attached).

GPU (LFM2-1.2B shape, random bf16 weights):  PYTHONPATH=src python bench/structured.py
CPU smoke run (tiny model, short runs):      PYTHONPATH=src python bench/structured.py --device cpu --tiny
Stage "structured" of bench/device_run.sh. Prints one table and writes it to $OUT/structured_table.md
when $OUT is set. Goal: constrained >= 90% of unconstrained tok/s.

Every request is greedy, `max_new_tokens` long, with short prompts (the time is decode). The
unconstrained requests ignore eos; the schemas demand more array items than any run writes, so
the grammar never completes and constrained requests also run every step: both sides decode the
same number of tokens. "strings" is an array of free strings (the common case of long JSON
output: masks inside strings); "records" an array of typed objects (keys, enums, integers,
bounded strings: the lexer and parser switch contexts every few tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from fastlfm import LLM
from fastlfm.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from gpu import bench_checkpoint, host_breakdown, log  # noqa: E402

SCHEMAS = {
    "strings": {"type": "array", "items": {"type": "string"}, "minItems": 100000},
    "records": {"type": "array", "minItems": 100000, "items": {
        "type": "object", "additionalProperties": False, "required": ["id", "name", "kind", "tags"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999999},
                       "name": {"type": "string", "maxLength": 24},
                       "kind": {"enum": ["person", "place", "thing"]},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}}},
}


def sync_time(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def decode_tps(run, batch: int, new: int, device: str) -> tuple[float, list]:
    """Output tok/s of `run()` (one call: the batch to completion), and its results."""
    t = sync_time(device)
    results = run()
    dt = sync_time(device) - t
    for r in results:  # every request decoded every step (none aborted, none ended by its grammar)
        assert len(r.token_ids) == new and r.finish_reason == "length", (len(r.token_ids), r.finish_reason)
    return batch * new / dt, results


def mask_costs(engine, params: SamplingParams, outputs: list[list[int]], pools: list[int]) -> str:
    """Mean ms per step to fill the masks of len(outputs) rows (fastlfm.structured.fill_bitmask),
    replaying each row's own tokens, for each pool size (0: one matcher after the other), the rows
    dealt over as many lanes as threads and handed over by lane, as the engine does."""
    from fastlfm.structured import advance_all, fill_bitmask

    parts = []
    for threads in pools:
        executor = engine.grammars.executor(threads) if threads >= 2 else None
        lanes = max(1, threads)
        matchers = [engine.grammars.matcher(params, i % lanes) for i in range(len(outputs))]
        rows = sorted(((m, i) for i, m in enumerate(matchers)), key=lambda mi: mi[1] % lanes)
        spent, steps = 0.0, min(len(o) for o in outputs)
        for step in range(steps):
            t = time.perf_counter()
            fill_bitmask(rows, len(rows), engine.config.vocab_size, pin=False, executor=executor)
            spent += time.perf_counter() - t
            advance_all([(m, o[step]) for m, o in zip(matchers, outputs)], executor)
        parts.append(f"pool {threads}: {1e3 * spent / max(steps, 1):.2f} ms")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="LFM2-1.2B")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model and workload (CPU smoke run)")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per request (512 GPU, 48 --tiny)")
    ap.add_argument("--schemas", nargs="+", default=list(SCHEMAS), choices=list(SCHEMAS))
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measurement, interleaved; the best counts")
    ap.add_argument("--table", default="structured_table.md")
    ap.add_argument("--grammar-threads", type=int, default=None,
                    help="LLMEngine grammar_threads (llguidance's pool; 0: one row after the other)")
    ap.add_argument("--mask-threads", type=int, nargs="*", default=[],
                    help="also time the masks alone at the largest batch, per schema, with these pool sizes "
                         "(0: one matcher after the other), on the states of the constrained run's own tokens")
    ap.add_argument("--argmax-first-ab", action="store_true",
                    help="also run each schema at the largest batch with every mask filled (engine.grammar_argmax_first "
                         "False) and with masks skipped where the grammar accepts the argmax (True), alternately; "
                         "tokens must be equal")
    args = ap.parse_args()
    device = args.device
    batches = args.batches or ([1, 8] if args.tiny else [1, 64])
    new = args.new_tokens or (48 if args.tiny else 512)
    if args.tiny:
        import tempfile

        from fastlfm.testing import tiny_config, write_checkpoint
        folder = Path(tempfile.mkdtemp()) / "tiny"
        # the real 65,536-token vocabulary: a mask's cost grows with it (1,024 ids hide most of it)
        write_checkpoint(folder, tiny_config(args.model if args.model != "LFM2-1.2B" else "LFM2-350M", vocab_size=65536))
        dtype, label = "float32", "tiny LFM2 (random fp32)"
    else:
        folder, dtype, label = bench_checkpoint(args.model), "bfloat16", f"{args.model} shape (random bf16)"
    options = {"max_num_seqs": max(batches), "max_model_len": 2048, "grammar_threads": args.grammar_threads}
    if device == "cuda":
        options["gpu_memory_utilization"] = 0.5
    t = time.perf_counter()
    llm = LLM(str(folder), device=device, dtype=dtype, engine_options=options)
    engine = llm.engine
    log(f"{label} on {device}: engine ready in {time.perf_counter() - t:.1f}s, grammar_threads {engine.grammar_threads}")

    def params(schema: str | None, n: int) -> SamplingParams:
        if schema is None:
            return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        return SamplingParams(max_new_tokens=n, temperature=0.0, json_schema=SCHEMAS[schema])

    runs = {  # path -> f(prompt ids, params) -> results
        "engine": lambda ps, p: engine.generate(ps, p),
        "LLM.generate": lambda ps, p: llm.generate(ps, p),
    }
    rows, notes, best_unconstrained = [], [], {}
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        ps = torch.randint(500, engine.config.vocab_size, (batch, 32), generator=g).tolist()  # past special ids
        for schema in [None, *args.schemas]:  # warm-up: graphs of this batch size, grammars compiled
            engine.generate(ps, params(schema, 8))
        for path, run in runs.items():
            best: dict[str | None, float] = {}
            for _ in range(args.repeats):  # unconstrained and each schema in turn: drifts hit all alike
                for schema in [None, *args.schemas]:
                    tps, results = decode_tps(lambda: run(ps, params(schema, new)), batch, new, device)
                    best[schema] = max(best.get(schema, 0.0), tps)
            base = best[None]
            if path == "engine":
                best_unconstrained[batch] = base
            for schema in args.schemas:
                tps = best[schema]
                rows.append((path, batch, schema, base, tps))
                log(f"{path} batch {batch} {schema}: {tps:,.0f} tok/s vs {base:,.0f} unconstrained ({tps / base:.0%})")
            if path == "engine" and batch == max(batches):
                sample = llm.tokenizer.decode(results[0].token_ids[:40])
                notes.append(f"batch {batch} {args.schemas[-1]}, output of request 0 begins: {sample!r}")
        if batch == max(batches) and args.argmax_first_ab:
            for schema in args.schemas:
                best, tokens, default = {}, {}, engine.grammar_argmax_first
                for _ in range(args.repeats):
                    for first in (False, True):
                        engine.grammar_argmax_first = first
                        tps, results = decode_tps(lambda: engine.generate(ps, params(schema, new)), batch, new, device)
                        best[first], tokens[first] = max(best.get(first, 0.0), tps), [r.token_ids for r in results]
                engine.grammar_argmax_first = default  # (the host breakdown below measures the default)
                notes.append(f"engine batch {batch} {schema}: every mask {best[False]:,.0f} tok/s, masks skipped where "
                             f"the grammar accepts the argmax {best[True]:,.0f} tok/s ({best[True] / best[False]:.2f}x; "
                             f"of unconstrained {best[True] / best_unconstrained[batch]:.0%}); tokens equal: "
                             f"{tokens[False] == tokens[True]}")
                log(notes[-1])
        if batch == max(batches) and args.mask_threads:
            for schema in args.schemas:
                outs = engine.generate(ps, params(schema, min(new, 128)))
                notes.append(f"batch {batch} {schema}, masks alone: " + mask_costs(
                    engine, params(schema, new), [o.token_ids for o in outs], args.mask_threads))
                log(notes[-1])
        if batch == max(batches):  # where the host time goes (per step), with and without a grammar
            for schema in [None, *args.schemas]:
                split = host_breakdown(engine, lambda: engine.generate(ps, params(schema, new)))
                notes.append(f"engine batch {batch} {schema or 'unconstrained'}: {split}")
                log(notes[-1])
    engine.check_no_leaks()

    lines = [f"## Structured output: decode tok/s with a JSON schema vs without ({label}, {device}, "
             f"{new} new tokens a request, greedy)", "",
             "| path | batch | schema | unconstrained tok/s | json_schema tok/s | ratio | goal >= 90% |",
             "|---|---:|---|---:|---:|---:|---|"]
    for path, batch, schema, base, tps in rows:
        lines.append(f"| {path} | {batch} | {schema} | {base:,.0f} | {tps:,.0f} | {tps / base:.0%} | "
                     f"{'met' if tps >= 0.9 * base else 'NOT met'} |")
    lines += [""] + [f"- {n}" for n in notes]
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], args.table).write_text(table + "\n")


if __name__ == "__main__":
    main()
