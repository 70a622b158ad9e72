"""Small numerical building blocks shared by the model, training and the engine.

Each function is the reference (eager PyTorch) version; the engine may swap in a fused
kernel with the same contract on CUDA.
"""

from __future__ import annotations

import array

import torch
import torch.nn.functional as F


_ARRAY_CODES = {torch.long: "q", torch.int32: "i"}


def host_tensor(values, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """A CPU tensor of Python values, in pinned memory when `pin` (the source of a non-blocking
    host-to-device copy: a copy from pageable memory would wait for the GPU work in flight, and
    the engine launches the next step before reading the last one)."""
    if dtype in _ARRAY_CODES and isinstance(values, list) and (not values or isinstance(values[0], int)):
        # A flat list of ints (the engine's per-step metadata): array + frombuffer is ~3x faster
        # than torch.tensor(list), which inspects every element.
        t = torch.frombuffer(array.array(_ARRAY_CODES[dtype], values), dtype=dtype) if values \
            else torch.empty(0, dtype=dtype)
    else:
        t = torch.tensor(values, dtype=dtype)
    return t.pin_memory() if pin else t


def host_to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of Python values on `device`, without a host sync on CUDA (`host_tensor`)."""
    on_cuda = torch.device(device).type == "cuda"
    return host_tensor(values, dtype, pin=on_cuda).to(device, non_blocking=on_cuda)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm: statistics in fp32, result cast back, then `* weight` (no 1+w)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (..., head_dim) for integer positions; built in fp32, cast to `dtype`."""
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (B, T, H, d); cos/sin: (B, T, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def causal_conv(
    v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time for a batch of aligned rows.

    v: (B, T, D) conv input; weight: (D, 1, K), last tap = current token;
    state: (B, D, K-1) the previous K-1 inputs (oldest first) or None for zeros.
    Returns the conv output (B, T, D) and the new state (B, D, K-1).

    K multiply-adds over shifted views, accumulated in fp32 and rounded once (as a conv
    kernel does). Not F.conv1d: without native bf16, PyTorch's CPU conv runs a depthwise
    bf16 conv as one slow call per channel (most of a bf16 decode step on AVX2 machines).
    """
    B, T, D = v.shape
    K = weight.shape[-1]
    past = v.new_zeros(B, K - 1, D) if state is None else state.transpose(1, 2).to(v.dtype)
    x = torch.cat((past, v), dim=1)  # (B, K-1+T, D)
    w = weight.view(D, K).float()
    out = x[:, K - 1:].float() * w[:, K - 1]
    for tap in range(K - 1):
        out += x[:, tap:tap + T].float() * w[:, tap]
    if bias is not None:
        out += bias.float()
    return out.to(v.dtype), x[:, T:].transpose(1, 2).contiguous()  # a copy: a view would keep x alive


def packed_causal_conv(
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    pos_in_chunk: torch.Tensor,
    seq_of_token: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal conv over sequences packed back to back, with no leak across boundaries.

    v: (N, D) packed conv inputs; cu_seqlens: (S+1,) chunk boundaries; pos_in_chunk and
    seq_of_token: (N,) each token's offset in its chunk and its chunk index;
    state: (S, D, K-1) each sequence's previous K-1 inputs, or None for zeros (a fresh start).
    Returns (N, D) outputs and the (S, D, K-1) states after the chunk.
    """
    N, D = v.shape
    K = weight.shape[-1]
    w = weight.view(D, K).to(v.dtype)
    out = v * w[:, K - 1]
    for lag in range(1, K):  # tap K-1-lag looks `lag` tokens back
        shifted = F.pad(v, (0, 0, lag, 0))[:N]
        inside = (pos_in_chunk >= lag)[:, None]
        if state is None:
            prev = torch.where(inside, shifted, torch.zeros_like(shifted))
        else:
            slot = (K - 1 + pos_in_chunk - lag).clamp(min=0, max=K - 2)  # in-chunk rows: masked below
            from_state = state[seq_of_token, :, slot].to(v.dtype)
            prev = torch.where(inside, shifted, from_state)
        out = out + prev * w[:, K - 1 - lag]
    if bias is not None:
        out = out + bias.to(v.dtype)

    # New state: the last K-1 inputs of (old state ++ chunk) for every sequence.
    S = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1])[:, None]
    offs = lens - (K - 1) + torch.arange(K - 1, device=v.device)  # (S, K-1), relative to chunk start
    from_chunk = v[(cu_seqlens[:-1, None] + offs).clamp(min=0, max=max(N - 1, 0))]  # (S, K-1, D)
    if state is None:
        old = torch.zeros_like(from_chunk)
    else:
        idx = (K - 1 + offs).clamp(min=0, max=K - 2)
        old = state.gather(2, idx[:, None, :].expand(S, D, K - 1)).transpose(1, 2).to(v.dtype)
    new_state = torch.where((offs >= 0)[..., None], from_chunk, old).transpose(1, 2)
    return out, new_state
