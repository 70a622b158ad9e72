"""LFM2-VL image processor / processor: spec §8.4–8.5 and parity with transformers 5.23.

transformers' `Lfm2VlImageProcessor` needs torchvision. The oracle runs in a subprocess: with a
working torchvision it uses it; otherwise it puts a minimal stand-in on the path whose `resize`
does what torchvision 0.28's tensor resize does (`interpolate(antialias=True,
align_corners=False)`, natively in uint8 for bicubic and for bilinear on AVX2/AVX512/ARM, else
float32 + round). Everything else (sizes, grids, tiles, normalisation, patches, prompt
expansion) is transformers' own code.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from fastlfm.models.lfm2_vl_processing import Lfm2VlImageProcessor, Lfm2VlProcessor  # noqa: E402

SIZES = [(64, 64), (256, 256), (300, 200), (640, 480), (512, 1024), (1024, 1024), (1920, 1080),
         (1280, 1024), (1500, 200), (20, 30)]  # (W, H); the last three: a grid tie, a strip, tiny
SPEC_TOKENS = {(64, 64): 64, (256, 256): 64, (300, 200): 70, (640, 480): 234, (512, 1024): 242,
               (1024, 1024): 1280, (1920, 1080): 2300}
LARGE = [(1024, 1024), (1920, 1080), (1280, 1024)]
CONFIGS = {  # name -> (settings, the sizes where they matter)
    "default": ({}, SIZES),
    "no_thumbnail": ({"use_thumbnail": False}, LARGE),
    "no_split": ({"do_image_splitting": False}, LARGE),
    "custom": ({"min_image_tokens": 32, "max_image_tokens": 128, "tile_size": 384, "max_tiles": 6, "resample": 3,
                "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]},
               [(64, 64), (300, 200), (640, 480), (1920, 1080)]),
}
PLAIN = [(300, 200), (1920, 1080)]  # also compared with use_image_special_tokens=False
PROMPT = "Look: <image> and tell me."
SPECIAL = (["<|pad|>", "<|startoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|image_start|>",
            "<|image_end|>", "<|img_thumbnail|>"]
           + [f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)])


# --------------------------------------------------------------------------- fixtures

def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(w * h * 3))


class _TokAdapter:
    """fastlfm's duck-typed tokenizer interface over a `tokenizers.Tokenizer`."""

    def __init__(self, path: Path):
        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vl")
    for i, (w, h) in enumerate(SIZES):
        _image(w, h, seed=i).save(d / f"img_{w}x{h}.png")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Look at the image and tell me what you see.", "Describe this picture."] * 20,
                            trainer)
    tokdir = d / "tok"
    tokdir.mkdir()
    tok.save(str(tokdir / "tokenizer.json"))
    (tokdir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
        "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}))
    return d


@pytest.fixture(scope="module")
def tokenizer(workdir) -> _TokAdapter:
    return _TokAdapter(workdir / "tok" / "tokenizer.json")


_STUB = {
    "torchvision/__init__.py": '__version__ = "0.28.0"\n',
    "torchvision/io.py": "",  # imported by transformers.video_utils, unused here
    "torchvision/transforms/__init__.py": "from .functional import InterpolationMode, pil_to_tensor\n",
    "torchvision/transforms/functional.py": '''
import enum
import torch

class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"

def pil_to_tensor(pic):
    raise NotImplementedError
''',
    "torchvision/transforms/v2/__init__.py": "",
    "torchvision/transforms/v2/functional.py": '''
import platform
import torch
from torch.nn.functional import interpolate
from ..functional import InterpolationMode

def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    mode = InterpolationMode(interpolation)
    h, w = size
    if tuple(image.shape[-2:]) == (h, w):
        return image
    smooth = mode in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    native = mode != InterpolationMode.BILINEAR or (
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64"))
    ok = [torch.float32, torch.float64] + ([torch.uint8] if native else [])
    x = image.reshape(-1, *image.shape[-3:])
    cast = x.dtype not in ok
    y = interpolate(x.float() if cast else x, size=[h, w], mode=mode.value,
                    align_corners=False if smooth else None, antialias=bool(antialias) and smooth)
    if cast:
        if mode == InterpolationMode.BICUBIC and image.dtype == torch.uint8:
            y = y.clamp_(0, 255)
        y = y.round_().to(image.dtype)
    return y.reshape(image.shape[:-3] + y.shape[-3:])

def normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return image.sub_(mean).div_(std) if inplace else (image - mean).div_(std)

def grayscale_to_rgb(image):
    return image if image.shape[-3] == 3 else image.expand(*image.shape[:-3], 3, *image.shape[-2:])
''',
}

_ORACLE = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path
    work = Path(sys.argv[1])
    try:
        import torchvision.transforms.v2.functional  # a working torchvision, if there is one
        backend = "torchvision " + __import__("torchvision").__version__
    except Exception:
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.path.insert(0, str(work / "stub"))
        backend = "stub"
    from PIL import Image
    from transformers import AutoTokenizer, Lfm2VlImageProcessor, Lfm2VlProcessor
    spec = json.loads((work / "oracle_in.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    images = {name: Image.open(work / name).convert("RGB") for name in spec["images"]}
    results = {"backend": backend}
    for cname, (cfg, names) in spec["configs"].items():
        proc = Lfm2VlProcessor(image_processor=Lfm2VlImageProcessor(**cfg), tokenizer=tok)
        for name in names:
            out = proc(images=[[images[name]]], text=[spec["prompt"]], return_tensors="pt")
            results[cname, name] = {k: out[k] for k in
                                    ("input_ids", "pixel_values", "pixel_attention_mask", "spatial_shapes")}
            if cname == "default" and name in spec["plain"]:
                plain = proc(images=[[images[name]]], text=[spec["prompt"]], use_image_special_tokens=False)
                results["plain", name] = plain["input_ids"][0]
    imgs = [images[n] for n in spec["batch"]]
    results["batch"] = Lfm2VlProcessor(image_processor=Lfm2VlImageProcessor(), tokenizer=tok)(
        images=[imgs[:2], imgs[2:]], text=spec["batch_text"])["input_ids"]
    torch.save(results, work / "oracle.pt")
''')

BATCH = ["img_300x200.png", "img_1920x1080.png", "img_64x64.png"]
BATCH_TEXT = ["<image>Compare <image>.", "What is <image>?"]


def _name(size: tuple[int, int]) -> str:
    return f"img_{size[0]}x{size[1]}.png"


class _Oracle:
    """transformers' results, computed in a subprocess that runs while the tests compute ours."""

    def __init__(self, workdir: Path):
        for rel, src in _STUB.items():
            (workdir / "stub" / rel).parent.mkdir(parents=True, exist_ok=True)
            (workdir / "stub" / rel).write_text(src)
        (workdir / "oracle_in.json").write_text(json.dumps({
            "images": [_name(s) for s in SIZES], "prompt": PROMPT, "plain": [_name(s) for s in PLAIN],
            "configs": {k: (cfg, [_name(s) for s in sizes]) for k, (cfg, sizes) in CONFIGS.items()},
            "batch": BATCH, "batch_text": BATCH_TEXT}))
        self.path = workdir / "oracle.pt"
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        self.proc = subprocess.Popen([sys.executable, "-c", _ORACLE, str(workdir)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.data: dict | None = None

    def __getitem__(self, key):
        if self.data is None:
            log = self.proc.communicate()[0]
            assert self.proc.returncode == 0, log[-4000:]
            self.data = torch.load(self.path, weights_only=False)
        return self.data[key]


@pytest.fixture(scope="module")
def oracle(workdir):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    o = _Oracle(workdir)
    yield o
    if o.proc.poll() is None:
        o.proc.kill()
        o.proc.wait()


# --------------------------------------------------------------------------- spec

def test_spec_token_table():
    ip = Lfm2VlImageProcessor()
    assert ip.max_num_patches == 1024 and ip.tokens_per_tile == 256
    for (w, h), n in SPEC_TOKENS.items():
        out = ip(Image.new("RGB", (w, h), (200, 100, 50)))
        assert out["image_num_tokens"] == [n], (w, h)
    out = ip(Image.new("RGB", (1920, 1080)))
    assert (out["image_rows"], out["image_cols"], out["image_sizes"]) == ([2], [4], [[384, 672]])
    assert out["image_view_tokens"] == [[256] * 8 + [252]] and out["image_thumbnail"] == [True]
    assert out["spatial_shapes"].tolist() == [[32, 32]] * 8 + [[24, 42]]
    assert out["pixel_attention_mask"].sum(1).tolist() == [1024] * 8 + [24 * 42]
    assert out["pixel_values"][8, 24 * 42:].abs().sum() == 0
    assert ip.grid(1024, 1280) == (3, 3)  # ratio 1.25: ties 2x2, 3x2, 3x3; the larger wins while big enough
    assert ip.plan(1024, 512) == (False, 1, 1, False, (704, 352))


def test_patch_layout_is_channel_last():
    ip = Lfm2VlImageProcessor(do_normalize=False, do_rescale=False)
    img = _image(256, 256, seed=7)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(256, 256, 3).permute(2, 0, 1)
    pv = ip(img)["pixel_values"]
    # patch (row 1, col 2), pixel (3, 5), channel 1
    assert pv[0, 1 * 16 + 2, (3 * 16 + 5) * 3 + 1] == x[1, 16 + 3, 32 + 5].float()


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("cname", list(CONFIGS))
def test_parity_with_transformers(oracle, workdir, tokenizer, cname):
    """Pixels, masks, shapes and expanded prompt ids equal transformers' for every size."""
    settings, sizes = CONFIGS[cname]
    proc = Lfm2VlProcessor(tokenizer, Lfm2VlImageProcessor(**settings))
    ours = {size: proc(PROMPT, images=[workdir / _name(size)]) for size in sizes}
    plain = {size: proc([PROMPT], images=[[workdir / _name(size)]], use_image_special_tokens=False)
             for size in PLAIN} if cname == "default" else {}
    for size, out in ours.items():
        name = _name(size)
        ref = oracle[cname, name]
        assert out["spatial_shapes"].tolist() == ref["spatial_shapes"].tolist(), name
        assert out["pixel_attention_mask"].tolist() == ref["pixel_attention_mask"].tolist(), name
        assert out["pixel_values"].shape == ref["pixel_values"].shape, name
        torch.testing.assert_close(out["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0, msg=name)
        assert out["input_ids"] == ref["input_ids"].tolist(), name
        assert out["input_ids"][0].count(proc.image_token_id) == out["image_num_tokens"][0]
        if cname == "default" and size in SPEC_TOKENS:
            assert out["image_num_tokens"] == [SPEC_TOKENS[size]], name
    for size, out in plain.items():
        assert out["input_ids"] == [list(oracle["plain", _name(size)])], size
    print(f"transformers oracle resized with: {oracle['backend']}")


def test_processor_batch_parity(oracle, workdir, tokenizer):
    proc = Lfm2VlProcessor(tokenizer)
    paths = [workdir / n for n in BATCH]
    nested = proc(BATCH_TEXT, images=[paths[:2], paths[2:]])
    flat = proc(BATCH_TEXT, images=paths)  # a flat list is split over the prompts in order
    assert nested["input_ids"] == flat["input_ids"] == [list(x) for x in oracle["batch"]]
    assert nested["pixel_values"].shape[0] == 1 + 9 + 1


def test_special_token_ids_come_from_tokenizer(tokenizer):
    proc = Lfm2VlProcessor(tokenizer)
    assert proc.image_token_id == tokenizer.token_to_id("<image>") != 396
    ids = proc("<image>", images=Image.new("RGB", (1024, 1024)))["input_ids"][0]
    t = tokenizer.token_to_id
    assert ids[0] == t("<|image_start|>") and ids[-1] == t("<|image_end|>")
    assert ids[1] == t("<|img_row_1_col_1|>") and ids[2 + 256] == t("<|img_row_1_col_2|>")
    assert ids[-2 - 256] == t("<|img_thumbnail|>") and len(ids) == 1 + 4 * 257 + 257 + 1


# --------------------------------------------------------------------------- errors and config

def test_corrupt_and_missing_images(tmp_path):
    ip = Lfm2VlImageProcessor()
    with pytest.raises(ValueError, match="cannot decode"):
        ip(b"\x89PNG\r\n\x1a\nthis is not a png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="cannot decode"):
        ip(str(bad))
    with pytest.raises(ValueError, match="not found"):
        ip(tmp_path / "missing.png")
    png = io.BytesIO()
    _image(64, 64, seed=1).save(png, format="PNG")
    with pytest.raises(ValueError, match="cannot decode"):
        ip(png.getvalue()[:200])  # truncated
    with pytest.raises(ValueError, match="base64"):
        ip("data:image/png;base64,@@@")
    data_uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    assert torch.equal(ip(data_uri)["pixel_values"], ip(png.getvalue())["pixel_values"])
    good = io.BytesIO()
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(good, format="PNG")
    out = ip(good.getvalue())  # transparent -> white
    assert out["pixel_values"][0, :out["pixel_attention_mask"][0].sum()].eq(1.0).all()


def test_wrong_image_count(tokenizer):
    proc = Lfm2VlProcessor(tokenizer)
    img = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="<image>"):
        proc("no placeholder here", images=[img])
    with pytest.raises(ValueError, match="<image>"):
        proc("<image><image>", images=[img])
    with pytest.raises(ValueError, match="per prompt"):
        proc(["<image>", "<image><image>"], images=[[img, img], [img]])
    with pytest.raises(ValueError, match="<image>"):
        proc("<image>")
    assert proc("plain text")["input_ids"] == [tokenizer.encode("plain text", add_special_tokens=False)]


def test_from_pretrained_config_layouts(tmp_path, tokenizer):
    nested, flat = tmp_path / "nested", tmp_path / "flat"
    nested.mkdir(), flat.mkdir()
    (nested / "processor_config.json").write_text(json.dumps({
        "processor_class": "Lfm2VlProcessor", "use_image_special_tokens": False,
        "image_processor": {"image_processor_type": "Lfm2VlImageProcessor", "max_image_tokens": 128,
                            "resample": 3, "max_num_patches": 1024, "size": {"height": 512, "width": 512}}}))
    (nested / "preprocessor_config.json").write_text(json.dumps({"max_image_tokens": 999}))
    (flat / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Lfm2VlImageProcessorFast", "tile_size": 256, "min_tiles": 1,
        "do_resize": True, "unknown_key": 1}))
    a, b = Lfm2VlImageProcessor.from_pretrained(nested), Lfm2VlImageProcessor.from_pretrained(flat)
    assert (a.max_image_tokens, a.resample, a.tile_size) == (128, 3, 512)
    assert (b.max_image_tokens, b.tile_size, b.min_tiles) == (256, 256, 1)
    assert Lfm2VlImageProcessor.from_pretrained(tmp_path) == Lfm2VlImageProcessor()
    proc = Lfm2VlProcessor.from_pretrained(nested, tokenizer)
    assert proc.use_image_special_tokens is False and proc.image_processor == a
    with pytest.raises(ValueError, match="resample"):
        Lfm2VlImageProcessor(resample=1)
