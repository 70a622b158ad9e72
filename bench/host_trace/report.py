"""Sum up a FASTLFM_TRACE file (bench/host_trace/sitecustomize.py) of a bench/prefix_cache.py run, turn by turn.

    python bench/host_trace/report.py TRACE --turns 10 [--skip 2]

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
    print(f"engine steps over 30 ms while serving: {len(slow)}")
    for r in slow[:20]:
        print(f"  +{r['slow_step'] - t0:7.3f} s  {r['s'] * 1e3:6.0f} ms  running {r['running']}")


if __name__ == "__main__":
    main()
