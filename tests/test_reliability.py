"""The reliability load test (bench/reliability.py) at a small scale on CPU: a mix of normal
requests, dropped streams, invalid and oversized bodies, slow clients and adversarial outputs
(lone UTF-8 continuation bytes forced by logit_bias) against `fastlfm serve` in its own process.

Asserted: every request got the answer its kind calls for, no 5xx (clients' view and the
server's count), nothing left in use (KV blocks, conv slots, requests), dropped streams aborted.
Not asserted here: the latency criterion (normal requests' p99 within 2x of a clean run) is a
performance figure, measured by the benchmark at full scale on the GPU (BENCHMARKS.md); on a
loaded 2-core CI machine a wall-clock ratio between two runs would be noise. It is still
computed and printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastlfm.testing import tiny_config, write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reliability  # noqa: E402


def test_continuation_byte_tokens_decode_to_lone_continuation_bytes(tmp_path):
    from fastlfm.tokenizer import Tokenizer

    folder = write_checkpoint(tmp_path / "ckpt", tiny_config())
    tok = Tokenizer.from_pretrained(folder)
    ids = reliability.continuation_byte_tokens(tok)
    assert len(ids) == 64
    for i in ids:  # each is one byte in 0x80-0xBF: alone, never a character
        assert tok.decode([i]) == "\ufffd"
        assert tok.decode(tok.encode("é", add_special_tokens=False) + [i]) == "é\ufffd"


def test_reliability_small_scale_on_cpu(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", tiny_config())
    out = tmp_path / "out"
    code = reliability.main([str(folder), "--device", "cpu", "--dtype", "float32", "--requests", "120",
                             "--clean-requests", "24", "--concurrency", "6", "--max-tokens", "12",
                             "--adversarial-tokens", "48", "--max-request-bytes", str(64 * 1024),
                             "--header-timeout", "1.5", "--body-timeout", "2.5", "--output-dir", str(out)])
    report = json.loads((out / "reliability.json").read_text())
    print((out / "reliability.md").read_text())
    checks = report["checks"]
    latency_check = next(name for name in checks if name.startswith("normal p99 latency"))
    failed = [name for name, ok in checks.items() if not ok and name != latency_check]
    assert not failed, (failed, json.dumps(report["kinds"], indent=1)[:4000])
    assert code in (0, 1) and (code == 0) == checks[latency_check]
    assert set(report["kinds"]) == set(reliability.KINDS)
    assert report["kinds"]["adversarial"]["count"] >= 20 and report["adversarial_token_ids"] == 64
    # The server counted each error response once: as many as the clients received, status by status.
    received: dict[str, int] = {}
    for kind in report["kinds"].values():
        for status, n in kind["statuses"].items():
            if status.isdigit() and int(status) >= 400:
                received[status] = received.get(status, 0) + n
    counted = {k.split("=")[1].rstrip("}"): v for k, v in report["server_metrics"].items()
               if k.startswith("fastlfm_request_errors_total")}
    assert counted == received
