"""OpenAI-compatible HTTP server: ``fastlfm serve MODEL``.

A drop-in for ``vllm serve`` / ``llama-server`` in front of LFM2: /v1/chat/completions
(streaming, tools, logprobs), /v1/completions, /v1/models, /health and Prometheus /metrics.
Build an app around an engine with :func:`fastlfm.server.app.create_app`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..engine.async_engine import DEFAULT_STREAM_EVENTS_PER_S, DEFAULT_STREAM_INTERVAL_S, STREAM_EVERY_STEP
from .http import (DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
                   DEFAULT_SHUTDOWN_TIMEOUT)

__all__ = ["main", "build_parser"]


def build_parser(prog: str = "fastlfm serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve an LFM2 model behind the OpenAI API.")
    p.add_argument("model", help="local checkpoint folder, Hugging Face hub id or LFM2 GGUF file")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("FASTLFM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $FASTLFM_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients pass as 'model' (default: the MODEL argument)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + completion)")
    p.add_argument("--max-queue-len", type=int, default=None,
                   help="requests allowed to wait beyond --max-num-seqs before answering 429 (default 1024)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="weight-only quantization at load time (CPU): int8 per channel, int4 in groups of 32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the CUDA decode step (about a minute more at start-up; the speed "
                   "BENCHMARKS.md reports); --no-compile starts faster with CUDA graphs of the eager step")
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks and conv state of prompts that start like an earlier one (shared "
                        "system prompts, later chat turns); --no-prefix-caching recomputes every prompt")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image_url parts (LFM2-VL); off by default, since the server then requests any "
                        "address a client names from its own network. data: URLs are always accepted")
    p.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024,
                   help="largest image accepted, data: URL or fetched (default 20 MiB)")
    p.add_argument("--image-fetch-timeout", type=float, default=10.0,
                   help="seconds allowed to download one remote image (default 10)")
    limits = p.add_argument_group("limits against slow and hostile clients")
    limits.add_argument("--max-request-bytes", type=int, default=None,
                        help="largest request body; larger ones get 413 before they are read (default 4 MiB, or for "
                             "an image model enough for one image of --max-image-bytes as base64 + 1 MiB)")
    limits.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                        help=f"seconds a client has to send a request's headers (default {DEFAULT_HEADER_TIMEOUT:g}); "
                             "then 408 and disconnect")
    limits.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                        help=f"seconds a client has to send a request's body once its headers arrived (default "
                             f"{DEFAULT_BODY_TIMEOUT:g}); then 408 and disconnect")
    limits.add_argument("--keep-alive-timeout", type=float, default=DEFAULT_KEEP_ALIVE_TIMEOUT,
                        help=f"seconds an idle kept-alive connection stays open (default {DEFAULT_KEEP_ALIVE_TIMEOUT:g})")
    limits.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help=f"open connections served (default {DEFAULT_MAX_CONNECTIONS}; lowered to fit the "
                             "file-descriptor limit); beyond it requests get 503, except /health and /metrics")
    limits.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT,
                        help=f"on SIGTERM, seconds in-flight requests may finish (default {DEFAULT_SHUTDOWN_TIMEOUT:g}); "
                             "then they are aborted and the server exits")
    p.add_argument("--stream-interval-ms", type=float, default=DEFAULT_STREAM_INTERVAL_S * 1000,
                   help=f"with more than {STREAM_EVERY_STEP} streams, each stream's tokens are sent at most every MS "
                        f"milliseconds, merged (default {DEFAULT_STREAM_INTERVAL_S * 1000:g}; 0: every token); "
                        "fewer events leave the GIL to the engine")
    p.add_argument("--stream-events-per-s", type=float, default=DEFAULT_STREAM_EVENTS_PER_S,
                   help="with many streams, each one's interval grows so that all of them together get at most this "
                        f"many deliveries a second (default {DEFAULT_STREAM_EVENTS_PER_S:g})")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in a process of its own, so the HTTP side's Python (SSE events, templating) "
                        "never holds the GIL the engine's steps need; --no-engine-process: a thread of this process")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastlfm serve``; returns the exit status."""
    args = build_parser().parse_args(argv)
    for flag in ("port", "max_num_seqs", "max_model_len", "max_queue_len", "max_image_bytes", "max_request_bytes",
                 "max_connections"):
        value = getattr(args, flag)
        if value is not None and (value < 1 and flag != "max_queue_len" or value < 0):
            build_parser().error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    for flag in ("image_fetch_timeout", "header_timeout", "body_timeout", "keep_alive_timeout", "shutdown_timeout"):
        if not getattr(args, flag) > 0:
            build_parser().error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not args.stream_interval_ms >= 0:
        build_parser().error(f"--stream-interval-ms must be >= 0, got {args.stream_interval_ms}")
    if not args.stream_events_per_s > 0:
        build_parser().error(f"--stream-events-per-s must be positive, got {args.stream_events_per_s}")

    from ..engine import AsyncLLMEngine
    from ..engine.async_engine import freeze_startup_heap
    from ..engine.engine_process import EngineProcessClient
    from .app import DEFAULT_MAX_QUEUE_LEN, create_app
    from .http import make_server

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        options = dict(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len, compile=args.compile, quantization=args.quantization,
                       stream_interval_s=args.stream_interval_ms / 1000, stream_events_per_s=args.stream_events_per_s,
                       enable_prefix_caching=args.prefix_caching,
                       lazy_graphs=False)  # every graph before the first client
        engine = EngineProcessClient(args.model, **options) if args.engine_process else \
            AsyncLLMEngine.from_pretrained(args.model, **options)
        app = create_app(
            engine,
            args.served_model_name or [args.model],
            api_key=args.api_key,
            max_queue_len=DEFAULT_MAX_QUEUE_LEN if args.max_queue_len is None else args.max_queue_len,
            model_path=args.model,
            shutdown_engine=True,
            allow_remote_images=args.allow_remote_images,
            max_image_bytes=args.max_image_bytes,
            image_fetch_timeout=args.image_fetch_timeout,
            max_request_bytes=args.max_request_bytes,
        )
        server = make_server(app, host=args.host, port=args.port, log_level=args.log_level,
                             header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                             max_connections=args.max_connections, shutdown_timeout=args.shutdown_timeout,
                             keep_alive_timeout=args.keep_alive_timeout)
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError
        print(f"fastlfm serve: error: {e}", file=sys.stderr)
        return 1
    freeze_startup_heap()  # torch, the app, (without --no-engine-process) the engine: out of later full collections
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn drained and shut down, then re-raised it; no traceback
        return 130
    return 130 if server.interrupted else 0
