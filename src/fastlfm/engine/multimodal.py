"""Image inputs of LFM2-VL requests in the engine.

A request brings the processor's tensors (`pixel_values`, `pixel_attention_mask`,
`spatial_shapes`) and a prompt whose `<image>` runs they fill (one token per projected
feature row, in order). The vision tower and projector run once per request, at the first
prefill chunk that reaches an `<image>` position, batched with the other requests that
need it in that step. The features are kept on the Sequence: each prefill chunk takes the
rows whose positions fall inside it and scatters them over the token embeddings, so a
chunk boundary inside an image span needs nothing special. Decode steps are token ids only.

Lifetime, one simple rule: the pixel tensors are dropped as soon as they are encoded; the
features live as long as the request, because a preempted sequence recomputes its whole
prompt. Once the prompt is computed they leave accelerator memory (a host copy serves a
later recompute; on CPU nothing moves); everything goes when the request finishes or is
aborted.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..ops import host_to_device

IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
# Optional beside them: the views' digests (view_digests), made off the engine's thread.
DIGESTS_KEY = "view_digests"


@dataclass
class ImageInputs:
    pixel_values: torch.Tensor          # (views, patches, 3·p·p)
    pixel_attention_mask: torch.Tensor  # (views, patches)
    spatial_shapes: torch.Tensor        # (views, 2) patch grid (h, w) of each view
    digests: list[bytes] | None = None  # per view, `view_digests` of these tensors, if the caller made them

    @property
    def num_views(self) -> int:
        return int(self.spatial_shapes.shape[0])


def image_token_id(config) -> int | None:
    """The `<image>` id of a VL model's config; None for a text-only model."""
    tid = getattr(config, "image_token_id", None) if hasattr(config, "vision_config") else None
    return None if tid is None else int(tid)


def check_image_inputs(config, prompt: list[int], inputs: Mapping[str, Any] | None
                       ) -> tuple[ImageInputs | None, list[int]]:
    """Validate a request's images against the model config and its prompt.

    Returns the image tensors (on the CPU) and the sorted prompt positions of the `<image>`
    tokens. Extra keys of a processor output (input_ids, image_rows, ...) are ignored.
    """
    tid = image_token_id(config)
    if inputs is not None and not isinstance(inputs, Mapping):
        raise TypeError(f"image_inputs must be a mapping with {', '.join(IMAGE_KEYS)} "
                        f"(the processor's outputs), got {type(inputs).__name__}")
    given = inputs is not None and any(inputs.get(k) is not None for k in IMAGE_KEYS)
    if tid is None:
        if given:
            raise ValueError("image inputs were given but the model is text-only (its config has no image_token_id "
                             "and no vision tower); use an LFM2-VL checkpoint")
        return None, []
    positions = [i for i, t in enumerate(prompt) if t == tid]
    if not given:
        if positions:
            raise ValueError(f"the prompt has {len(positions)} image tokens (id {tid}) but no image inputs were "
                             "given; pass the processor's pixel_values, pixel_attention_mask and spatial_shapes")
        return None, []
    missing = [k for k in IMAGE_KEYS if inputs.get(k) is None]
    if missing:
        raise ValueError(f"image inputs lack {', '.join(missing)} (pass the processor's {', '.join(IMAGE_KEYS)})")
    pv, mask, shapes = (torch.as_tensor(inputs[k]).cpu() for k in IMAGE_KEYS)
    vc = config.vision_config
    width = vc.num_channels * vc.patch_size**2
    if pv.dim() != 3 or pv.shape[-1] != width:
        raise ValueError(f"pixel_values must have shape (views, patches, {width}), got {tuple(pv.shape)}")
    if not pv.is_floating_point():
        raise ValueError(f"pixel_values must be a floating-point tensor, got {pv.dtype}")
    if mask.shape != pv.shape[:2]:
        raise ValueError(f"pixel_attention_mask must have shape {tuple(pv.shape[:2])} (views, patches), "
                         f"got {tuple(mask.shape)}")
    if shapes.shape != (pv.shape[0], 2) or shapes.is_floating_point():
        raise ValueError(f"spatial_shapes must be an integer tensor of shape ({pv.shape[0]}, 2), "
                         f"got {tuple(shapes.shape)} {shapes.dtype}")
    f = config.downsample_factor
    real = mask.to(torch.long).sum(1).tolist()
    for v, (h, w) in enumerate(shapes.tolist()):
        if h < 1 or w < 1 or h % f or w % f:
            raise ValueError(f"spatial_shapes[{v}] = ({h}, {w}): the patch grid must be positive and divisible "
                             f"by downsample_factor {f}")
        if h * w > pv.shape[1] or real[v] != h * w:
            raise ValueError(f"view {v}: spatial_shapes ({h}, {w}) give {h * w} patches but pixel_attention_mask "
                             f"marks {real[v]} of {pv.shape[1]}")
    features = sum(view_feature_counts(config, shapes))
    if len(positions) != features:
        raise ValueError(f"the prompt has {len(positions)} image tokens (id {tid}) but the images give {features} "
                         "features; expand the prompt with the processor")
    digests = inputs.get(DIGESTS_KEY)
    if digests is not None and (not isinstance(digests, (list, tuple)) or len(digests) != pv.shape[0]
                                or not all(isinstance(d, bytes) for d in digests)):
        raise ValueError(f"{DIGESTS_KEY} must be a list of {pv.shape[0]} bytes digests (multimodal.view_digests)")
    return ImageInputs(pv, mask, shapes, None if digests is None else list(digests)), positions


def image_keys(config, images: ImageInputs, positions: list[int]) -> list[tuple[int, int, bytes]]:
    """Per view: the first and last prompt position of its features and a digest of its tensors.
    The prefix cache hashes a block with the digests of the views whose features it holds, so
    the same `<image>` ids with other pixels never match."""
    digests = images.digests if images.digests is not None else view_digests(
        {k: getattr(images, k) for k in IMAGE_KEYS})
    keys, first = [], 0
    for digest, n in zip(digests, view_feature_counts(config, images.spatial_shapes)):
        keys.append((positions[first], positions[first + n - 1], digest))
        first += n
    return keys


def view_feature_counts(config, spatial_shapes: torch.Tensor) -> list[int]:
    """Feature tokens of each view: its patch grid (h, w) after the projector's pixel unshuffle."""
    f = config.downsample_factor
    return [(h // f) * (w // f) for h, w in spatial_shapes.tolist()]


def view_digests(inputs: Mapping[str, Any]) -> list[bytes]:
    """A digest of each view's tensors (the processor's outputs): ~3 ms a view, so the server makes
    them while it prepares a request (passed as image_inputs[DIGESTS_KEY]), not the engine's thread."""
    tensors = [torch.as_tensor(inputs[k]).cpu() for k in IMAGE_KEYS]
    out = []
    for v in range(tensors[2].shape[0]):
        digest = hashlib.blake2b(digest_size=16)
        for t in (tensors[0][v], tensors[1][v], tensors[2][v]):
            digest.update(str((t.dtype, tuple(t.shape))).encode())
            digest.update((t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)).numpy())
        out.append(digest.digest())
    return out


def encode_images(model, seqs: list, max_views: int) -> None:
    """Run the vision tower + projector for these sequences' images (groups of at most
    `max_views` views per call); keep one (tokens, D) feature tensor on each Sequence."""
    device = model.device
    views = [(seq, v) for seq in seqs for v in range(seq.image_inputs.num_views)]
    feats: dict[int, list[torch.Tensor]] = {id(seq): [] for seq in seqs}
    for start in range(0, len(views), max_views):
        group = views[start:start + max_views]
        # Views of one processor share the padded patch count; group by it anyway.
        by_len: dict[int, list[tuple[Any, int]]] = {}
        for seq, v in group:
            by_len.setdefault(seq.image_inputs.pixel_values.shape[1], []).append((seq, v))
        results: dict[tuple[int, int], torch.Tensor] = {}
        for members in by_len.values():
            tensors = [torch.stack([getattr(s.image_inputs, k)[v] for s, v in members]).to(device)
                       for k in IMAGE_KEYS]
            for (s, v), out in zip(members, model.get_image_features(*tensors)):
                results[(id(s), v)] = out
        for seq, v in group:
            feats[id(seq)].append(results[(id(seq), v)])
    for seq in seqs:
        seq.image_embeds = torch.cat(feats[id(seq)])
        seq.image_inputs = None  # encoded: the pixels are not needed again


def chunk_image_rows(seq, n: int) -> tuple[int, int]:
    """Indices [lo, hi) of the feature rows whose `<image>` positions lie in the sequence's
    next chunk of n tokens (empty once its prompt images are computed)."""
    pos, start = seq.image_positions, seq.num_computed_tokens
    if not pos or start > pos[-1]:
        return 0, 0
    return bisect.bisect_left(pos, start), bisect.bisect_left(pos, start + n)


def has_image_rows(seqs: list, counts: list[int]) -> bool:
    """Whether any chunk of this batch holds an `<image>` position. (A one-token chunk can:
    it is scheduled like a decode row, so this also keeps it off the CUDA-graph path.)"""
    for seq, n in zip(seqs, counts):
        if seq.image_positions:  # text requests (nearly every row of a decode step) cost one check
            lo, hi = chunk_image_rows(seq, n)
            if hi > lo:
                return True
    return False


def prefill_embeds(model, seqs: list, counts: list[int], ids: torch.Tensor, max_views: int) -> torch.Tensor | None:
    """Token embeddings (1, N, D) of a packed batch with the image features of its prompt
    chunks scattered in; None when no chunk of this batch holds an `<image>` position."""
    spans = []  # (seq, packed offset of its chunk, chunk start, lo, hi)
    offset = 0
    for seq, n in zip(seqs, counts):
        lo, hi = chunk_image_rows(seq, n)
        if hi > lo:
            spans.append((seq, offset, seq.num_computed_tokens, lo, hi))
        offset += n
    if not spans:
        return None
    todo = [s for s, *_ in spans if s.image_embeds is None]
    if todo:
        encode_images(model, todo, max_views)
    embeds = model.get_input_embeddings()(ids)
    dst, src = [], []
    for seq, off, start, lo, hi in spans:
        dst.extend(off + p - start for p in seq.image_positions[lo:hi])
        src.append(seq.image_embeds[lo:hi].to(embeds.device, embeds.dtype, non_blocking=True))
    index = host_to_device(dst, torch.long, embeds.device)
    embeds[0].index_copy_(0, index, torch.cat(src))
    return embeds


def after_step(seq) -> None:
    """Once the prompt is computed, move the features off the accelerator (kept for a
    recompute after preemption)."""
    emb = seq.image_embeds
    if emb is not None and emb.device.type != "cpu" and seq.num_computed_tokens >= seq.num_prompt_tokens:
        seq.image_embeds = emb.cpu()


def release(seq) -> None:
    """The request is over: drop its images and features."""
    seq.image_inputs = None
    seq.image_embeds = None


def split_image_inputs(config, prompts: list[list[int]], inputs: Mapping[str, Any]) -> list[dict[str, Any] | None]:
    """A batch's processor output (all images' views in prompt order) as one image input per
    prompt: each prompt takes the views whose features fill its `<image>` tokens."""
    tid = image_token_id(config)
    if tid is None:
        raise ValueError("image inputs were given but the model is text-only; use an LFM2-VL checkpoint")
    missing = [k for k in IMAGE_KEYS if inputs.get(k) is None]
    if missing:
        raise ValueError(f"image inputs lack {', '.join(missing)} (pass the processor's {', '.join(IMAGE_KEYS)})")
    tensors = {k: torch.as_tensor(inputs[k]) for k in IMAGE_KEYS}
    per_view = view_feature_counts(config, tensors["spatial_shapes"])
    out, view = [], 0
    for i, prompt in enumerate(prompts):
        need = sum(1 for t in prompt if t == tid)
        if not need:
            out.append(None)
            continue
        first = view
        while need > 0 and view < len(per_view):
            need -= per_view[view]
            view += 1
        if need != 0:
            raise ValueError(f"prompt {i}: its image tokens do not match the features of the images given "
                             "(expand the prompts with the processor)")
        out.append({k: t[first:view] for k, t in tensors.items()})
    if view != len(per_view):
        raise ValueError(f"{len(per_view) - view} image views were given beyond the prompts' image tokens")
    return out
