"""Sum up a FASTLFM_TRACE file (bench/host_trace/sitecustomize.py) of a bench/prefix_cache.py run, turn by turn.

    python bench/host_trace/report.py TRACE --turns 10 [--skip 2] [--steps]

Requests are put in turns by prompt length (each conversation's prompts grow turn by turn and all
conversations have the same lengths, give or take re-tokenization): sorted by `n`, cut into --turns
equal groups, after dropping the --skip first requests (the bench's warm-up: 2).
"""

import argparse
import json


def _p(xs):
    xs = sorted(xs)
    return f"{1e3 * xs[len(xs) // 2]:6.1f} / {1e3 * xs[-1]:6.1f}" if xs else "-"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--turns", type=int, required=True)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--steps", action="store_true", help="sum up the step timeline (FASTLFM_TRACE_STEPS=1)")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in open(args.trace)]
    preps = [r for r in rows if "prep0" in r][args.skip:]
    merged: dict[str, dict] = {}  # a request's events, written by the server and the engine process
    for r in rows:
        if "rid" in r:
            for k, v in r.items():
                merged.setdefault(r["rid"], {}).setdefault(k, v)
    reqs = sorted([r for r in merged.values() if "submit" in r], key=lambda r: r["submit"])[args.skip:]
    reqs = [r for r in reqs if all(k in r for k in ("add", "sched", "tok", "deliv"))]
    print(f"chat body preparation (JSON, template, tokenizer), p50 / max ms: {_p([r['prep1'] - r['prep0'] for r in preps])}")
    print("ms, p50 / max | turn | reqs | submit->add (engine thread takes it) | add->scheduled | scheduled->first token "
          "| token->stream | cached tokens (mean)")
    reqs.sort(key=lambda r: r["n"])
    size = max(1, len(reqs) // args.turns)
    for t in range(args.turns):
        g = reqs[t * size:(t + 1) * size if t < args.turns - 1 else len(reqs)]
        if not g:
            continue
        print(f"| {t + 1} | {len(g)} | {_p([r['add'] - r['submit'] for r in g])} | {_p([r['sched'] - r['add'] for r in g])} "
              f"| {_p([r['tok'] - r['sched'] for r in g])} | {_p([r['deliv'] - r['tok'] for r in g])} "
              f"| {sum(r['cached'] for r in g) / len(g):,.0f}")
    t0 = min((r["submit"] for r in reqs), default=0.0)
    jits = [r for r in rows if "jit" in r and r["jit"] >= t0]
    slow = [r for r in rows if "slow_step" in r and r["slow_step"] >= t0]
    print(f"Triton JIT compiles while serving: {len(jits)}, {sum(r['s'] for r in jits):.2f} s")
    for r in jits:
        print(f"  +{r['jit'] - t0:7.3f} s  {r['s'] * 1e3:6.0f} ms  {r['kernel']}  {r['key'][:160]}")
    gcs = [r for r in rows if "gc" in r and r["gc"] >= t0]
    print(f"garbage collections of 5 ms or more while serving: {len(gcs)}, {sum(r['s'] for r in gcs):.2f} s")
    for r in gcs[:20]:
        print(f"  +{r['gc'] - t0:7.3f} s  {r['s'] * 1e3:6.0f} ms  generation {r['generation']}  pid {r['pid']}")
    print(f"engine steps over 30 ms while serving: {len(slow)}")
    for r in slow[:20]:
        print(f"  +{r['slow_step'] - t0:7.3f} s  {r['s'] * 1e3:6.0f} ms  running {r['running']}")
    if args.steps:
        steps_report([r for r in rows if "step" in r])


def steps_report(steps: list[dict]) -> None:
    """Where the engine loop's time went: pure decode steps by batch size, steps with prompt
    tokens, the gaps between steps (the loop outside `_step`: requests in, outputs out, idle)."""
    steps.sort(key=lambda r: r["step"])
    if not steps:
        print("no step lines (FASTLFM_TRACE_STEPS=1 not set?)")
        return
    span = steps[-1]["step"] + steps[-1]["s"] - steps[0]["step"]
    gaps = [b["step"] - (a["step"] + a["s"]) for a, b in zip(steps, steps[1:])]
    decode = [r for r in steps if r["ntok"] == r["rows"]]
    mixed = [r for r in steps if r["ntok"] > r["rows"]]
    print(f"steps: {len(steps)} over {span:.3f} s; decode-only {len(decode)} ({sum(r['s'] for r in decode):.3f} s), "
          f"with prompt tokens {len(mixed)} ({sum(r['s'] for r in mixed):.3f} s, {sum(r['ntok'] - r['dec'] for r in mixed):,} "
          f"prompt tokens), between steps {sum(gaps):.3f} s (over 5 ms: {sum(g for g in gaps if g > 0.005):.3f} s)")
    print("decode-only steps by rows: rows | steps | ms p50 / p99 | s")
    for lo, hi in ((1, 1), (2, 16), (17, 64), (65, 96), (97, 10**9)):
        g = sorted(r["s"] for r in decode if lo <= r["rows"] <= hi)
        if g:
            print(f"  {lo}-{hi if hi < 10**9 else ''} | {len(g)} | {1e3 * g[len(g) // 2]:.3f} / {1e3 * g[int(len(g) * .99)]:.3f} | {sum(g):.3f}")
    g = sorted(r["s"] for r in mixed)
    if g:
        print(f"steps with prompt tokens, ms p50 / p99 / max: {1e3 * g[len(g) // 2]:.2f} / {1e3 * g[int(len(g) * .99)]:.2f} / {1e3 * g[-1]:.2f}")
    t0 = steps[0]["step"]
    long = sorted(((b["step"] - (a["step"] + a["s"]), a["step"] + a["s"] - t0) for a, b in zip(steps, steps[1:])), reverse=True)
    print("longest gaps between steps: " + ", ".join(f"{1e3 * g:.1f} ms at +{at:.3f} s" for g, at in long[:8]))
    print("longest steps: " + ", ".join(f"{1e3 * r['s']:.1f} ms at +{r['step'] - t0:.3f} s ({r['rows']} rows, {r['ntok']} tokens)"
                                        for r in sorted(steps, key=lambda r: -r["s"])[:8]))


if __name__ == "__main__":
    main()
