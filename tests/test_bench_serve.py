"""``fastlfm bench serve`` at a small scale on CPU: it starts the server, sends random-token
prompts at two concurrencies and reports. Oracles: the server's own /metrics (generated tokens
counted by the engine == tokens the clients were told they got == requests x output length,
since ignore_eos), the server's prompt token counts (the random text tokenizes to the asked
length), a hand computation of percentiles, and the published SGLang figures in the table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastlfm.server.benchmark import RequestResult, percentile, render_table, split_load, summarize
from fastlfm.testing import tiny_config, write_checkpoint


def test_percentile_by_hand():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_mean_in_flight_is_busy_time_over_the_run():
    """By hand: slot 1 runs [0, 4], [4, 6], [7, 8] (empty over [6, 7]), slot 2 runs [0, 1]: 8 s of
    requests over an 8 s run, 1.0 in flight on average of the 2 allowed."""
    runs = [(0, 4), (4, 6), (7, 8), (0, 1)]
    results = [RequestResult(ok=True, start=a, end=b, output_tokens=3, ttft=0.1, chunk_times=[a + 0.1, b])
               for a, b in runs]
    level = summarize(results, 2)
    assert level["duration_s"] == 8 and level["mean_in_flight"] == 1.0


def test_client_processes_get_requests_in_proportion_to_their_slots():
    """By hand: 100 slots over 8 processes are 4 x 13 + 4 x 12; 200 requests are then 26 and 24 (two waves
    each, where dealing them evenly gave 25 to a 12-slot process: a third wave of one); every request goes
    to exactly one process."""
    assert split_load(200, 100, 8) == [(0, 26, 13), (26, 26, 13), (52, 26, 13), (78, 26, 13),
                                       (104, 24, 12), (128, 24, 12), (152, 24, 12), (176, 24, 12)]
    for n, c, p in [(1000, 100, 8), (7, 3, 2), (5, 16, 8), (33, 17, 5)]:
        shares = split_load(n, c, p)
        assert sum(k for _, k, _ in shares) == n and sum(s for _, _, s in shares) == c
        assert [start for start, _, _ in shares] == [sum(k for _, k, _ in shares[:i]) for i in range(p)]
        assert all(abs(k - n * s / c) < 1 for _, k, s in shares)


def test_table_puts_sglang_published_figures_beside_ours():
    level = {"concurrency": 100, "requests": 200, "completed": 200, "failed": 0, "output_tok_s": 29_800.0,
             "output_tokens": 204_800, "ttft_ms": {"p50": 20.0, "p99": 80.0},
             "itl_ms": {"p50": 3.0, "p99": 9.0}, "tpot_ms": {"p50": 3.1, "p99": 4.0}, "e2e_s": {"p50": 3.4, "p99": 3.9},
             "server_metrics": {}}
    report = {"model": "LFM2-1.2B", "shape": "LFM2-1.2B", "device": "NVIDIA H200", "input_len": 1024,
              "output_len": 1024, "levels": [level]}
    table = render_table(report)
    row = next(line for line in table.splitlines() if line.startswith("| 100 |"))
    assert "14,900" in row and "2.00x" in row  # 29,800 / 14,900
    assert "c=100 output >= 40,000 tok/s: 29,800 NOT met" in table


def test_bench_serve_small_scale_on_cpu(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", tiny_config(vocab_size=65536))  # the full-size test tokenizer
    out = tmp_path / "out"
    n, input_len, output_len = 3, 48, 12
    cmd = [sys.executable, "-m", "fastlfm.cli", "bench", "serve", str(folder), "--device", "cpu", "--dtype",
           "float32", "--input-len", str(input_len), "--output-len", str(output_len), "--concurrency", "1", "3",
           "--num-prompts", str(n), "--output-dir", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "serve_ckpt.json").read_text())
    assert [lvl["concurrency"] for lvl in report["levels"]] == [1, 3]
    for lvl in report["levels"]:
        assert (lvl["requests"], lvl["completed"], lvl["failed"]) == (n, n, 0)
        assert lvl["output_tokens"] == n * output_len
        assert lvl["prompt_tokens_mean"] == input_len
        server = lvl["server_metrics"]
        assert server["fastlfm_generation_tokens_total"] == n * output_len
        assert server["fastlfm_prompt_tokens_total"] == n * input_len
        assert server["fastlfm_request_success_total{finished_reason=length}"] == n
        assert not any(k.startswith("fastlfm_request_errors_total") for k in server)
        assert server["fastlfm_kv_blocks_used"] == 0 and server["fastlfm_conv_slots_used"] == 0
        assert 0 < lvl["ttft_ms"]["p50"] <= lvl["e2e_s"]["p50"] * 1000
        assert lvl["itl_ms"]["p50"] > 0 and lvl["tpot_ms"]["p50"] > 0 and lvl["output_tok_s"] > 0
    assert report["sigterm_exit_s"] is not None
    table = (out / "serve_ckpt.md").read_text()
    assert table.startswith("### fastlfm serve over HTTP") and "| 3 | 3/3 |" in table
    assert table.strip() in proc.stdout


def test_prefix_cache_bench_small_scale_on_cpu(tmp_path):
    """bench/prefix_cache.py with tiny sizes: both server runs complete every turn; the cached
    tokens the clients were told of equal the server's counted hits, the uncached server reports
    none, and the later turns of the cached run find at least the shared system prompt's blocks
    (block size 16 on CPU). The warm-up completes in both runs with a context that holds the load's
    longest prompt (~210 tokens) and no more: it is as long as a first turn (it once sent the system
    prompt twice, ~280 tokens, and its failure went unnoticed)."""
    folder = write_checkpoint(tmp_path / "ckpt", tiny_config(vocab_size=65536))
    out = tmp_path / "out"
    convs, turns, system_len = 3, 3, 128
    cmd = [sys.executable, "bench/prefix_cache.py", str(folder), "--device", "cpu", "--dtype", "float32",
           "--conversations", str(convs), "--turns", str(turns), "--system-len", str(system_len), "--user-len", "8",
           "--output-len", "4", "--server-args=--max-model-len 240", "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "prefix_cache.json").read_text())
    on, off = report["runs"]["on"], report["runs"]["off"]
    for run in (on, off):
        assert run["warmup_completed"] == 2
        assert (run["requests"], run["completed"], run["failed"]) == (convs * turns, convs * turns, 0)
        assert run["server_metrics"]["fastlfm_generation_tokens_total"] == convs * turns * 4
    later = convs * (turns - 1)
    hits = on["server_metrics"]["fastlfm_prefix_cache_hits_total"]
    assert hits == pytest.approx(later * on["later_cached_tokens_mean"] + convs * on["first_cached_tokens_mean"])
    assert on["later_cached_tokens_mean"] >= system_len // 16 * 16
    assert off["later_cached_tokens_mean"] == 0 and "fastlfm_prefix_cache_hits_total" not in off["server_metrics"]
    assert "Goal (issue 18)" in (out / "prefix_cache.md").read_text()
