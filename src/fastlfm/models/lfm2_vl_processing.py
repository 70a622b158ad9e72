"""LFM2-VL image processor and processor (spec §8.4, §8.5).

`Lfm2VlImageProcessor` turns images into SigLIP2-NaFlex inputs: each image becomes one view
(resized to the smart-resize size) or, when too large, a row-major grid of square tiles plus an
optional thumbnail. Every view is cut into channel-last patches and zero-padded to
`max_num_patches`. `Lfm2VlProcessor` expands each `<image>` in the prompt into the matching run
of image tokens and tokenises the result.

Resizing mirrors transformers' torchvision backend: uint8 CHW tensors resized with
`torch.nn.functional.interpolate(antialias=True, align_corners=False)`, natively in uint8 where
torchvision does so (bicubic, or bilinear on AVX2/AVX512/ARM CPUs), otherwise in float32 and
rounded back to uint8.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

# PIL resampling codes (as stored in preprocessor configs) -> interpolate modes.
_RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3}

ImageLike = Any  # PIL.Image.Image | str | os.PathLike | bytes
_INFO_KEYS = ("image_rows", "image_cols", "image_sizes", "image_thumbnail", "image_view_tokens",
              "image_num_tokens")


# --------------------------------------------------------------------------- image I/O

def _rgb(img: Any) -> Any:
    """PIL image -> RGB, compositing transparency onto white (as transformers does)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _decode(source: Any, what: str) -> Any:
    from PIL import Image, ImageOps

    try:
        img = Image.open(source)
        img.load()
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = str(e).replace(f" {source!r}", "")  # PIL names the file object: `what` says it better
        raise ValueError(f"cannot decode {what} as an image: {reason}") from None


def data_uri_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The payload of a base64 ``data:`` URI (line-wrapped base64 tolerated), at most
    `max_bytes` long; a ValueError that names what is wrong otherwise."""
    head, sep, payload = uri.partition(",")
    if not sep:
        raise ValueError("Malformed image data: URL: no ',' before the payload")
    if ";base64" not in head.lower():
        raise ValueError("Image data: URL is not base64-encoded: send data:image/...;base64,<payload>")
    payload = "".join(payload.split())
    too_large = f"Image is larger than the limit of {max_bytes} bytes"
    if max_bytes is not None and len(payload) // 4 * 3 > max_bytes + 2:
        raise ValueError(too_large)
    try:
        raw = base64.b64decode(payload, validate=True)
    except ValueError as e:  # binascii.Error is a ValueError
        raise ValueError(f"Invalid base64 in the image data: URL: {e}") from None
    if not raw:
        raise ValueError("The image data: URL is empty")
    if max_bytes is not None and len(raw) > max_bytes:
        raise ValueError(too_large)
    return raw


def load_image(image: ImageLike) -> Any:
    """Return an RGB PIL image from a PIL image, a file path, a data: URI, or encoded bytes."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return _rgb(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _rgb(_decode(io.BytesIO(bytes(image)), f"{len(image)} bytes"))
    if isinstance(image, (str, os.PathLike)):
        s = os.fspath(image)
        if s.startswith("data:"):
            return _rgb(_decode(io.BytesIO(data_uri_bytes(s)), "data: URI"))
        if s.startswith(("http://", "https://")):
            raise ValueError(f"image URLs are not fetched: {s[:80]}; pass the bytes or a PIL image")
        if not os.path.isfile(s):
            raise ValueError(f"image file not found: {s}")
        return _rgb(_decode(s, f"file {s}"))
    raise TypeError(f"unsupported image type {type(image).__name__}: expected PIL image, path or bytes")


def _to_tensor(img: Any) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1).contiguous()


def _flatten(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return [x for item in images for x in _flatten(item)]
    return [images]


# --------------------------------------------------------------------------- geometry

def _round_to(x: float, factor: int) -> int:
    return round(x / factor) * factor  # Python round: ties to even, as transformers


def _native_uint8(mode: str) -> bool:
    """Whether torchvision resizes uint8 directly (else via float32 + round) on this CPU."""
    if mode == "bilinear":
        return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                or platform.machine() in ("aarch64", "arm64"))
    return True  # bicubic / nearest-exact


def resize_uint8(image: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a uint8 (3, H, W) tensor with antialiasing, rounding back to uint8."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    smooth = mode in ("bilinear", "bicubic")
    kw = dict(size=(height, width), mode=mode, align_corners=False if smooth else None, antialias=smooth)
    x = image[None]
    if _native_uint8(mode):
        return F.interpolate(x, **kw)[0]
    return F.interpolate(x.float(), **kw).round_().to(torch.uint8)[0]


@dataclass
class Lfm2VlImageProcessor:
    """Settings and preprocessing of LFM2-VL images (defaults = the released checkpoints)."""

    downsample_factor: int = 2
    encoder_patch_size: int = 16
    tile_size: int = 512
    min_image_tokens: int = 64
    max_image_tokens: int = 256
    min_tiles: int = 2
    max_tiles: int = 10
    use_thumbnail: bool = True
    do_image_splitting: bool = True
    max_pixels_tolerance: float = 2.0
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Sequence[float] = field(default=(0.5, 0.5, 0.5))
    image_std: Sequence[float] = field(default=(0.5, 0.5, 0.5))
    resample: int | str = 2  # PIL code: 0 nearest, 2 bilinear, 3 bicubic
    do_pad: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.resample, str):
            if self.resample.lower() not in _RESAMPLE_NAMES:
                raise ValueError(f"unsupported resample {self.resample!r}")
            self.resample = _RESAMPLE_NAMES[self.resample.lower()]
        if self.resample not in _RESAMPLE:
            raise ValueError(f"unsupported resample code {self.resample}: use 0 (nearest), 2 (bilinear), 3 (bicubic)")
        if not self.do_pad:
            raise ValueError("do_pad=False is not supported: views are always padded to max_num_patches")
        if self.do_image_splitting and self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles ({self.min_tiles}) must be <= max_tiles ({self.max_tiles})")
        if self.tile_size % self.encoder_patch_size:
            raise ValueError(f"tile_size {self.tile_size} is not a multiple of encoder_patch_size")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    # ---- construction
    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> "Lfm2VlImageProcessor":
        """Build from a config dict; keys that are not settings (e.g. `max_num_patches`) are ignored."""
        names = {f.name for f in fields(cls)}
        merged = {**config, **overrides}
        return cls(**{k: v for k, v in merged.items() if k in names})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> "Lfm2VlImageProcessor":
        """Read a checkpoint folder: the `image_processor` entry of processor_config.json if present,
        else preprocessor_config.json (transformers' priority), else defaults."""
        folder = Path(folder)
        config: dict[str, Any] = {}
        proc = folder / "processor_config.json"
        if proc.is_file() and isinstance(nested := _read_json(proc).get("image_processor"), dict):
            config = nested
        elif (pre := folder / "preprocessor_config.json").is_file():
            config = _read_json(pre)
        return cls.from_dict(config, **overrides)

    # ---- derived settings
    @property
    def max_num_patches(self) -> int:
        tile_patches = (self.tile_size // self.encoder_patch_size) ** 2 if self.do_image_splitting else 0
        return max(self.max_image_tokens * self.downsample_factor ** 2, tile_patches)

    @property
    def tokens_per_tile(self) -> int:
        return math.ceil(self.tile_size // self.encoder_patch_size / self.downsample_factor) ** 2

    def tokens_for_size(self, height: int, width: int) -> int:
        """Image tokens of one view of this pixel size."""
        p, f = self.encoder_patch_size, self.downsample_factor
        return math.ceil(height // p / f) * math.ceil(width // p / f)

    def is_too_large(self, height: int, width: int) -> bool:
        p, f = self.encoder_patch_size, self.downsample_factor
        h, w = max(p, _round_to(height, p * f)), max(p, _round_to(width, p * f))
        return h * w > self.max_image_tokens * p * p * f * f * self.max_pixels_tolerance

    def smart_resize(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the single view / thumbnail: multiples of p·f within the token budget."""
        p, f = self.encoder_patch_size, self.downsample_factor
        step = p * f
        min_px, max_px = self.min_image_tokens * step * step, self.max_image_tokens * step * step
        h, w = max(step, _round_to(height, step)), max(step, _round_to(width, step))
        if h * w > max_px:
            beta = math.sqrt(height * width / max_px)
            h = max(step, math.floor(height / beta / step) * step)
            w = max(step, math.floor(width / beta / step) * step)
        elif h * w < min_px:
            beta = math.sqrt(min_px / (height * width))
            h, w = math.ceil(height * beta / step) * step, math.ceil(width * beta / step) * step
        return h, w

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles whose cols/rows ratio is closest to width/height."""
        lo, hi = self.min_tiles, self.max_tiles
        cands = {(c, r) for c in range(1, hi + 1) for r in range(1, hi + 1) if lo <= c * r <= hi}
        best, best_diff = (1, 1), float("inf")
        for c, r in sorted(cands, key=lambda g: g[0] * g[1]):  # stable: same order as transformers
            diff = abs(width / height - c / r)
            if diff < best_diff:
                best, best_diff = (c, r), diff
            elif diff == best_diff and width * height > 0.5 * self.tile_size ** 2 * c * r:
                best = (c, r)  # tie: a later (larger) grid wins if the image is big enough
        return best[1], best[0]

    def plan(self, height: int, width: int) -> tuple[bool, int, int, bool, tuple[int, int]]:
        """(split?, rows, cols, thumbnail?, smart-resize size) for an image of this size."""
        size = self.smart_resize(height, width)
        splitting = self.do_image_splitting and not self.min_tiles == self.max_tiles == 1
        if splitting and self.is_too_large(height, width):
            rows, cols = self.grid(height, width)
            return True, rows, cols, self.use_thumbnail and rows * cols > 1, size
        return False, 1, 1, False, size

    # ---- pixels
    def _views(self, image: torch.Tensor) -> tuple[list[torch.Tensor], int, int, bool, tuple[int, int]]:
        """uint8 (3, H, W) -> uint8 views (tiles row-major, then the thumbnail) and the layout."""
        mode = _RESAMPLE[int(self.resample)]
        split, rows, cols, thumb, size = self.plan(image.shape[-2], image.shape[-1])
        if not split:
            return [resize_uint8(image, *size, mode)], rows, cols, thumb, size
        t = self.tile_size
        big = resize_uint8(image, rows * t, cols * t, mode)
        tiles = big.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        views = list(tiles.unbind(0))
        if thumb:
            views.append(resize_uint8(image, *size, mode))
        return views, rows, cols, thumb, size

    def _normalise_(self, patches: torch.Tensor) -> torch.Tensor:
        """In place on float32 channel-last patches, with transformers' fused rescale+normalise
        arithmetic: (x - mean/r) / (std/r), or x·r without normalisation."""
        if self.do_normalize:
            scale = 1.0 / self.rescale_factor if self.do_rescale else 1.0
            reps = self.encoder_patch_size ** 2
            patches.sub_((torch.tensor(self.image_mean) * scale).repeat(reps))
            return patches.div_((torch.tensor(self.image_std) * scale).repeat(reps))
        return patches.mul_(self.rescale_factor) if self.do_rescale else patches

    def _patchify(self, view: torch.Tensor) -> torch.Tensor:
        """(3, H, W) -> (H/p·W/p, p·p·3): patches row-major, each in (row, col, channel) order."""
        c, h, w = view.shape
        p = self.encoder_patch_size
        x = view.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0)
        return x.reshape((h // p) * (w // p), p * p * c)

    def __call__(self, images: ImageLike | Sequence[Any]) -> dict[str, Any]:
        """Preprocess one image or a (nested) list of images, flattened in order.

        Returns `pixel_values` (N_views, max_num_patches, 3·p²) float32, `pixel_attention_mask`
        (N_views, max_num_patches) int32, `spatial_shapes` (N_views, 2) int64, and per image:
        `image_rows`, `image_cols`, `image_sizes` ([h, w] smart-resize size), `image_thumbnail`
        (bool), `image_view_tokens` (tokens of each view) and `image_num_tokens` (their sum).
        """
        imgs = _flatten(images)
        if not imgs:
            raise ValueError("no images given")
        p, n_max = self.encoder_patch_size, self.max_num_patches
        info: dict[str, list[Any]] = {k: [] for k in _INFO_KEYS}
        views: list[torch.Tensor] = []
        for img in imgs:
            image_views, rows, cols, thumb, size = self._views(_to_tensor(load_image(img)))
            view_tokens = [self.tokens_for_size(v.shape[-2], v.shape[-1]) for v in image_views]
            views += image_views
            info["image_rows"].append(rows)
            info["image_cols"].append(cols)
            info["image_sizes"].append(list(size))
            info["image_thumbnail"].append(thumb)
            info["image_view_tokens"].append(view_tokens)
            info["image_num_tokens"].append(sum(view_tokens))
        spatial = torch.tensor([(v.shape[-2] // p, v.shape[-1] // p) for v in views], dtype=torch.long)
        counts = spatial[:, 0] * spatial[:, 1]
        if int(counts.max()) > n_max:
            raise ValueError(f"a view has {int(counts.max())} patches, more than max_num_patches={n_max}")
        pixel_values = torch.zeros(len(views), n_max, 3 * p * p)
        for i, v in enumerate(views):  # patch in uint8, then convert and normalise in place
            self._normalise_(pixel_values[i, :counts[i]].copy_(self._patchify(v)))
        mask = (torch.arange(n_max)[None] < counts[:, None]).to(torch.int32)
        return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "spatial_shapes": spatial, **info}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


# --------------------------------------------------------------------------- processor

class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def token_to_id(self, token: str) -> int | None: ...


def conversation_images(messages: Sequence[Any], where: str = "") -> list[Any]:
    """The images of a conversation's image parts (`{"type": "image", "image": PIL image | path |
    bytes}`, or transformers' `url` / `path` keys), in order; messages that are not dicts have none."""
    images = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image":
                image = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                if image is None:
                    raise ValueError(f"{where}messages[{i}]: an image part needs an 'image' (PIL image, path or "
                                     "bytes), 'url' or 'path'")
                images.append(image)
    return images


class Lfm2VlProcessor:
    """Expands `<image>` placeholders per spec §8.5 and tokenises prompts with their images."""

    def __init__(self, tokenizer: TokenizerLike, image_processor: Lfm2VlImageProcessor | None = None,
                 image_token: str = "<image>", image_start_token: str = "<|image_start|>",
                 image_end_token: str = "<|image_end|>", image_thumbnail_token: str = "<|img_thumbnail|>",
                 tile_token_template: str = "<|img_row_{row}_col_{col}|>",
                 use_image_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor or Lfm2VlImageProcessor()
        self.image_token, self.image_start_token = image_token, image_start_token
        self.image_end_token, self.image_thumbnail_token = image_end_token, image_thumbnail_token
        self.tile_token_template = tile_token_template
        self.use_image_special_tokens = use_image_special_tokens
        self.image_token_id = self._token_id(image_token)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, tokenizer: TokenizerLike, **kwargs: Any) -> "Lfm2VlProcessor":
        """Image processor settings and `use_image_special_tokens` from a checkpoint folder."""
        proc = Path(folder) / "processor_config.json"
        if "use_image_special_tokens" not in kwargs and proc.is_file():
            value = _read_json(proc).get("use_image_special_tokens")
            if value is not None:
                kwargs["use_image_special_tokens"] = bool(value)
        return cls(tokenizer, Lfm2VlImageProcessor.from_pretrained(folder), **kwargs)

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"the tokenizer has no token {token!r}")
        return tid

    def expand_image(self, rows: int, cols: int, view_tokens: Sequence[int], thumbnail: bool,
                     use_image_special_tokens: bool | None = None) -> str:
        """Replacement text of one `<image>` for an image with the given tile layout."""
        special = self.use_image_special_tokens if use_image_special_tokens is None else use_image_special_tokens
        parts = [self.image_start_token] if special else []
        if rows * cols > 1:
            for i in range(rows * cols):
                if special:
                    tile_token = self.tile_token_template.format(row=i // cols + 1, col=i % cols + 1)
                    self._token_id(tile_token)
                    parts.append(tile_token)
                parts.append(self.image_token * view_tokens[i])
            if thumbnail:
                parts += [self.image_thumbnail_token] if special else []
                parts.append(self.image_token * view_tokens[-1])
        else:
            parts.append(self.image_token * view_tokens[0])
        if special:
            parts.append(self.image_end_token)
        return "".join(parts)

    def __call__(self, text: str | Sequence[str], images: Any = None,
                 use_image_special_tokens: bool | None = None) -> dict[str, Any]:
        """Tokenise prompt(s) (add_special_tokens=False), expanding each `<image>`.

        `images`: None, one image, a flat list (split over the prompts in `<image>` order), or one
        list per prompt. Returns `input_ids` (list of lists) and, with images, the image
        processor's outputs.
        """
        texts = [text] if isinstance(text, str) else list(text)
        special = self.use_image_special_tokens if use_image_special_tokens is None else use_image_special_tokens
        counts = [t.count(self.image_token) for t in texts]
        per_sample = self._split_images(images, counts)
        if special and sum(counts):
            for tok in (self.image_start_token, self.image_end_token, self.image_thumbnail_token):
                self._token_id(tok)
        out: dict[str, Any] = {}
        if sum(counts):
            out = self.image_processor([x for sample in per_sample for x in sample])
        input_ids, k = [], 0
        for t, n in zip(texts, counts):
            pieces = t.split(self.image_token)
            expanded = [pieces[0]]
            for i in range(n):
                expanded.append(self.expand_image(out["image_rows"][k + i], out["image_cols"][k + i],
                                                  out["image_view_tokens"][k + i], out["image_thumbnail"][k + i],
                                                  special))
                expanded.append(pieces[i + 1])
            ids = list(self.tokenizer.encode("".join(expanded), add_special_tokens=False))
            want = sum(out["image_num_tokens"][k:k + n]) if n else 0
            if ids.count(self.image_token_id) != want:
                raise ValueError(f"tokenised prompt has {ids.count(self.image_token_id)} {self.image_token} ids, "
                                 f"expected {want}: is {self.image_token!r} a single special token?")
            input_ids.append(ids)
            k += n
        return {"input_ids": input_ids, **out}

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> dict[str, Any]:
        """Render a conversation whose message contents may be lists of parts
        (`{"type": "image", "image": PIL image | path | bytes}`, `{"type": "text", "text": ...}`)
        and tokenise it with its images, in order. Returns one row of `input_ids` plus the
        image tensors (absent for a text-only conversation)."""
        images = conversation_images(messages)
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs)
        return self(text, images or None)

    def _split_images(self, images: Any, counts: list[int]) -> list[list[Any]]:
        """Images per prompt, checked against the `<image>` counts."""
        if images is None:
            per_sample: list[list[Any]] = [[] for _ in counts]
        elif isinstance(images, (list, tuple)) and images and all(isinstance(x, (list, tuple)) for x in images):
            per_sample = [list(x) for x in images]
        else:
            flat = _flatten(images)
            if len(flat) != sum(counts):
                raise ValueError(f"found {sum(counts)} {self.image_token} in the text but {len(flat)} images")
            starts = [sum(counts[:i]) for i in range(len(counts))]
            per_sample = [flat[s:s + c] for s, c in zip(starts, counts)]
        if [len(x) for x in per_sample] != counts:
            raise ValueError(f"each prompt needs one {self.image_token} per image: found {counts} "
                             f"{self.image_token} per prompt but {[len(x) for x in per_sample]} images per prompt")
        return per_sample
