"""LFM2-VL behind the OpenAI server: image_url parts with base64 data: URLs through the official
``openai`` client against a real uvicorn server on 127.0.0.1; remote URLs refused by default
and fetched (within size and time limits) when enabled; bad images and image parts for a
text-only model answered with 400 in the OpenAI error schema.

Oracle: transformers' Lfm2VlForConditionalGeneration.generate (greedy) on the prompt ids and
image tensors that fastlfm's processor (parity-tested against transformers') makes of the
same image bytes and text.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import random
import threading
import time

import httpx
import openai
import pytest
import torch
import transformers
from PIL import Image

from fastlfm.models.lfm2_vl_processing import Lfm2VlProcessor
from fastlfm.server.app import create_app
from fastlfm.testing import write_vl_checkpoint
from fastlfm.tokenizer import Tokenizer
from server_helpers import cpu_engine, openai_client, running_server

MODEL = "lfm2-vl-tiny"
NEW = 12
QUESTION = "What is in this image?"
REMOTE_LIMIT = 400_000


def png_bytes(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(w * h * 3)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes(300, 200, seed=11)
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def assert_error(response: httpx.Response, status: int, param: str, *fragments: str, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    for fragment in fragments:
        assert fragment in err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_vl_checkpoint(tmp_path_factory.mktemp("vl-server"))


@pytest.fixture(scope="module")
def engine(folder):
    with cpu_engine(folder, max_num_seqs=4, max_model_len=512) as eng:
        yield eng


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(create_app(engine, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url, timeout=120)


@pytest.fixture(scope="module")
def expected(folder):
    """transformers' greedy reply to QUESTION + PNG, and the prompt length."""
    tok = Tokenizer.from_pretrained(folder)
    processor = Lfm2VlProcessor.from_pretrained(folder, tok)
    enc = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                                      {"type": "image", "image": PNG}]}])
    ids = enc["input_ids"][0]
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=enc["pixel_values"],
                       pixel_attention_mask=enc["pixel_attention_mask"], spatial_shapes=enc["spatial_shapes"],
                       max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()
    return tok.decode(out, skip_special_tokens=True), len(ids)


def wait_idle(engine, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_running == s.num_waiting == s.kv_blocks_used == s.conv_slots_used == 0:
            break
        time.sleep(0.02)
    engine.engine.check_no_leaks()


class _ImageHost(http.server.BaseHTTPRequestHandler):
    """Remote images: /img.png, /big.png (announced size), /big-stream.png (no length), /slow.png, else 404."""

    def do_GET(self):  # noqa: N802
        if self.path == "/img.png":
            self._send(PNG)
        elif self.path == "/big.png":
            self._send(b"\0" * (REMOTE_LIMIT + 1))
        elif self.path == "/big-stream.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # HTTP/1.0 without Content-Length: the body ends when the connection closes
            for _ in range(REMOTE_LIMIT // 10_000 + 2):
                self.wfile.write(b"\0" * 10_000)
        elif self.path == "/slow.png":
            time.sleep(3)
            self._send(PNG)
        else:
            self.send_error(404)

    def _send(self, data: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # the fetcher hangs up on purpose (size, time)
            super().handle_error(request, client_address)


@contextlib.contextmanager
def image_host():
    server = _QuietServer(("127.0.0.1", 0), _ImageHost)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- tests


def test_base64_image_matches_transformers(client, engine, expected):
    text, prompt_len = expected
    kwargs = dict(model=MODEL, messages=image_message(PNG_URL), max_tokens=NEW, temperature=0,
                  extra_body={"ignore_eos": True})
    resp = client.chat.completions.create(**kwargs)
    assert resp.choices[0].message.content == text
    assert resp.choices[0].finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_len, NEW)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == text
    # two choices of one image request, next to a text-only request
    both = client.chat.completions.create(**{**kwargs, "n": 2})
    assert [c.message.content for c in both.choices] == [text, text]
    # the image reaches the model: another image, another reply
    other = "data:image/png;base64," + base64.b64encode(png_bytes(300, 200, seed=7)).decode()
    assert client.chat.completions.create(**{**kwargs, "messages": image_message(other)}).choices[0].message.content \
        != text
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert plain.usage.prompt_tokens < 20  # no image tokens in a text request
    wait_idle(engine)


def test_remote_url_refused_without_the_flag(client, base_url):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=image_message("https://example.com/cat.png"))
    assert "--allow-remote-images" in str(e.value)
    r = httpx.post(base_url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": image_message("http://127.0.0.1:1/cat.png")})
    assert_error(r, 400, "messages.0.content.1.image_url.url", "Remote image URLs are not fetched",
                 "--allow-remote-images", code="remote_images_disabled")


def test_bad_images_are_clear_400s(base_url, engine):
    url = base_url + "/v1/chat/completions"
    param = "messages.0.content.1.image_url.url"

    def post(image_url: str, stream: bool = False) -> httpx.Response:
        return httpx.post(url, json={"model": MODEL, "messages": image_message(image_url), "stream": stream},
                          timeout=60)

    corrupt = "data:image/png;base64," + base64.b64encode(b"this is not a PNG file at all").decode()
    assert_error(post(corrupt), 400, param, "Invalid image in " + param, "cannot decode", code="invalid_image")
    assert_error(post(corrupt, stream=True), 400, param, "cannot decode")  # refused before the stream starts
    truncated = "data:image/png;base64," + base64.b64encode(PNG[: len(PNG) // 2]).decode()
    assert_error(post(truncated), 400, param, "Invalid image", code="invalid_image")
    assert_error(post("data:image/png;base64,@@not*base64@@"), 400, param, "Invalid base64")
    assert_error(post("data:image/png,rawbytes"), 400, param, "not base64-encoded")
    assert_error(post("data:image/png;base64"), 400, param, "Malformed image data: URL")
    assert_error(post("/etc/passwd"), 400, param, "Unsupported image URL")
    assert_error(post("file:///etc/passwd"), 400, param, "Unsupported image URL")
    no_url = [{"role": "user", "content": [{"type": "image_url"}]}]
    assert_error(httpx.post(url, json={"model": MODEL, "messages": no_url}), 400, "messages.0.content.0.image_url",
                 "needs an 'image_url' object")
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    assert_error(httpx.post(url, json={"model": MODEL, "messages": audio}), 400, "messages.0.content.0.type",
                 "'input_audio' is not supported", "image_url parts")
    # a literal <image> in the text leaves the prompt with more image tokens than images
    extra = image_message(PNG_URL, text="look: <image>")
    assert_error(httpx.post(url, json={"model": MODEL, "messages": extra}), 400, "messages",
                 "Cannot prepare the images", "2 <image>")
    wait_idle(engine)


def test_image_to_text_only_model(tiny_ckpt):
    with cpu_engine(tiny_ckpt, max_num_seqs=2, max_model_len=128) as eng:
        assert eng.processor is None
        with running_server(create_app(eng, "text-only")) as url:
            r = httpx.post(url + "/v1/chat/completions", json={"model": "text-only", "messages": image_message(PNG_URL)})
            assert_error(r, 400, "messages.0.content.1.type", "'image_url' is not supported", "text-only")
            c = openai_client(url)
            with pytest.raises(openai.BadRequestError, match="text-only"):
                c.chat.completions.create(model="text-only", messages=image_message(PNG_URL))


def test_remote_images_when_enabled(engine, expected):
    text, prompt_len = expected
    app = create_app(engine, MODEL, allow_remote_images=True, max_image_bytes=REMOTE_LIMIT, image_fetch_timeout=1.0)
    with image_host() as host, running_server(app) as url:
        client = openai_client(url, timeout=120)
        resp = client.chat.completions.create(model=MODEL, messages=image_message(host + "/img.png"), max_tokens=NEW,
                                              temperature=0, extra_body={"ignore_eos": True})
        assert resp.choices[0].message.content == text and resp.usage.prompt_tokens == prompt_len

        def post(path: str) -> httpx.Response:
            return httpx.post(url + "/v1/chat/completions",
                              json={"model": MODEL, "messages": image_message(host + path)}, timeout=60)

        param = "messages.0.content.1.image_url.url"
        assert_error(post("/big.png"), 400, param, f"limit of {REMOTE_LIMIT} bytes", code="image_too_large")
        assert_error(post("/big-stream.png"), 400, param, f"limit of {REMOTE_LIMIT} bytes", code="image_too_large")
        assert_error(post("/missing.png"), 400, param, "HTTP 404", code="image_fetch_failed")
        started = time.monotonic()
        assert_error(post("/slow.png"), 400, param, "longer than 1s", code="image_fetch_failed")
        assert time.monotonic() - started < 2.5
        big_data = "data:image/png;base64," + base64.b64encode(b"\0" * (REMOTE_LIMIT + 10)).decode()
        assert_error(post_json(url, image_message(big_data)), 400, param, f"limit of {REMOTE_LIMIT} bytes")
    wait_idle(engine)


def post_json(url: str, messages: list[dict]) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=60)


def test_serve_image_flags(capsys):
    from fastlfm.server import build_parser, main

    args = build_parser().parse_args(["m", "--allow-remote-images", "--max-image-bytes", "1000",
                                      "--image-fetch-timeout", "2.5"])
    assert (args.allow_remote_images, args.max_image_bytes, args.image_fetch_timeout) == (True, 1000, 2.5)
    assert build_parser().parse_args(["m"]).allow_remote_images is False
    for flag, value in (("--max-image-bytes", "0"), ("--image-fetch-timeout", "-1")):
        with pytest.raises(SystemExit) as e:
            main(["m", flag, value])
        assert e.value.code == 2 and f"{flag} must be positive" in capsys.readouterr().err
